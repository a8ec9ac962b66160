"""``voxplain cyce train|transfer``: cycle-consistent activation maximisation (paper 3)."""

from __future__ import annotations

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
from voxplain.config import CyCEStepConfig, CyCETransferConfig

cyce = typer.Typer(help="CyCE: cycle-consistent activation-maximisation explanations (paper 3).",
                   no_args_is_help=True)

_FOLDS = {"folds": ("--folds", "--fold")}


@cyce.command("train")
@config_command(
    CyCEStepConfig, "cyce",
    ["run", "folds", "device", "cyce.widths", "cyce.convs_per_stage", "cyce.cycle_weight",
     "cyce.similarity_weight", "cyce.similarity_l1_weight", "cyce.discriminator_normalisation",
     "cyce.adversarial_weight", "cyce.activation_weight", "cyce.batch_size",
     "cyce.learning_rate", "cyce.max_steps", "cyce.max_seconds", "cyce.min_steps",
     "cyce.patience", "cyce.checkpoint_every", "cyce.seed", *EXECUTOR_FIELDS],
    flags={**_FOLDS, **EXECUTOR_FLAGS})
def cyce_train(settings: CyCEStepConfig) -> None:
    """Train G+ and G- against each fold's classifier (on its training images; labels unused)."""
    from voxplain.steps.cyce import run_cyce_train

    with reported_errors(), progress_bar() as bar:
        summary = run_cyce_train(settings, progress=bar)
    print_table("CyCE training (means of the last 50 steps)", summary,
                ["fold", "run", "steps", "seconds_per_step", "generator", "discriminator",
                 "probability_plus", "probability_minus"])


@cyce.command("transfer")
@config_command(CyCETransferConfig, "cyce_transfer",
                ["run", "folds", "subset", "confidence", "device"], flags=_FOLDS)
def cyce_transfer(settings: CyCETransferConfig) -> None:
    """Classifier's mean positive-class probability on x, G-(x), G+(x), CIs and paired t-tests."""
    from voxplain.steps.cyce import run_cyce_transfer

    with reported_errors(), progress_bar() as bar:
        table = run_cyce_transfer(settings, progress=bar)
    print_table("CyCE domain transfer (probability of the positive class)", table,
                ["fold", "run", "subset", "domain", "n", "mean", "ci_low", "ci_high", "t", "df",
                 "p"])
    for row in table[table.domain != "x"].itertuples():
        console.print(f"fold {row.fold} run {row.run}: {row.domain} vs x: mean difference "
                      f"{row.difference:+.3f}, t({row.df:.0f}) = {row.t:.2f}, p = {row.p:.2e}")
