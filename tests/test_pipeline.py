"""``voxplain run PIPELINE.toml``: steps in file order, validated before anything runs, each
recording its settings so that ``voxplain run RUN/config.toml`` redoes the run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import write_cohort
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import read_toml
from voxplain.io import read_tsv
from voxplain.steps.pipeline import STEPS, PipelineError, read_pipeline, run_pipeline, step_name

REPOSITORY = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_the_demo_pipeline_is_valid_and_runs_the_steps_in_file_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to where `voxplain run` starts
    planned = read_pipeline(REPOSITORY / "pipelines" / "demo.toml")
    assert [step.name for step in planned] == [
        "generate_atrophy", "train", "mask_group", "mask_session", *["explain"] * 4,
        "evaluate_localisation", "evaluate_faithfulness", "evaluate_classification",
        "evaluate_robustness", "stats", "report"]
    explain = [step.config.explain.method for step in planned if step.name == "explain"]
    assert explain == ["grad_cam", "grad_cam_pp", "hires_cam", "integrated_gradients"]
    assert [step.config.explain.baseline_class for step in planned
            if step.name == "explain"] == [None, None, "CN", "CN"]
    train = planned[1].config
    assert train.run == tmp_path / "demo" / "run" and train.n_folds == 5
    assert planned[2].config.mask.max_epochs == 50  # a key of [mask] written in [mask_group]
    assert planned[3].config.folds == [0] and planned[3].config.max_sessions == 8


def test_the_paper_2_pipeline_is_valid_and_trains_each_network_into_its_own_run(monkeypatch,
                                                                                tmp_path):
    monkeypatch.chdir(tmp_path)
    planned = read_pipeline(REPOSITORY / "pipelines" / "paper2.toml")
    trains = [step.config for step in planned if step.name == "train"]
    assert [(t.model.name, t.model.head) for t in trains] == [
        ("vgg19", "gap"), ("vgg16", "gap"), ("vgg19", "fc"), ("resnet50", "gap"),
        ("resnet50", "fc")]
    assert len({t.run for t in trains}) == 5
    for train in trains:
        assert train.sequences == ["t1", "t2", "flair"] and train.slice_axis == "axial"
        assert train.split == "random" and train.split_fractions == (0.65, 0.15, 0.2)
    explain = [step.config for step in planned if step.name == "explain"]
    assert {e.explain.method for e in explain} == {"cam", "grad_cam", "grad_cam_pp"}
    assert all(e.subset == "test" and e.explain.min_layer_size == 3 for e in explain)
    on_vgg19 = [e.explain.method for e in explain if e.run == tmp_path / "paper2" / "vgg19_gap"]
    assert sorted(on_vgg19) == sorted(["cam", "grad_cam", "grad_cam_pp"] * 2)
    grad_cam_runs = {e.run.name for e in explain if e.explain.method == "grad_cam"}
    assert grad_cam_runs == {t.run.name for t in trains}  # Grad-CAM on every network
    report = [step.config for step in planned if step.name == "report"][0]
    assert report.compare == [tmp_path / "paper2" / n for n in
                              ("vgg16_gap", "vgg19_fc", "resnet50_gap", "resnet50_fc")]


def test_tables_named_verb_suffix_run_that_verb():
    assert step_name("explain_grad_cam_layer-features.1") == "explain"
    assert step_name("stats_integrated_gradients") == "stats"
    assert step_name("mask_group") == "mask_group"
    assert step_name("evaluate_robustness") == "evaluate_robustness"
    assert step_name("masks") is None
    assert set(STEPS) >= {"train", "explain", "mask_group", "evaluate_localisation", "report"}


@pytest.mark.parametrize("text, message", [
    ('[trian]\ncohort = "a.tsv"\n', r"bad.toml \[trian\]: unknown step"),
    ('[train]\ncohort = "a.tsv"\nrun = "r"\nepoch = 3\n',
     r"bad.toml \[train\] epoch: unknown setting of the train step"),
    ('[train]\ncohort = "a.tsv"\nrun = "r"\nepochs = "many"\n',
     r"bad.toml \[train\] epochs: Input should be a valid integer"),
    ('rn = "r"\n[train]\ncohort = "a.tsv"\nrun = "r"\n',
     r"bad.toml rn: a top-level setting no step of the file has"),
    ('[mask_group]\nmax_epoch = 3\nrun = "r"\n', r"\[mask_group\] max_epoch: unknown setting"),
    ('[train\n', r"bad.toml: not valid TOML"),
    ('run = "r"\n', r"bad.toml: no step"),
])
def test_a_bad_pipeline_is_one_error_naming_the_file_the_table_and_the_key(tmp_path, text,
                                                                           message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message):
        read_pipeline(path)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_run_folders_config_redoes_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cohort(tmp_path / "cohort", subjects=12)
    (tmp_path / "pipeline.toml").write_text("""
run = "first"
device = "cpu"

[train]
cohort = "cohort/cohort.tsv"
n_folds = 2
epochs = 2
batch_size = 4
channels = [4, 8, 8]

[explain]
method = ["grad_cam", "saliency"]
folds = [0]

[evaluate_classification]
n_boot = 20
""")
    results = run_pipeline(tmp_path / "pipeline.toml")
    assert [step.label for step, _ in results] == [
        "[train]", "[explain] grad_cam", "[explain] saliency", "[evaluate_classification]"]
    first = tmp_path / "first"
    recorded = read_toml(first / "config.toml")
    assert list(recorded) == ["train", "explain_grad_cam", "explain_saliency",
                              "evaluate_classification"]
    assert recorded["train"]["run"] == str(first)  # absolute: the file still holds elsewhere
    # the recorded settings are a pipeline: into a new folder, the same results
    result = runner.invoke(app, ["run", str(first / "config.toml"), "--run", "second"],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "step 1 of 4: [train]" in result.output  # the table's name, not read as markup
    assert "step 2 of 4: [explain_grad_cam] grad_cam" in result.output
    second = tmp_path / "second"
    for name in ("cross_validation.tsv", "classification.tsv"):
        pd.testing.assert_frame_equal(read_tsv(first / "evaluation" / name),
                                      read_tsv(second / "evaluation" / name))
    maps = sorted(p.relative_to(first) for p in (first / "explanations").rglob("*.nii.gz"))
    assert maps == sorted(p.relative_to(second) for p in (second / "explanations").rglob("*.nii.gz"))
    # run again: every step resumes (nothing to do) and nothing is refused
    again = runner.invoke(app, ["run", str(second / "config.toml")])
    assert again.exit_code == 0, again.output
