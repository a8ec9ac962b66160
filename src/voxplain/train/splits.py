"""Subject-level stratified splits: k-fold cross-validation (paper 1, section 2.2.1) and
repeated random train/validation/test splits (paper 2, section 2.2: 65/15/20, ten times).

Subjects, not sessions, are split, so no subject is in two subsets. Stratification uses each
subject's baseline diagnosis (its earliest session, see :func:`session_order`). Training uses
every session of the training subjects; validation and test use one session per subject
(baseline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split


@dataclass(frozen=True)
class Fold:
    """Sessions of one fold: ``train`` (all sessions), ``validation`` (baseline only) and, for
    a random split, ``test`` (baseline only; None for k-fold)."""

    index: int
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame | None = None


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
    subjects = _two_diagnoses(table)
    counts = subjects["diagnosis"].value_counts()
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


def random_splits(table: pd.DataFrame, n_splits: int,
                  fractions: tuple[float, float, float] = (0.65, 0.15, 0.20),
                  seed: int = 2) -> list[Fold]:
    """``n_splits`` stratified subject-level train/validation/test splits (paper 2: 65/15/20,
    "splitting the whole dataset 10 times consecutively, each with a new portion of samples but
    the same sample size"); split ``i`` is drawn with ``random_state = seed + i``.

    Each subset is stratified by the subjects' baseline diagnosis; test fraction 0 gives
    train/validation splits only (``test`` None).

    Raises:
        ValueError: fractions that do not sum to 1, or a diagnosis with too few subjects to put
            one in every subset.
    """
    train_fraction, validation_fraction, test_fraction = fractions
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    subjects = _two_diagnoses(table)
    counts = subjects["diagnosis"].value_counts()
    needed = 2 + (test_fraction > 0)
    if counts.min() < needed:
        raise ValueError(f"a random split needs at least {needed} subjects per diagnosis (one "
                         f"per subset); subjects per diagnosis: {counts.to_dict()}")
    folds = []
    for index in range(n_splits):
        state = seed + index
        rest, test = (subjects, None) if test_fraction == 0 else train_test_split(
            subjects, test_size=_at_least_one(test_fraction, subjects),
            stratify=subjects["diagnosis"], random_state=state)
        share = validation_fraction / (train_fraction + validation_fraction)
        train, validation = train_test_split(
            rest, test_size=_at_least_one(share, rest), stratify=rest["diagnosis"],
            random_state=state)
        folds.append(Fold(
            index=index,
            train=table[table["participant_id"].isin(set(train["participant_id"]))],
            validation=validation.sort_index(),
            test=None if test is None else test.sort_index(),
        ))
    return folds


def _at_least_one(fraction: float, subjects: pd.DataFrame) -> int:
    """A subset size: ``fraction`` of the subjects, rounded, and at least one per diagnosis
    (stratification needs it)."""
    n_classes = subjects["diagnosis"].nunique()
    return max(n_classes, int(round(fraction * len(subjects))))


def _two_diagnoses(table: pd.DataFrame) -> pd.DataFrame:
    subjects = baseline_sessions(table)
    counts = subjects["diagnosis"].value_counts()
    if len(counts) < 2:
        raise ValueError(f"cross-validation needs two diagnoses; all subjects are {counts.index[0]}")
    return subjects


def matched_test_split(table: pd.DataFrame, n_per_class: int, match: list[str], seed: int = 2,
                       alpha: float = 0.05, max_draws: int = 10_000
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A held-out test set of ``n_per_class`` subjects per diagnosis, matched on ``match``
    columns (paper 1, 2.2.1: "100 randomly chosen age- and sex-matched subjects for each
    diagnostic class ... age and sex distributions between training/validation and test sets
    were not significantly different").

    Subjects (their baseline session's values) are drawn at random, stratified by diagnosis,
    until every balance test has p > ``alpha`` (:func:`balance_tests`): between the classes of
    the test set, and, per class, between its test and remaining subjects. Numeric columns are
    compared with a t-test (two groups) or a one-way ANOVA (more), others with a chi-squared
    test of their contingency table. Draw ``k`` uses ``random_state = seed + k``; the first draw
    that passes is kept.

    Returns:
        ``(test, rest, tests)``: the test subjects' baseline sessions, every session of the other
        subjects, and the balance tests of the kept draw (``comparison, column, test,
        statistic, p``).

    Raises:
        ValueError: a ``match`` column is missing or has empty cells, a diagnosis has fewer than
            ``n_per_class`` subjects plus one, or no draw passes within ``max_draws`` (the
            message gives the best draw's smallest p-value).
    """
    subjects = _two_diagnoses(table)
    for column in match:
        if column not in subjects.columns:
            raise ValueError(f"no column {column!r} to match on; columns are "
                             f"{list(table.columns)}")
        if subjects[column].isna().any():
            row = subjects[subjects[column].isna()].iloc[0]
            raise ValueError(f"{row.participant_id} {row.session_id}: empty {column!r}; every "
                             "subject needs a value to be matched")
    counts = subjects["diagnosis"].value_counts()
    if counts.min() <= n_per_class:
        raise ValueError(f"{n_per_class} test subjects per diagnosis leave none to train on; "
                         f"subjects per diagnosis: {counts.to_dict()}")
    best: tuple[float, pd.DataFrame, pd.DataFrame] | None = None
    for draw in range(max_draws):
        test = subjects.groupby("diagnosis", group_keys=False).sample(
            n=n_per_class, random_state=seed + draw)
        tests = balance_tests(subjects, set(test["participant_id"]), match)
        smallest = float(tests["p"].min()) if len(tests) else 1.0
        if best is None or smallest > best[0]:
            best = (smallest, test, tests)
        if smallest > alpha:
            break
    else:
        raise ValueError(f"no draw of {n_per_class} subjects per diagnosis in {max_draws} is "
                         f"balanced on {match} at p > {alpha} (best draw: smallest p "
                         f"{best[0]:.3g}); lower n_per_class or alpha, or draw more")
    assert best is not None
    _, test, tests = best
    chosen = set(test["participant_id"])
    rest = table[~table["participant_id"].isin(chosen)]
    return test.sort_index(), rest, tests.reset_index(drop=True)


def balance_tests(subjects: pd.DataFrame, test: set[str], match: list[str]) -> pd.DataFrame:
    """Balance tests of one draw: each ``match`` column between the test set's diagnoses, and
    per diagnosis between its test and remaining subjects (see :func:`matched_test_split`)."""
    from scipy import stats

    in_test = subjects["participant_id"].isin(test)
    rows = []

    def compare(comparison: str, column: str, groups: list[pd.Series]) -> None:
        numeric = all(pd.api.types.is_numeric_dtype(g) for g in groups)
        if numeric:
            values = [g.to_numpy(dtype=float) for g in groups]
            if len(values) == 2:
                result = stats.ttest_ind(*values)
                name = "t-test"
            else:
                result = stats.f_oneway(*values)
                name = "one-way ANOVA"
            statistic, p = float(result.statistic), float(result.pvalue)
        else:
            labels = sorted(set().union(*(set(g.astype(str)) for g in groups)))
            table = np.array([[int((g.astype(str) == label).sum()) for label in labels]
                              for g in groups])
            table = table[:, table.sum(0) > 0]
            if table.shape[1] < 2:  # one category everywhere: nothing can differ
                statistic, p, name = 0.0, 1.0, "chi-squared"
            else:
                statistic, p = (float(v) for v in stats.chi2_contingency(table)[:2])
                name = "chi-squared"
        rows.append({"comparison": comparison, "column": column, "test": name,
                     "statistic": statistic, "p": 1.0 if np.isnan(p) else p})

    diagnoses = sorted(subjects["diagnosis"].unique())
    for column in match:
        compare("test: " + " vs ".join(diagnoses), column,
                [subjects.loc[in_test & (subjects["diagnosis"] == d), column] for d in diagnoses])
        for diagnosis in diagnoses:
            of_class = subjects["diagnosis"] == diagnosis
            compare(f"{diagnosis}: test vs rest", column,
                    [subjects.loc[of_class & in_test, column],
                     subjects.loc[of_class & ~in_test, column]])
    return pd.DataFrame(rows)
