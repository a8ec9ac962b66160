"""Misclassified-slice analysis of paper 2, 3.5."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from voxplain.evaluate.slices import misclassified_slices, slice_ranges, slice_summary


def paper_example() -> pd.DataFrame:
    """An SPMS subject whose slices 45, 46, 48, 49, 89, 99, 100 go to RRMS (paper 2, 3.5) and an
    RRMS subject with slices 63, 64 to control and 49-51 to SPMS, among slices 40..110."""
    rows = []
    spms_wrong = {45, 46, 48, 49, 89, 99, 100}
    rrms_wrong = {63: "control", 64: "control", 49: "SPMS", 50: "SPMS", 51: "SPMS"}
    for index in range(110, 39, -1):  # not in slice order: the analysis sorts
        rows.append({"participant_id": "sub-01", "session_id": "ses-M00", "slice": index,
                     "diagnosis": "SPMS", "predicted": "RRMS" if index in spms_wrong else "SPMS"})
        rows.append({"participant_id": "sub-02", "session_id": "ses-M00", "slice": index,
                     "diagnosis": "RRMS", "predicted": rrms_wrong.get(index, "RRMS")})
    return pd.DataFrame(rows)


def test_misclassified_slices_lists_each_wrong_slice_and_its_class():
    wrong = misclassified_slices(paper_example())
    spms = wrong[wrong.participant_id == "sub-01"]
    assert list(spms["slice"]) == [45, 46, 48, 49, 89, 99, 100]
    assert set(spms["predicted"]) == {"RRMS"} and set(spms["true"]) == {"SPMS"}
    rrms = wrong[wrong.participant_id == "sub-02"]
    assert list(zip(rrms["slice"], rrms["predicted"])) == [
        (49, "SPMS"), (50, "SPMS"), (51, "SPMS"), (63, "control"), (64, "control")]
    assert "probability" not in wrong.columns


def test_slice_summary_counts_ranges_and_majority_vote():
    summary = slice_summary(paper_example()).set_index("participant_id")
    assert summary.loc["sub-01", "n_slices"] == 71
    assert summary.loc["sub-01", "n_misclassified"] == 7
    assert summary.loc["sub-01", "fraction_misclassified"] == pytest.approx(7 / 71)
    assert summary.loc["sub-01", "misclassified_as"] == "RRMS: 45-46, 48-49, 89, 99-100"
    assert summary.loc["sub-02", "misclassified_as"] == "SPMS: 49-51; control: 63-64"
    assert summary.loc["sub-01", "majority_vote"] == "SPMS"
    assert summary["vote_correct"].all()


def test_predicted_class_from_probabilities_and_models_kept_apart():
    table = pd.DataFrame({
        "participant_id": "sub-01", "session_id": "ses-M00", "slice": [0, 1, 2, 0, 1, 2],
        "diagnosis": "AD", "fold": [0, 0, 0, 1, 1, 1],
        "proba_CN": [0.9, 0.2, 0.6, 0.1, 0.3, 0.2], "proba_AD": [0.1, 0.8, 0.4, 0.9, 0.7, 0.8]})
    wrong = misclassified_slices(table)
    assert list(zip(wrong["fold"], wrong["slice"])) == [(0, 0), (0, 2)]
    assert wrong["probability"].tolist() == pytest.approx([0.9, 0.6])
    summary = slice_summary(table).set_index("fold")
    assert summary.loc[0, "majority_vote"] == "CN" and not summary.loc[0, "vote_correct"]
    assert summary.loc[1, "n_misclassified"] == 0 and summary.loc[1, "misclassified_as"] == ""


def test_tie_in_the_vote_goes_to_the_class_predicted_first():
    table = pd.DataFrame({"participant_id": "sub-01", "session_id": "ses-M00",
                          "slice": [3, 1, 2, 4], "diagnosis": "A",
                          "predicted": ["A", "B", "B", "A"]})
    assert slice_summary(table)["majority_vote"].iloc[0] == "B"


def test_slice_ranges():
    assert slice_ranges([100, 45, 46, 48, 49, 89, 99]) == "45-46, 48-49, 89, 99-100"
    assert slice_ranges(np.array([7])) == "7" and slice_ranges([]) == ""


def test_bad_tables_are_rejected_naming_the_problem():
    table = paper_example()
    with pytest.raises(ValueError, match="x.tsv: a slice prediction table needs columns "
                                         "\\['slice_index'\\]"):
        slice_summary(table, slice_column="slice_index", source="x.tsv")
    with pytest.raises(ValueError, match="sub-01 ses-M00 slice 110 appears more than once"):
        misclassified_slices(pd.concat([table, table.iloc[:1]]))
    with pytest.raises(ValueError, match="integer slice indices"):
        misclassified_slices(table.assign(slice=0.5))
