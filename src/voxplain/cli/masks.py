"""``voxplain mask group|session|grid``: meaningful-perturbation masks (paper 1, 2.3)."""

from __future__ import annotations

import typer

from voxplain.cli.common import (
    EXECUTOR_FIELDS,
    EXECUTOR_FLAGS,
    SESSION_EXECUTOR_FIELDS,
    config_command,
    print_table,
    progress_bar,
    reported_errors,
)
from voxplain.config import GroupMaskStepConfig, MaskGridConfig, SessionMaskStepConfig

mask = typer.Typer(help="Meaningful-perturbation masks (paper 1, 2.3).", no_args_is_help=True)

#: The models and images every mask step works on (:class:`voxplain.config.MaskStepConfig`).
_STEP = ["run", "folds", "diagnosis", "device"]


@mask.command("group")
@config_command(GroupMaskStepConfig, "mask_group",
                _STEP + ["cohort", "mask.l1", "mask.l2", "mask.b1", "mask.b2", "mask.smoothness",
                         "mask.perturbation",
                         "mask.max_epochs", "mask.patience", "mask.batch_size", "mask.qc_step2",
                         *EXECUTOR_FIELDS],
                flags=EXECUTOR_FLAGS)
def mask_group(settings: GroupMaskStepConfig) -> None:
    """One mask per fold for its correctly classified patients (training set; validation set
    for early stopping)."""
    from voxplain.steps.masks import run_group_masks

    with reported_errors(), progress_bar() as bar:
        summary = run_group_masks(settings, progress=bar)
    print_table("Group masks", summary, ["fold", "run", "n_train", "n_validation", "best_epoch",
                                          "probability_before", "probability_after",
                                          "removed", "top_regions"])


@mask.command("session")
@config_command(SessionMaskStepConfig, "mask_session",
                _STEP + ["max_sessions", "cohort", "mask.l1", "mask.l2", "mask.smoothness",
                         "mask.perturbation",
                         "mask.max_iterations", "mask.patience", "mask.batch_size",
                         *SESSION_EXECUTOR_FIELDS],
                flags=EXECUTOR_FLAGS)
def mask_session(settings: SessionMaskStepConfig) -> None:
    """One mask per correctly classified session of each fold's validation subjects, batched."""
    from voxplain.steps.masks import run_session_masks

    with reported_errors(), progress_bar() as bar:
        index = run_session_masks(settings, progress=bar)
    print_table("Session masks", index, ["fold", "participant_id", "session_id", "iterations",
                                          "loss", "probability_after", "flagged"])


@mask.command("grid")
@config_command(MaskGridConfig, "mask_grid",
                _STEP + ["l1", "l2", "b1", "b2", "learning_rate", "mask.smoothness", "design",
                         "mask.max_epochs", "mask.qc_step2", *EXECUTOR_FIELDS],
                flags=EXECUTOR_FLAGS)
def mask_grid_command(settings: MaskGridConfig) -> None:
    """Group masks over a grid of l1, l2, b1, b2 and learning rate (paper 1, 2.3.2 and fig. 4;
    every combination or one hyperparameter at a time), keyed by setting."""
    from voxplain.steps.masks import run_mask_grid

    with reported_errors(), progress_bar() as bar:
        summary = run_mask_grid(settings, progress=bar)
    print_table("Mask grid", summary, ["l1", "l2", "b1", "b2", "learning_rate", "fold", "run",
                                        "probability_after", "top_regions"])
