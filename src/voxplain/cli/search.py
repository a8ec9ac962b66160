"""``voxplain search``: paper 1's random search of the CNN and its training (2.2.2)."""

from __future__ import annotations

import typer

from voxplain.cli.common import (
    config_command,
    print_table,
    progress_bar,
    reported_errors,
)
from voxplain.config import SearchConfig


@config_command(
    SearchConfig, "search",
    ["cohort", "run", "caps", "diagnosis_column", "classes", "n_folds", "split_seed", "seed",
     "epochs", "patience", "min_steps", "select_by", "class_weights", "augmentation",
     "downsample", "qc_threshold", "cache", "device",
     "n_trials", "sampler", "sampler_seed", "objective", "trial_folds",
     "space.blocks", "space.first_channels", "space.max_channels", "space.convs_per_block",
     "space.reduction", "space.fc_layers", "space.dropout", "space.learning_rate",
     "space.weight_decay", "space.batch_size"],
    flags={"run": ("--run", "--out"), "n_folds": ("--n-folds", "--folds")})
def search(settings: SearchConfig) -> None:
    """Random search (paper 1, 2.2.2) of the CNN's architecture and training settings with
    Optuna; trials in RUN/search/trial-NNN, the best settings in RUN/search/best_train.toml
    (train it with `voxplain train --config RUN/search/best_train.toml`). Ranges are
    low,high; choices are comma-separated. A resumed search runs only the missing trials."""
    import optuna

    from voxplain.steps.search import run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    with reported_errors(), progress_bar() as bar:
        trials = run_search(settings, progress=bar)
    print_table("Search trials", trials, [c for c in trials.columns
                                          if c not in ("folder", "weight_decay")])
    typer.echo(settings.run / "search" / "best_train.toml")
