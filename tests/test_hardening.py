"""Hardening of the run folder and the command line (issue 16): nothing outside the run folder
is written, nothing already written is lost, bad input gets one line naming the file."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import voxplain.run.folder as run_module
from conftest import AFFINE, write_cohort
from voxplain.cli import app
from voxplain.config import to_toml
from voxplain.config import (ExplainStepConfig, PredictConfig, ReportConfig,
                             SessionMaskStepConfig, TrainConfig)
from voxplain.steps.explain import run_explain
from voxplain.report.html import build_report
from voxplain.run import RunFolder, RunFolderError
from voxplain.steps.predict import run_predict
from voxplain.steps.train import run_train

runner = CliRunner()
TINY = {"name": "cnn", "channels": [4, 8, 8]}


def _train(cohort: Path, out: Path, **changes) -> None:
    run_train(TrainConfig.model_validate({
        "cohort": cohort, "out": out, "folds": 2, "epochs": 1, "batch_size": 4,
        "device": "cpu", "model": TINY, **changes}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening")
    _train(write_cohort(folder / "cohort", subjects=8, sessions=1), folder / "run")
    return folder / "run"


def _copy_cohort(source: Path, target: Path, **columns) -> Path:
    """The fixture cohort's TSV rewritten with absolute paths (and changed columns)."""
    table = pd.read_csv(source, sep="\t")
    table["path"] = [str(source.parent / path) for path in table.path]
    for column, value in columns.items():
        table[column] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(target, sep="\t", index=False)
    return target


# --- item 1: no writer leaves the run folder ----------------------------------------------

