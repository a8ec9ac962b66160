"""``voxplain train`` and ``voxplain predict``: cross-validated classifiers."""

from __future__ import annotations

from typing import Any

import typer

from voxplain.cli.common import (
    EXECUTOR_FIELDS,
    EXECUTOR_FLAGS,
    config_command,
    console,
    print_table,
    progress_bar,
    reported_errors,
)
from voxplain.config import PredictConfig, TrainConfig


@config_command(
    TrainConfig, "train",
    ["cohort", "run", "caps", "test", "diagnosis_column", "classes", "n_folds", "runs", "seed",
     "epochs", "patience", "min_steps", "select_by", "class_weights", "batch_size",
     "learning_rate", "weight_decay",
     "augmentation", "downsample", "sequences", "slice_axis", "slice_range",
     "slice_min_foreground", "slice_size", "split", "split_fractions", "qc_threshold", "cache", "device", "model.name",
     "model.channels", "model.convs_per_block", "model.reduction", "model.fc_layers",
     "model.dropout", "model.head", "model.pool_size", "model.hidden_units",
     "model.batch_norm",
     "model.weights", *EXECUTOR_FIELDS],
    flags={"run": ("--run", "--out"), "n_folds": ("--n-folds", "--folds"),
           "model.name": "--model", **EXECUTOR_FLAGS})
def train(settings: TrainConfig) -> None:
    """Subject-level cross-validated training (k-fold, or repeated random train/validation/test
    splits), of volumes, images, or the slices of volumes; writes models and metrics to the run
    folder."""
    from voxplain.steps.train import run_train

    with reported_errors(), progress_bar() as bar:
        summary = run_train(settings, progress=bar)
    _print_summary(summary)
    typer.echo(settings.run)


@config_command(PredictConfig, "predict", ["run", "cohort", "caps", "out", "device"],
                absolute_paths=False)
def predict(settings: PredictConfig) -> None:
    """Per-session class probabilities of every model of a run folder."""
    from voxplain.steps.predict import run_predict

    with reported_errors(), progress_bar() as bar:
        predictions = run_predict(settings, progress=bar)
    typer.echo(predictions.to_csv(sep="\t", index=False), nl=False)


def _print_summary(summary: Any) -> None:
    print_table("Cross-validation (best model of each fold and run)", summary,
                 ["fold", "run", "subset", "best_epoch", "epochs", "balanced_accuracy", "auc",
                  "loss", "at_chance"])
    for subset, group in summary.groupby("subset"):
        console.print(f"mean {subset} balanced accuracy: {group.balanced_accuracy.mean():.3f} "
                      f"(per fold: {', '.join(f'{v:.2f}' for v in group.balanced_accuracy)})")
