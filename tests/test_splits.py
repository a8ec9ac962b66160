"""Baseline sessions: the earliest session of each subject, sessions compared by their number."""

from __future__ import annotations

import pandas as pd

from voxplain.train.splits import baseline_sessions, session_order


def _sessions(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"participant_id": [p for p, _ in pairs],
                         "session_id": [s for _, s in pairs], "diagnosis": "AD"})


def test_baseline_is_the_earliest_month_not_the_first_text():
    table = _sessions([("sub-01", "ses-M12"), ("sub-01", "ses-M6"),
                       ("sub-02", "ses-M108"), ("sub-02", "ses-M24"),
                       ("sub-03", "ses-M18"), ("sub-03", "ses-M06")])
    baseline = baseline_sessions(table)
    assert baseline.participant_id.tolist() == ["sub-01", "sub-02", "sub-03"]
    assert baseline.session_id.tolist() == ["ses-M6", "ses-M24", "ses-M06"]


def test_padded_and_unpadded_months_sort_together_and_labels_without_digits_as_text():
    labels = ["ses-M12", "ses-fu", "ses-M6", "ses-bl", "ses-M00", "ses-M06", "ses-M3"]
    assert sorted(labels, key=session_order) == ["ses-M00", "ses-M3", "ses-M06", "ses-M6",
                                                 "ses-M12", "ses-bl", "ses-fu"]
    baseline = baseline_sessions(_sessions([("sub-01", "ses-fu"), ("sub-01", "ses-bl")]))
    assert baseline.session_id.tolist() == ["ses-bl"]
