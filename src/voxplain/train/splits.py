"""Subject-level stratified k-fold cross-validation (paper 1, section 2.2.1).

Subjects, not sessions, are split, so no subject is in two subsets. Stratification uses each
subject's baseline diagnosis (its earliest session, see :func:`session_order`). Training uses
every session of the training subjects; validation and test use one session per subject
(baseline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
from sklearn.model_selection import StratifiedKFold


@dataclass(frozen=True)
class Fold:
    """Sessions of one fold: ``train`` (all sessions) and ``validation`` (baseline only)."""

    index: int
    train: pd.DataFrame
    validation: pd.DataFrame


def session_order(session_id: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key of a session label: its digit runs compare as numbers (natural order).

    ``ses-M6`` and ``ses-M06`` (month 6) both come before ``ses-M12``, which text order would
    put first. Labels without digits compare as text (``ses-bl`` before ``ses-fu``); equal
    numbers fall back to the label's text (``ses-M06`` before ``ses-M6``).
    """
    parts = re.split(r"(\d+)", session_id)  # text, digits, text, ...: the types always align
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), session_id


def baseline_sessions(table: pd.DataFrame) -> pd.DataFrame:
    """One row per subject, sorted by subject: its earliest session in :func:`session_order`
    (ses-M6 before ses-M12)."""
    participants, sessions = table["participant_id"].tolist(), table["session_id"].tolist()
    order = sorted(range(len(table)),
                   key=lambda i: (participants[i], session_order(sessions[i])))
    return table.iloc[order].drop_duplicates("participant_id", keep="first")


def subject_folds(table: pd.DataFrame, n_folds: int, seed: int = 2) -> list[Fold]:
    """Split subjects into ``n_folds`` stratified folds (shuffled with ``seed``).

    Args:
        table: cohort rows with ``participant_id``, ``session_id`` and ``diagnosis``; the index
            is kept in the returned tables so rows can be mapped back to images.
        n_folds: number of folds (>= 2).
        seed: ``random_state`` of the shuffle (paper 1 uses 2 for every experiment).

    Raises:
        ValueError: a diagnosis has fewer subjects than folds.
    """
    subjects = baseline_sessions(table)
    counts = subjects["diagnosis"].value_counts()
    if len(counts) < 2:
        raise ValueError(f"cross-validation needs two diagnoses; all subjects are {counts.index[0]}")
    if counts.min() < n_folds:
        raise ValueError(f"{n_folds}-fold cross-validation needs at least {n_folds} subjects per "
                         f"diagnosis; subjects per diagnosis: {counts.to_dict()}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for index, (train_idx, validation_idx) in enumerate(
            splitter.split(subjects["participant_id"], subjects["diagnosis"])):
        train_subjects = set(subjects["participant_id"].iloc[train_idx])
        folds.append(Fold(
            index=index,
            train=table[table["participant_id"].isin(train_subjects)],
            validation=subjects.iloc[validation_idx].sort_index(),
        ))
    return folds