def test_a_path_outside_the_run_folder_is_refused(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.inside(run.root / "explanations" / "x.nii.gz").name == "x.nii.gz"
    with pytest.raises(RunFolderError, match="refusing to write outside the run folder"):
        run.inside(run.root / "explanations" / ".." / ".." / "victim.nii.gz")


def test_a_diagnosis_that_escapes_the_run_folder_writes_no_group_map_outside(trained, tmp_path):
    """The group map is named after the diagnosis: a label with '..' and '/' must not write
    into another folder (an input folder, here)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    escape = "/".join([".."] * 8) + f"{victim}/image"
    cohort = _copy_cohort(trained.parent / "cohort" / "cohort.tsv", tmp_path / "other.tsv",
                          diagnosis=escape)
    with pytest.raises(RunFolderError, match="outside the run folder"):
        run_explain(ExplainStepConfig(run=trained, cohort=cohort, folds=[0], device="cpu",
                                      explain={"method": "saliency", "target": "predicted",
                                               "group": "all"}))
    assert not any(victim.iterdir())


# --- item 2: report --out removes only what it wrote --------------------------------------

def test_report_out_refuses_a_foreign_folder_and_keeps_files_it_did_not_write(trained, tmp_path):
    foreign = tmp_path / "paper"
    (foreign / "figures").mkdir(parents=True)
    (foreign / "figures" / "fig1.png").write_bytes(b"mine")
    (foreign / "index.html").write_text("my page")
    with pytest.raises(RunFolderError, match="no voxplain report wrote"):
        build_report(ReportConfig(run=trained, out=foreign, max_viewers=0))
    assert (foreign / "index.html").read_text() == "my page"
    assert (foreign / "figures" / "fig1.png").read_bytes() == b"mine"
    out = tmp_path / "report"
    build_report(ReportConfig(run=trained, out=out, max_viewers=0))
    (out / "figures" / "notes.txt").write_text("added by hand")
    manifest = json.loads((out / ".voxplain-report.json").read_text())
    manifest["files"].append("figures/old_figure.png")  # written by an earlier rendering
    (out / ".voxplain-report.json").write_text(json.dumps(manifest))
    (out / "figures" / "old_figure.png").write_bytes(b"stale")
    build_report(ReportConfig(run=trained, out=out, max_viewers=0))
    assert (out / "figures" / "notes.txt").read_text() == "added by hand"
    assert not (out / "figures" / "old_figure.png").exists()


# --- item 3: predictions of two cohorts never share a file --------------------------------

def test_predictions_of_two_cohorts_called_cohort_tsv_go_to_two_files(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="voxplain")
    source = trained.parent / "cohort" / "cohort.tsv"
    first = _copy_cohort(source, tmp_path / "site-a" / "cohort.tsv")
    second = _copy_cohort(source, tmp_path / "site-b" / "cohort.tsv")
    for cohort in (first, second):
        run_predict(PredictConfig(run=trained, cohort=cohort, device="cpu"))
    written = sorted((trained / "predictions").glob("*.tsv"))
    assert len(written) == 2 and written[0].name != written[1].name
    assert all(str(path) in caplog.text for path in written)  # says where they went


# --- item 4: concurrent steps keep every recorded section ---------------------------------

def test_concurrent_steps_on_one_run_folder_keep_every_section(tmp_path, monkeypatch):
    """Six steps record their sections at once; a slow write widens the window in which a
    read-modify-write without a lock loses a section."""
    slow_write = run_module.write_text

    def write_slowly(path, text):
        time.sleep(0.05)
        slow_write(path, text)

    monkeypatch.setattr(run_module, "write_text", write_slowly)
    run = RunFolder(tmp_path / "run")
    threads = [threading.Thread(target=run.record_config, args=(
        f"mask_session_{i}", SessionMaskStepConfig(run=run.root, max_sessions=i + 1)))
        for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(run.read_config()) == [f"mask_session_{i}" for i in range(6)]
    assert sorted(json.loads((run.root / "environment.json").read_text())) == \
        [f"mask_session_{i}" for i in range(6)]


# --- item 7: the splits of a run folder cannot change --------------------------------------

def test_another_number_of_folds_on_an_existing_run_is_refused(trained):
    config = TrainConfig.model_validate({**RunFolder(trained).read_config()["train"], "n_folds": 3})
    with pytest.raises(RunFolderError, match=r"n_folds: 2 -> 3"):
        run_train(config)
    assert sorted(p.name for p in (trained / "splits").iterdir()) == ["fold-0", "fold-1"]


# --- item 8: images on another grid than the training grid ---------------------------------

@pytest.mark.parametrize("change", ["cropped", "flipped", "shifted"])
def test_explain_and_predict_refuse_a_cohort_off_the_training_grid(trained, tmp_path, change):
    source = trained.parent / "cohort"
    table = pd.read_csv(source / "cohort.tsv", sep="\t")
    folder = tmp_path / change
    folder.mkdir()
    for path in table.path:
        image = nib.load(source / path)
        data, affine = np.asarray(image.dataobj), image.affine.copy()
        if change == "cropped":
            data = data[1:]
        elif change == "flipped":
            affine[0, 0] = -affine[0, 0]
        else:
            affine[:3, 3] += 30.0
        nib.save(nib.Nifti1Image(data, affine), folder / path)
    table.to_csv(folder / "cohort.tsv", sep="\t", index=False)
    message = "models of" if change == "cropped" else "affine .* differs from the training grid"
    with pytest.raises(RunFolderError, match=message):
        run_explain(ExplainStepConfig(run=trained, cohort=folder / "cohort.tsv", folds=[0],
                                      device="cpu", explain={"method": "saliency"}))
    with pytest.raises(RunFolderError, match=message):
        run_predict(PredictConfig(run=trained, cohort=folder / "cohort.tsv", device="cpu"))


def test_the_training_grid_is_recorded(trained):
    grid, channels = RunFolder(trained).training_grid()
    assert grid.shape == (20, 24, 20) and channels == 1
    np.testing.assert_allclose(grid.affine, AFFINE)


# --- item 12: leftovers of killed writers ---------------------------------------------------

def test_the_report_ignores_leftover_temporary_files_and_steps_remove_their_own(trained,
                                                                               tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    robustness = run / "evaluation" / "robustness"
    robustness.mkdir(parents=True, exist_ok=True)
    (robustness / "summary.tsv").write_text("method\texperiment\nsaliency\tinter-fold\n")
    (robustness / ".summary.k2j4h6g8.tsv").write_text("")  # empty: left by a kill
    (robustness / ".summary.a1b2c3d4.tsv").write_text("method\tleft\nx\ty\n")
    page = build_report(ReportConfig(run=run, max_viewers=0)).read_text()
    assert ".summary.a1b2c3d4" not in page and "summary.k2j4h6g8" not in page
    leftover = run / "explanations" / "saliency" / "fold-0" / "run-0" / ".sub-00_ses-M00.x1y2z3w4.nii.gz"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half written")
    run_explain(ExplainStepConfig(run=run, folds=[0], device="cpu",
                                  explain={"method": "saliency"}))
    assert not leftover.exists()


# --- item 13: one line naming the file, not a traceback ------------------------------------

def _one_error_line(result) -> str:
    """The error line of a command that failed with status 2 (progress bars aside)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_a_missing_or_invalid_config_file_is_one_line(tmp_path):
    line = _one_error_line(runner.invoke(app, ["train", "--config", str(tmp_path / "no.toml")],
                                         env={"COLUMNS": "400"}))
    assert "no.toml: configuration file not found" in line
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\ncohort = 1\n")
    line = _one_error_line(runner.invoke(app, ["train", "--config", str(bad)],
                                         env={"COLUMNS": "400"}))
    assert "bad.toml: not valid TOML" in line


@pytest.mark.parametrize("tamper, message", [
    (lambda d: {**d, "classes": ["CN", "AD", "MCI"]}, "3 classes .* 2 outputs"),
    (lambda d: {k: v for k, v in d.items() if k != "model"}, "no 'model' entry"),
    (lambda d: [d], "expected a JSON object, got list"),
    (lambda d: {**d, "classes": "CN"}, "'classes' must be a JSON list"),
    (lambda d: {**d, "model": {**d["model"], "channels": [3]}}, "do not fit the network"),
])
def test_a_tampered_model_json_is_one_line_naming_the_file(trained, tmp_path, tamper, message):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "models" / "fold-0" / "run-0" / "model.json"
    path.write_text(json.dumps(tamper(json.loads(path.read_text()))))
    cohort = trained.parent / "cohort" / "cohort.tsv"
    line = _one_error_line(runner.invoke(app, ["predict", "--run", str(run), "--cohort",
                                               str(cohort), "--device", "cpu"],
                                         env={"COLUMNS": "400"}))
    assert str(path) in line or str(path.with_name("model.safetensors")) in line, line
    assert re.search(message, line), line


# --- item 14: a failed train records nothing; a copied run folder resumes ------------------

def test_a_failed_train_records_nothing_so_the_corrected_command_runs(tmp_path):
    good = write_cohort(tmp_path / "cohort", subjects=8, sessions=1)
    bad = _copy_cohort(good, tmp_path / "bad.tsv")
    table = pd.read_csv(bad, sep="\t")
    table.loc[0, "path"] = str(tmp_path / "missing.nii.gz")
    table.to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="missing.nii.gz"):
        _train(bad, tmp_path / "run")
    assert not (tmp_path / "run" / "config.toml").exists()
    _train(good, tmp_path / "run")  # the corrected command is not refused
    assert RunFolder(tmp_path / "run").model_dirs()


