"""A held-out test set matched on age and sex (paper 1, 2.2.1): `voxplain split test`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import SplitTestConfig
from voxplain.data.cohort import CohortError
from voxplain.io import read_tsv
from voxplain.steps.split import run_split_test
from voxplain.train.splits import balance_tests, matched_test_split


def cohort(n: int = 120, seed: int = 0, age_gap: float = 6.0) -> pd.DataFrame:
    """AD patients older than controls on average (a real cohort's confound), two sessions."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n):
        diagnosis = "AD" if s % 2 else "CN"
        age = rng.normal(72 + (age_gap if diagnosis == "AD" else 0), 6)
        sex = "F" if rng.random() < (0.6 if diagnosis == "CN" else 0.45) else "M"
        for k in range(2):
            rows.append({"participant_id": f"sub-{s:03d}", "session_id": f"ses-M{12 * k:02d}",
                         "diagnosis": diagnosis, "age": round(age + k, 1), "sex": sex,
                         "path": f"sub-{s:03d}_{k}.nii.gz"})
    return pd.DataFrame(rows)


def test_the_test_set_is_matched_on_age_and_sex_and_leaves_no_subject_in_both():
    table = cohort()
    test, rest, tests = matched_test_split(table, 20, ["age", "sex"], seed=2)
    assert test.diagnosis.value_counts().to_dict() == {"AD": 20, "CN": 20}
    assert test.participant_id.is_unique and set(test.session_id) == {"ses-M00"}
    assert not set(test.participant_id) & set(rest.participant_id)
    assert len(rest) == len(table) - 2 * 40  # every session of the other subjects
    assert (tests.p > 0.05).all() and len(tests) == 6  # 2 columns x (between + 2 per class)
    # the balance between the test classes, recomputed with scipy directly
    ages = [test.age[test.diagnosis == d].to_numpy() for d in ("AD", "CN")]
    between = tests[(tests.column == "age") & tests.comparison.str.startswith("test")]
    assert between.p.iloc[0] == pytest.approx(stats.ttest_ind(*ages).pvalue)
    sexes = pd.crosstab(test.diagnosis, test.sex).loc[["AD", "CN"]].to_numpy()
    chi = tests[(tests.column == "sex") & tests.comparison.str.startswith("test")]
    assert chi.p.iloc[0] == pytest.approx(stats.chi2_contingency(sexes)[1])
    again = matched_test_split(table, 20, ["age", "sex"], seed=2)[0]
    assert list(again.participant_id) == list(test.participant_id)


def test_an_unmatched_random_draw_would_fail_the_age_test():
    # the check is not vacuous: in this cohort a plain stratified draw is usually unbalanced
    table = cohort(age_gap=10.0)
    subjects = table.drop_duplicates("participant_id")
    draw = subjects.groupby("diagnosis", group_keys=False).sample(n=20, random_state=0)
    tests = balance_tests(subjects, set(draw.participant_id), ["age"])
    assert tests.p.min() < 0.05


def test_bad_requests_are_clear_errors(tmp_path):
    table = cohort(n=20)
    with pytest.raises(ValueError, match="leave none to train on"):
        matched_test_split(table, 10, ["age"])
    with pytest.raises(ValueError, match="no column 'mmse'"):
        matched_test_split(table, 2, ["mmse"])
    with pytest.raises(ValueError, match="no draw .* is balanced"):
        matched_test_split(cohort(n=40, age_gap=30.0), 15, ["age"], max_draws=20)
    tsv = tmp_path / "test.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(CohortError, match="overwrite its own cohort TSV"):
        run_split_test(SplitTestConfig(cohort=tsv, out=tmp_path, n_per_class=2))


def test_the_cli_writes_the_three_tables(tmp_path):
    tsv = tmp_path / "cohort.tsv"
    cohort(n=60).to_csv(tsv, sep="\t", index=False)
    result = CliRunner().invoke(app, ["split", "test", "--cohort", str(tsv), "--out",
                                      str(tmp_path / "split"), "--n-per-class", "10"])
    assert result.exit_code == 0, result.output
    test = read_tsv(tmp_path / "split" / "test.tsv")
    train = read_tsv(tmp_path / "split" / "train.tsv")
    assert len(test) == 20 and set(train.participant_id).isdisjoint(test.participant_id)
    assert (read_tsv(tmp_path / "split" / "balance.tsv").p > 0.05).all()
    assert all(path.startswith("/") for path in test.path)  # usable from any folder
