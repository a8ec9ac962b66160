"""Units of sessions (``executor.sessions_per_unit``): a fold/run's sessions spread over units,
here or on Ray, write the maps and masks of one unit per fold/run, bit for bit, and a step
interrupted between two units of sessions resumes to the same files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import voxplain.steps.explain
import voxplain.steps.masks
from conftest import write_cohort
from voxplain.config import ExecutorConfig, ExplainStepConfig, SessionMaskStepConfig, TrainConfig
from voxplain.steps.explain import run_explain
from voxplain.steps.masks import run_session_masks
from voxplain.steps.train import run_train

MASK = {"max_iterations": 30, "batch_size": 2}
EXPLAIN = {"method": "grad_cam", "batch_size": 2}


def _digests(run: Path) -> dict[str, str]:
    """Digests of the maps, masks and their tables (the chunk tables are gone at the end)."""
    files = [*run.glob("explanations/*/fold-*/run-*/*"), *run.glob("masks/session/fold-*/run-*/*")]
    return {path.relative_to(run).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files if path.is_file()}


def _steps(run: Path, executor: ExecutorConfig | str) -> None:
    run_explain(ExplainStepConfig(run=run, device="cpu", executor=executor, explain=EXPLAIN))
    run_session_masks(SessionMaskStepConfig(run=run, max_sessions=5, device="cpu",
                                            executor=executor, mask=MASK))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two folds trained once (copied by each test), on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    run_train(TrainConfig(cohort=write_cohort(root / "cohort", subjects=12), out=root / "run",
                          folds=2, epochs=4, batch_size=4, device="cpu",
                          model={"name": "cnn", "channels": [4, 8]}))
    yield root / "run"
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole_folds(trained, tmp_path_factory) -> dict[str, str]:
    """The files of one unit per fold/run."""
    run = tmp_path_factory.mktemp("whole") / "run"
    shutil.copytree(trained, run)
    _steps(run, "local")
    digests = _digests(run)
    assert len([n for n in digests if n.startswith("explanations/") and "sub-" in n]) >= 4
    masks = sorted(run.glob("masks/session/fold-*/run-*/*.nii.gz"))
    assert len(masks) >= 3
    assert any((np.asarray(nib.load(path).dataobj) < 1).any() for path in masks)  # not blank
    return digests


@pytest.fixture
def units(monkeypatch) -> dict[str, list]:
    """The names and results of the units each step ran, by step name (recorded here, where
    the units are sent from: also for Ray)."""
    seen: dict[str, list] = {}
    for module in (voxplain.steps.explain, voxplain.steps.masks):
        original = module.map_fold_units

        def recording(units, work, executor, step, progress=None, original=original):
            units = list(units)
            results = original(units, work, executor, step, progress)
            seen.setdefault(step, []).extend(zip([u.name for u in units], results))
            return results

        monkeypatch.setattr(module, "map_fold_units", recording)
    return seen


def _check_session_units(seen: dict[str, list], digests: dict[str, str]) -> None:
    """Units of sessions ran and wrote every map and mask (the fold units wrote none)."""
    explained = seen["explain grad_cam (sessions)"]
    assert explained and all(" sessions " in name for name, _ in explained)
    assert len(explained) > 2  # more units than folds
    maps = [n for n in digests if n.startswith("explanations/") and "/sub-" in n]
    assert sum(written for _, written in explained) == len(maps) > 0
    masked = seen["session masks (sessions)"]
    assert len(masked) > 2 and all(" sessions " in name for name, _ in masked)
    masks = [n for n in digests if n.startswith("masks/") and n.endswith(".nii.gz")]
    assert sum(count for _, count in masked) == len(masks) > 0


def test_units_of_sessions_write_the_files_of_fold_units(trained, whole_folds, units,
                                                        tmp_path, one_thread, caplog):
    caplog.set_level("INFO", logger="voxplain")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _steps(run, ExecutorConfig(sessions_per_unit=2))
    digests = _digests(run)
    _check_session_units(units, digests)
    assert "fold 0 run 0 sessions 0-1" in caplog.text
    assert not list(run.glob("masks/session/fold-*/run-*/chunk-*.tsv"))
    assert len(digests) == len(whole_folds) > 0
    assert digests == whole_folds
    # 3 sessions per unit: rounded up to 4, a multiple of the batch of 2
    again = tmp_path / "again"
    shutil.copytree(trained, again)
    run_session_masks(SessionMaskStepConfig(run=again, max_sessions=5, device="cpu",
                                            executor={"sessions_per_unit": 3}, mask=MASK))
    assert "rounded up to 4" in caplog.text
    assert {n: d for n, d in _digests(again).items() if n.startswith("masks/")} == {
        n: d for n, d in whole_folds.items() if n.startswith("masks/")}


def test_units_of_sessions_on_ray_write_the_files_of_fold_units(trained, whole_folds, units,
                                                               tmp_path, one_thread):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = tmp_path / "run"
        shutil.copytree(trained, run)
        _steps(run, ExecutorConfig(kind="ray", cpus_per_task=1, max_retries=1,
                                   sessions_per_unit=2))
    finally:
        if started:
            ray.shutdown()
    digests = _digests(run)
    _check_session_units(units, digests)
    assert len(digests) == len(whole_folds) > 0
    assert digests == whole_folds


def test_session_masks_interrupted_between_units_of_sessions_resume(
        trained, whole_folds, tmp_path, monkeypatch, one_thread, caplog):
    caplog.set_level("INFO", logger="voxplain")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = SessionMaskStepConfig(run=run, max_sessions=5, device="cpu", mask=MASK,
                                   executor={"sessions_per_unit": 2})
    original = voxplain.steps.masks._session_mask_chunk

    def killed_after_the_first(context, unit, start, stop, *args, **kwargs):
        if start > 0:
            raise KeyboardInterrupt("killed")
        return original(context, unit, start, stop, *args, **kwargs)

    monkeypatch.setattr(voxplain.steps.masks, "_session_mask_chunk", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_session_masks(config)
    folder = run / "masks/session/fold-0/run-0"
    assert (folder / "chunk-0-1.tsv").is_file() and not (folder / "index.tsv").exists()
    assert len(list(folder.glob("*.nii.gz"))) == 2
    monkeypatch.setattr(voxplain.steps.masks, "_session_mask_chunk", original)
    caplog.clear()
    run_session_masks(config)
    assert "session masks fold 0 run 0 sessions 0-1 already computed: skipped" in caplog.text
    masks = {n: d for n, d in whole_folds.items() if n.startswith("masks/")}
    assert len(masks) > 0
    assert {n: d for n, d in _digests(run).items() if n.startswith("masks/")} == masks
    assert not list(folder.glob("chunk-*.tsv"))


def test_the_sessions_per_unit_flag_of_explain_and_mask_session(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    from voxplain.cli import app

    given = []
    monkeypatch.setattr(voxplain.steps.explain, "run_explain",
                        lambda settings, progress=None: given.append(settings) or pd.DataFrame())
    monkeypatch.setattr(voxplain.steps.masks, "run_session_masks",
                        lambda settings, progress=None: given.append(settings) or pd.DataFrame(
                            columns=["fold", "participant_id", "session_id", "iterations",
                                     "loss", "probability_after", "flagged"]))
    for command in (["explain", "--method", "saliency"], ["mask", "session"]):
        result = CliRunner().invoke(app, [*command, "--run", str(tmp_path), "--executor", "ray",
                                          "--sessions-per-unit", "8"])
        assert result.exit_code == 0, result.output
    assert [settings.executor for settings in given] == 2 * [
        ExecutorConfig(kind="ray", sessions_per_unit=8)]