def test_a_run_folder_of_the_earlier_spelling_resumes_training(trained, tmp_path):
    """[train] written before `folds` became `n_folds` and `out` became `run` still resumes
    (and still refuses another number of folds)."""
    copy = tmp_path / "old"
    shutil.copytree(trained, copy)
    sections = RunFolder(copy).read_config()
    train = dict(sections["train"])
    train["folds"], train["out"] = train.pop("n_folds"), train.pop("run")
    (copy / "config.toml").write_text(to_toml({**sections, "train": train}))
    config = TrainConfig.model_validate({**train, "out": copy})
    assert sorted(run_train(config).fold.unique()) == [0, 1]
    with pytest.raises(RunFolderError, match=r"n_folds: 2 -> 3"):
        run_train(config.model_copy(update={"n_folds": 3}))


def test_a_copied_run_folder_resumes_training(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    for folder in (copy / "models" / "fold-1").glob("run-*"):
        (folder / "metrics.tsv").unlink()  # fold 1 unfinished in the copy
    config = TrainConfig.model_validate({**RunFolder(trained).read_config()["train"],
                                         "run": copy})
    summary = run_train(config)
    assert sorted(summary.fold.unique()) == [0, 1]


def test_bids_ids_rewrites_source_ids_into_a_cohort_voxplain_accepts(tmp_path):
    from voxplain.data.cohort import read_cohort_table

    source = tmp_path / "source.tsv"
    source.write_text("participant_id\tsession_id\tdiagnosis\tpath\n"
                      "002_S_0295\tbl\tAD\ta.nii.gz\n002_S_0295\tm06\tAD\tb.nii.gz\n")
    with pytest.raises(ValueError, match="not a BIDS label"):
        read_cohort_table(source)
    out = tmp_path / "mapped" / "cohort.tsv"
    result = runner.invoke(app, ["bids-ids", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = read_cohort_table(out)
    assert table.participant_id.tolist() == ["sub-002S0295"] * 2
    assert table.session_id.tolist() == ["ses-bl", "ses-m06"]
    assert table.source_participant_id.tolist() == ["002_S_0295"] * 2
    assert table.path.tolist() == [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]
