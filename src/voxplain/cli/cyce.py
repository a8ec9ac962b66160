"""``voxplain cyce train|transfer``: cycle-consistent activation maximisation (paper 3)."""

from __future__ import annotations

from pathlib import Path

import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    console,
    given,
    option,
    print_table,
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import CyCEConfig, CyCEStepConfig, CyCETransferConfig

cyce = typer.Typer(help="CyCE: cycle-consistent activation-maximisation explanations (paper 3).",
                   no_args_is_help=True)


@cyce.command("train")
def cyce_train(
    run: Path = option(CyCEStepConfig, "run", "--run"),
    folds: str = option(CyCEStepConfig, "folds", "--fold"),
    device: str = option(CyCEStepConfig, "device", "--device"),
    widths: str = option(CyCEConfig, "widths", "--widths"),
    convs_per_stage: int = option(CyCEConfig, "convs_per_stage", "--convs-per-stage"),
    cycle_weight: float = option(CyCEConfig, "cycle_weight", "--cycle-weight"),
    similarity_weight: float = option(CyCEConfig, "similarity_weight", "--similarity-weight"),
    similarity_l1_weight: float = option(CyCEConfig, "similarity_l1_weight",
                                         "--similarity-l1-weight"),
    discriminator_normalisation: str = option(CyCEConfig, "discriminator_normalisation",
                                              "--discriminator-normalisation"),
    adversarial_weight: float = option(CyCEConfig, "adversarial_weight", "--adversarial-weight"),
    activation_weight: float = option(CyCEConfig, "activation_weight", "--activation-weight"),
    batch_size: int = option(CyCEConfig, "batch_size", "--batch-size"),
    learning_rate: float = option(CyCEConfig, "learning_rate", "--learning-rate"),
    max_steps: int = option(CyCEConfig, "max_steps", "--max-steps"),
    max_seconds: float = option(CyCEConfig, "max_seconds", "--max-seconds"),
    min_steps: int = option(CyCEConfig, "min_steps", "--min-steps"),
    patience: int = option(CyCEConfig, "patience", "--patience"),
    checkpoint_every: int = option(CyCEConfig, "checkpoint_every", "--checkpoint-every"),
    seed: int = option(CyCEConfig, "seed", "--seed"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Train G+ and G- against each fold's classifier (on its training images; labels unused)."""
    from voxplain.explain.cyce.steps import train_cyce

    setup_logging()
    settings = build_config(
        CyCEStepConfig, "cyce", config, run=absolute(run), folds=split_list(folds, int),
        device=device, cyce=given(
            widths=split_list(widths, int), convs_per_stage=convs_per_stage,
            cycle_weight=cycle_weight, similarity_weight=similarity_weight,
            similarity_l1_weight=similarity_l1_weight,
            discriminator_normalisation=discriminator_normalisation,
            adversarial_weight=adversarial_weight, activation_weight=activation_weight,
            batch_size=batch_size, learning_rate=learning_rate, max_steps=max_steps, max_seconds=max_seconds,
            min_steps=min_steps, patience=patience, checkpoint_every=checkpoint_every, seed=seed))
    with reported_errors(), progress_bar() as bar:
        summary = train_cyce(settings, progress=bar)
    print_table("CyCE training (means of the last 50 steps)", summary,
                ["fold", "run", "steps", "seconds_per_step", "generator", "discriminator",
                 "probability_plus", "probability_minus"])


@cyce.command("transfer")
def cyce_transfer(
    run: Path = option(CyCETransferConfig, "run", "--run"),
    folds: str = option(CyCETransferConfig, "folds", "--fold"),
    subset: str = option(CyCETransferConfig, "subset", "--subset"),
    confidence: float = option(CyCETransferConfig, "confidence", "--confidence"),
    device: str = option(CyCETransferConfig, "device", "--device"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Classifier's mean positive-class probability on x, G-(x), G+(x), CIs and paired t-tests."""
    from voxplain.explain.cyce.steps import transfer_cyce

    setup_logging()
    settings = build_config(CyCETransferConfig, "cyce_transfer", config, run=absolute(run),
                            folds=split_list(folds, int), subset=subset, confidence=confidence,
                            device=device)
    with reported_errors(), progress_bar() as bar:
        table = transfer_cyce(settings, progress=bar)
    print_table("CyCE domain transfer (probability of the positive class)", table,
                ["fold", "run", "subset", "domain", "n", "mean", "ci_low", "ci_high", "t", "df",
                 "p"])
    for row in table[table.domain != "x"].itertuples():
        console.print(f"fold {row.fold} run {row.run}: {row.domain} vs x: mean difference "
                      f"{row.difference:+.3f}, t({row.df:.0f}) = {row.t:.2f}, p = {row.p:.2e}")
