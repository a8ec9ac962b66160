"""Misclassified-slice analysis of 2D slice models built from volumes (paper 2, 3.5).

A slice model classifies every slice of a session; paper 2 then lists, per subject, the slice
indices whose prediction is wrong and the class they went to ("slices 45, 46, 48, 49, 89, 99 and
100 of an SPMS patient were classified RRMS"), to look at their heatmaps. The input is a
prediction table with one row per slice: ``participant_id``, ``session_id``, a slice index
column, the true class (``diagnosis``) and the predicted class (``predicted``, or else the class
of the highest ``proba_CLASS`` column). ``fold`` and ``run`` columns, when present, keep the
models apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

SESSION_KEYS = ["participant_id", "session_id"]


def misclassified_slices(predictions: pd.DataFrame, *, slice_column: str = "slice",
                         true_column: str = "diagnosis", predicted_column: str = "predicted",
                         source: str = "predictions") -> pd.DataFrame:
    """One row per misclassified slice, tidy.

    Returns:
        Columns: the model columns present (``fold``, ``run``), ``participant_id``,
        ``session_id``, ``slice``, ``true``, ``predicted`` and, when the table has
        ``proba_CLASS`` columns, ``probability`` (of the predicted class); sorted by model,
        subject, session and slice.
    """
    table = _checked(predictions, slice_column, true_column, predicted_column, source)
    wrong = table[table["true"] != table["predicted"]]
    order = [*_model_keys(table), *SESSION_KEYS, "slice"]
    columns = [*order, "true", "predicted", *(["probability"] if "probability" in table else [])]
    return wrong.sort_values(order)[columns].reset_index(drop=True)


def slice_summary(predictions: pd.DataFrame, *, slice_column: str = "slice",
                  true_column: str = "diagnosis", predicted_column: str = "predicted",
                  source: str = "predictions") -> pd.DataFrame:
    """Per model, subject and session: how many slices are wrong, which, and to which class.

    Returns:
        Columns: model columns, ``participant_id``, ``session_id``, ``true``, ``n_slices``,
        ``n_misclassified``, ``fraction_misclassified``, ``misclassified_as`` (e.g.
        ``"RRMS: 45-46, 48-49; CN: 64"``: slice ranges per wrong class, classes in order of
        first slice), ``majority_vote`` (most frequent predicted class over the session's slices;
        ties: the class predicted first in slice order) and ``vote_correct``.
    """
    table = _checked(predictions, slice_column, true_column, predicted_column, source)
    keys = [*_model_keys(table), *SESSION_KEYS]
    records = []
    for key, session in table.sort_values([*keys, "slice"]).groupby(keys, sort=True):
        wrong = session[session["true"] != session["predicted"]]
        by_class = [f"{name}: {slice_ranges(group['slice'])}"
                    for name, group in sorted(wrong.groupby("predicted"),
                                              key=lambda item: item[1]["slice"].min())]
        counts = session["predicted"].value_counts(sort=False)
        first = {name: i for i, name in enumerate(dict.fromkeys(session["predicted"]))}
        vote = max(counts.index, key=lambda name: (counts[name], -first[name]))
        true = session["true"].iloc[0]
        records.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                        "true": true, "n_slices": len(session), "n_misclassified": len(wrong),
                        "fraction_misclassified": len(wrong) / len(session),
                        "misclassified_as": "; ".join(by_class), "majority_vote": vote,
                        "vote_correct": vote == true})
    return pd.DataFrame(records)


def slice_ranges(indices: Sequence[int]) -> str:
    """Sorted indices as ranges of consecutive values: ``[45, 46, 48, 89]`` -> ``"45-46, 48, 89"``."""
    values = np.unique(np.asarray(indices, dtype=np.int64))
    if not len(values):
        return ""
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    runs = np.split(values, breaks)
    return ", ".join(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _model_keys(table: pd.DataFrame) -> list[str]:
    return [c for c in ("fold", "run") if c in table.columns]


def _checked(predictions: pd.DataFrame, slice_column: str, true_column: str,
             predicted_column: str, source: str) -> pd.DataFrame:
    """A copy with columns ``slice``, ``true``, ``predicted`` (and ``probability``)."""
    probability_columns = [c for c in predictions.columns if c.startswith("proba_")]
    needed = [*SESSION_KEYS, slice_column, true_column]
    if predicted_column not in predictions.columns and not probability_columns:
        needed.append(predicted_column)
    missing = [c for c in needed if c not in predictions.columns]
    if missing:
        raise ValueError(f"{source}: a slice prediction table needs columns {missing} "
                         f"(found {list(predictions.columns)})")
    slices = pd.to_numeric(predictions[slice_column], errors="coerce")
    if slices.isna().any() or (slices != slices.round()).any():
        raise ValueError(f"{source}: column {slice_column!r} must hold integer slice indices")
    table = predictions.assign(slice=slices.astype(np.int64),
                         true=predictions[true_column].astype(str))
    classes = [c.removeprefix("proba_") for c in probability_columns]
    if predicted_column in predictions.columns:
        table["predicted"] = predictions[predicted_column].astype(str)
    else:
        table["predicted"] = np.array(classes)[predictions[probability_columns].to_numpy().argmax(1)]
    if probability_columns:
        unknown = sorted(set(table["predicted"]) - set(classes))
        if unknown:
            raise ValueError(f"{source}: predicted class {unknown[0]!r} has no proba_ column")
        column = table["predicted"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        table["probability"] = predictions[probability_columns].to_numpy()[np.arange(len(table)),
                                                                           column]
    duplicated = table.duplicated([*_model_keys(table), *SESSION_KEYS, "slice"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise ValueError(f"{source}: {row.participant_id} {row.session_id} slice {row.slice} "
                         f"appears more than once")
    return table
