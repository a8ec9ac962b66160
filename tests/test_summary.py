"""``voxplain summary``: headline tables read from a run folder, absent steps left out."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.report.summary import run_summary


def _write(path, frame):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)


def test_summary_averages_localisation_over_folds_and_skips_absent_steps(tmp_path):
    (tmp_path / "config.toml").write_text("")
    assert run_summary(tmp_path) == {}
    _write(tmp_path / "evaluation/localisation.tsv", pd.DataFrame({
        "key": ["grad_cam", "grad_cam", "saliency"], "diagnosis": "AD", "method": "x",
        "fold": [0, 1, 0], "auc": [0.6, 0.8, 0.9], "mass_inside": [0.2, 0.4, 0.5],
        "pointing_game": [0.0, 1.0, 1.0], "top5_hit": [0.2, 0.6, 1.0]}))
    summary = run_summary(tmp_path)
    assert list(summary) == ["Localisation against the ground truth (mean over folds)"]
    table = summary["Localisation against the ground truth (mean over folds)"].set_index("key")
    assert table.loc["grad_cam", "auc"] == pytest.approx(0.7)
    assert table.loc["grad_cam", "top5_hit"] == pytest.approx(0.4)
    assert table.loc["saliency", "mass_inside"] == pytest.approx(0.5)


def test_summary_lists_mask_regions_and_mean_classification(tmp_path):
    (tmp_path / "config.toml").write_text("")
    folder = tmp_path / "masks/group/fold-0/run-0"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "fold": 0, "run": 0, "diagnosis": "AD", "probability_before": 0.9,
        "probability_after": 0.05, "top_regions": ["Hippocampus_L", "Amygdala_R"]}))
    _write(tmp_path / "evaluation/classification.tsv", pd.DataFrame({
        "scope": ["fold", "mean", "mean"], "fold": [0, None, None], "run": 0,
        "metric": ["accuracy", "accuracy", "ppv"], "value": [0.8, 0.8, 0.7],
        "ci_low": [0.6, 0.6, 0.5], "ci_high": [0.9, 0.9, 0.8], "per_fold": ["", "0.8", "0.7"]}))
    summary = run_summary(tmp_path)
    classification = summary["Classification (mean over folds, bootstrap 95% CI)"]
    assert classification.metric.tolist() == ["accuracy"]  # fold rows and unlisted metrics out
    masks = summary["Group masks"]
    assert masks.top_regions.iloc[0] == ["Hippocampus_L", "Amygdala_R"]
    result = CliRunner().invoke(app, ["summary", "--run", str(tmp_path)])
    assert result.exit_code == 0 and "Hippocampus_L" in result.output


def test_summary_of_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["summary", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
