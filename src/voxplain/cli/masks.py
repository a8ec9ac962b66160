"""``voxplain mask group|session|grid``: meaningful-perturbation masks (paper 1, 2.3)."""

from __future__ import annotations

from pathlib import Path

import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    given,
    option,
    print_table,
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import (
    GroupMaskConfig,
    GroupMaskStepConfig,
    MaskConfig,
    MaskGridConfig,
    MaskStepConfig,
    SessionMaskConfig,
    SessionMaskStepConfig,
)

mask = typer.Typer(help="Meaningful-perturbation masks (paper 1, 2.3).", no_args_is_help=True)


@mask.command("group")
def mask_group(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    l1: float = option(MaskConfig, "l1", "--l1"),
    l2: float = option(MaskConfig, "l2", "--l2"),
    b1: float = option(MaskConfig, "b1", "--b1"),
    b2: float = option(MaskConfig, "b2", "--b2"),
    perturbation: str = option(MaskConfig, "perturbation", "--perturbation"),
    max_epochs: int = option(GroupMaskConfig, "max_epochs", "--max-epochs"),
    patience: int = option(GroupMaskConfig, "patience", "--patience"),
    batch_size: int = option(GroupMaskConfig, "batch_size", "--batch-size"),
    config: Path = CONFIG_OPTION,
) -> None:
    """One mask per fold for its correctly classified patients (training set; validation set
    for early stopping)."""
    from voxplain.explain.mask_steps import group_masks

    setup_logging()
    settings = build_config(
        GroupMaskStepConfig, "mask_group", config, run=absolute(run),
        folds=split_list(folds, int), diagnosis=diagnosis, device=device,
        mask=given(l1=l1, l2=l2, b1=b1, b2=b2, perturbation=perturbation, max_epochs=max_epochs,
                    patience=patience, batch_size=batch_size))
    with reported_errors(), progress_bar() as bar:
        summary = group_masks(settings, progress=bar)
    print_table("Group masks", summary, ["fold", "run", "n_train", "n_validation", "best_epoch",
                                          "probability_before", "probability_after",
                                          "top_regions"])


@mask.command("session")
def mask_session(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    max_sessions: int = option(SessionMaskStepConfig, "max_sessions", "--max-sessions"),
    l1: float = option(MaskConfig, "l1", "--l1"),
    l2: float = option(MaskConfig, "l2", "--l2"),
    perturbation: str = option(MaskConfig, "perturbation", "--perturbation"),
    max_iterations: int = option(SessionMaskConfig, "max_iterations", "--max-iterations"),
    patience: int = option(SessionMaskConfig, "patience", "--patience"),
    batch_size: int = option(SessionMaskConfig, "batch_size", "--batch-size"),
    config: Path = CONFIG_OPTION,
) -> None:
    """One mask per correctly classified session of each fold's validation subjects, batched."""
    from voxplain.explain.mask_steps import session_masks

    setup_logging()
    settings = build_config(
        SessionMaskStepConfig, "mask_session", config, run=absolute(run),
        folds=split_list(folds, int), diagnosis=diagnosis, device=device,
        max_sessions=max_sessions,
        mask=given(l1=l1, l2=l2, perturbation=perturbation, max_iterations=max_iterations,
                    patience=patience, batch_size=batch_size))
    with reported_errors(), progress_bar() as bar:
        index = session_masks(settings, progress=bar)
    print_table("Session masks", index, ["fold", "participant_id", "session_id", "iterations",
                                          "loss", "probability_after", "flagged"])


@mask.command("grid")
def mask_grid_command(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    l1: str = option(MaskGridConfig, "l1", "--l1"),
    l2: str = option(MaskGridConfig, "l2", "--l2"),
    b1: str = option(MaskGridConfig, "b1", "--b1"),
    b2: str = option(MaskGridConfig, "b2", "--b2"),
    design: str = option(MaskGridConfig, "design", "--design"),
    max_epochs: int = option(GroupMaskConfig, "max_epochs", "--max-epochs"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Group masks over a grid of l1, l2, b1, b2 (paper 1, 2.3.2; every combination or one
    hyperparameter at a time), keyed by setting."""
    from voxplain.explain.mask_steps import mask_grid

    setup_logging()
    settings = build_config(
        MaskGridConfig, "mask_grid", config, run=absolute(run), folds=split_list(folds, int),
        diagnosis=diagnosis, device=device, l1=split_list(l1, float), l2=split_list(l2, float),
        b1=split_list(b1, float), b2=split_list(b2, float), design=design,
        mask=given(max_epochs=max_epochs))
    with reported_errors(), progress_bar() as bar:
        summary = mask_grid(settings, progress=bar)
    print_table("Mask grid", summary, ["l1", "l2", "b1", "b2", "fold", "run",
                                        "probability_after", "top_regions"])
