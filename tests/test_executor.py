"""Where the units of a step run (issue 21): here, one after the other, or as the tasks of a
Ray cluster sharing the run folder -- with the same files either way."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_cohort
from voxplain.config import (CyCEStepConfig, ExecutorConfig, ExplainStepConfig, MaskGridConfig,
                             RobustnessConfig, SessionMaskStepConfig, TrainConfig)
from voxplain.io import write_text
from voxplain.run import RunFolder
from voxplain.run.executor import (NoUnitProcessed, Unit, UnitFailed, UnitSkipped,
                                   available_cpus, map_units)
from voxplain.steps.cyce import run_cyce_train
from voxplain.steps.explain import run_explain
from voxplain.steps.masks import run_mask_grid, run_session_masks
from voxplain.steps.robustness import run_robustness
from voxplain.steps.train import run_train

ray = pytest.importorskip("ray")
# the work functions below travel to the Ray workers by value: the workers cannot import this
# module (pytest put the tests folder on the path of this process only)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ON_RAY = ExecutorConfig(kind="ray", cpus_per_task=1, max_retries=1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _step_files(root: Path, executor: ExecutorConfig | str) -> dict[str, str]:
    """Train 2 folds, then a grid of 2 mask settings and session masks on fold 0, Grad-CAM
    maps of both folds, CyCE on fold 1 and the session masks' prob_CNN, on ``executor``; the
    digests of the models, masks, maps, generators and prob_CNN matrices."""
    run = root / "run"
    run_train(TrainConfig(cohort=write_cohort(root / "cohort", subjects=12), out=run, folds=2,
                          epochs=2, batch_size=4, device="cpu", executor=executor,
                          model={"name": "cnn", "channels": [4, 8]}))
    run_mask_grid(MaskGridConfig(run=run, folds=[0], l1=[1e-3, 1e-4], device="cpu",
                                 executor=executor, mask={"max_epochs": 3, "batch_size": 4}))
    run_session_masks(SessionMaskStepConfig(run=run, folds=[0], max_sessions=2, device="cpu",
                                            executor=executor,
                                            mask={"max_iterations": 5, "batch_size": 2}))
    run_explain(ExplainStepConfig(run=run, device="cpu", executor=executor,
                                  explain={"method": "grad_cam", "batch_size": 2}))
    run_cyce_train(CyCEStepConfig(run=run, folds=[1], device="cpu", executor=executor,
                                  cyce={"widths": [4, 8, 8, 8], "convs_per_stage": 1,
                                        "batch_size": 2, "max_steps": 2, "min_steps": 2}))
    run_robustness(RobustnessConfig(run=run, methods=["mask"], prob_cnn=True, device="cpu",
                                    include_flagged=True, executor=executor))
    files = [*run.glob("models/fold-*/run-*/model.safetensors"),
             *run.glob("masks/grid/*/fold-*/run-*/mask.nii.gz"),
             *run.glob("masks/session/fold-*/run-*/sub-*.nii.gz"),
             *run.glob("explanations/grad_cam/fold-*/run-*/*.nii.gz"),
             *run.glob("cyce/fold-*/run-*/generators.safetensors"),
             *run.glob("evaluation/robustness/mask/*prob_cnn.tsv")]
    return {path.relative_to(run).as_posix(): _digest(path) for path in files}


@pytest.mark.slow
def test_folds_and_mask_settings_on_ray_write_the_files_of_the_local_executor(
        tmp_path, ray_cluster, one_thread):
    """On the CPU with one thread per unit, a unit computes the same operations in a Ray
    worker as here: the models and masks are bit-identical."""
    local = _step_files(tmp_path / "local", "local")
    remote = _step_files(tmp_path / "ray", ON_RAY)
    assert len([name for name in local if name.startswith("models/")]) == 2
    assert len([name for name in local if name.startswith("masks/grid/")]) == 2
    assert any(name.startswith("masks/session/") for name in local)
    assert len([name for name in local if name.startswith("explanations/")]) >= 2 * 2
    assert len([name for name in local if name.startswith("cyce/")]) == 1
    assert "evaluation/robustness/mask/session_fold-0_run-0_prob_cnn.tsv" in local
    assert remote == local


def _fail_in_fold_1(fold: int) -> int:
    if fold == 1:
        raise ValueError(f"no brain in fold {fold}")
    return fold


def test_an_error_in_a_unit_names_the_unit_and_the_remote_error(ray_cluster):
    units = [Unit(f"fold {fold} run 0", fold) for fold in range(3)]
    with pytest.raises(UnitFailed, match=r"train: fold 1 run 0 failed on Ray: "
                                         r"ValueError: no brain in fold 1"):
        map_units(units, _fail_in_fold_1, ON_RAY, "train")
    with pytest.raises(ValueError, match="no brain in fold 1"):  # here: the error as it is
        map_units(units, _fail_in_fold_1, ExecutorConfig(), "train")


def _skip_odd_folds(fold: int) -> int:
    if fold % 2:
        raise UnitSkipped("no correctly classified AD session")
    return fold


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_skipped_units_are_named_and_the_others_go_on(kind, ray_cluster, caplog):
    executor = ON_RAY if kind == "ray" else ExecutorConfig()
    units = [Unit(f"fold {fold} run 0", fold) for fold in range(4)]
    assert map_units(units, _skip_odd_folds, executor, "masks") == [0, 2]
    assert "masks: fold 3 run 0 skipped: no correctly classified AD session" in caplog.text
    with pytest.raises(NoUnitProcessed, match="no unit could be processed.*fold 1 run 0: no "):
        map_units(units[1::2], _skip_odd_folds, executor, "masks")


def _die_on_first_attempt(folder: Path) -> str:
    """Killed mid-way the first time (the marker left behind), done the second."""
    marker = folder / "started"
    if not marker.exists():
        marker.touch()
        os._exit(1)
    write_text(folder / "done.txt", "done")
    return (folder / "done.txt").read_text()


def test_a_unit_whose_worker_dies_is_retried_and_the_step_completes(tmp_path, ray_cluster):
    folders = [tmp_path / f"fold-{fold}" for fold in range(2)]
    for folder in folders:
        folder.mkdir()
    units = [Unit(folder.name, folder) for folder in folders]
    assert map_units(units, _die_on_first_attempt, ON_RAY, "train") == ["done", "done"]
    never = ON_RAY.model_copy(update={"max_retries": 0})
    (tmp_path / "again").mkdir()
    with pytest.raises(UnitFailed, match="train: again failed on Ray"):
        map_units([Unit("again", tmp_path / "again")], _die_on_first_attempt, never, "train")


def _threads(_: int) -> int:
    return torch.get_num_threads()


def test_units_run_with_their_cpus_as_torch_threads(ray_cluster):
    units = [Unit("fold 0 run 0", 0)]
    assert map_units(units, _threads, ON_RAY.model_copy(update={"cpus_per_task": 2}),
                     "train") == [2]
    [here] = map_units(units, _threads, ExecutorConfig(), "train")
    assert here <= available_cpus()
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_the_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'voxplain\[ray\]'"):
        map_units([Unit("fold 0 run 0", 0)], _threads, ExecutorConfig(kind="ray"), "train")


def test_a_step_resumes_on_another_executor(tmp_path):
    """Where units run never changes their results: ``executor`` is resumable, given as a
    section or as its kind alone."""
    run = RunFolder(tmp_path)
    run.record_config("mask_grid", MaskGridConfig(run=tmp_path))
    resumed = MaskGridConfig.model_validate({"run": tmp_path, "executor": "ray"})
    assert resumed.executor == ExecutorConfig(kind="ray")
    run.record_config("mask_grid", resumed)
    train = TrainConfig.model_validate({"cohort": "c.tsv", "run": tmp_path, "executor": {
        "kind": "ray", "address": "auto", "cpus_per_task": 4, "gpus_per_task": 0.5}})
    assert "executor" in TrainConfig.resumable and train.executor.gpus_per_task == 0.5


def test_units_travel_with_absolute_paths(tmp_path, monkeypatch):
    """A Ray worker runs in another directory: a relative run folder, cohort or weights file
    would name other files there."""
    from voxplain.run.executor import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(TrainConfig(cohort="cohort.tsv", run="run",
                                             model={"weights": "weights.pt"}))
    assert config.cohort == tmp_path / "cohort.tsv" and config.run == tmp_path / "run"
    assert config.model.weights == tmp_path / "weights.pt"


def test_the_cli_flags_set_the_executor_of_a_step(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    import voxplain.steps.masks
    from voxplain.cli import app

    given = []
    monkeypatch.setattr(voxplain.steps.masks, "run_mask_grid",
                        lambda settings, progress=None: given.append(settings) or pd.DataFrame(
                            columns=["l1", "l2", "b1", "b2", "learning_rate", "fold", "run",
                                     "probability_after", "top_regions"]))
    result = CliRunner().invoke(app, ["mask", "grid", "--run", str(tmp_path), "--executor",
                                      "ray", "--address", "auto", "--cpus-per-task", "2",
                                      "--gpus-per-task", "0.5"])
    assert result.exit_code == 0, result.output
    assert given[0].executor == ExecutorConfig(kind="ray", address="auto", cpus_per_task=2,
                                               gpus_per_task=0.5)


def test_a_step_on_ray_has_one_bar_that_counts_its_finished_units(ray_cluster):
    from rich.progress import Progress

    units = [Unit(f"fold {fold} run 0", fold) for fold in range(3)]
    with Progress(disable=True) as progress:
        assert map_units(units, _skip_odd_folds, ON_RAY, "masks", progress) == [0, 2]
        [bar] = progress.tasks
    assert (bar.total, bar.completed, bar.finished) == (3, 3, True)
    assert bar.description.startswith("masks on Ray: fold ") and "done" in bar.description
    with Progress(disable=True) as progress:  # here, the units move their own bars
        map_units(units, _skip_odd_folds, ExecutorConfig(), "masks", progress)
        assert progress.tasks == []


def test_the_explain_flags_set_its_executor(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    import voxplain.steps.explain
    from voxplain.cli import app

    given = []
    monkeypatch.setattr(voxplain.steps.explain, "run_explain",
                        lambda settings, progress=None: given.append(settings) or pd.DataFrame())
    result = CliRunner().invoke(app, ["explain", "--run", str(tmp_path), "--method",
                                      "saliency,grad_cam", "--executor", "ray",
                                      "--cpus-per-task", "2"])
    assert result.exit_code == 0, result.output
    assert [settings.explain.method for settings in given] == ["saliency", "grad_cam"]
    assert [settings.executor for settings in given] == 2 * [ExecutorConfig(kind="ray",
                                                                            cpus_per_task=2)]


def test_an_executor_at_the_top_of_a_pipeline_file_reaches_every_step_that_fans_out(tmp_path):
    from voxplain.steps.pipeline import read_pipeline

    pipeline = tmp_path / "pipeline.toml"
    write_text(pipeline, 'run = "run"\nexecutor = "ray"\n'
               '[train]\ncohort = "cohort.tsv"\n'
               '[explain]\nmethod = "saliency"\n'
               '[cyce_train]\n'
               '[mask_session]\n'
               '[evaluate_robustness]\nprob_cnn = true\n'
               '[evaluate_localisation]\n')
    planned = {step.name: step.config for step in read_pipeline(pipeline)}
    fanning_out = ["train", "explain", "cyce_train", "mask_session", "evaluate_robustness"]
    assert {name: planned[name].executor.kind for name in fanning_out} == dict.fromkeys(
        fanning_out, "ray")
    assert not hasattr(planned["evaluate_localisation"], "executor")  # runs in the command


def test_process_shared_makes_a_value_once_per_settings_and_cohort_and_releases_it(tmp_path):
    from voxplain.config import ExecutorConfig as Settings
    from voxplain.run.executor import ProcessShared

    cohort = tmp_path / "cohort.tsv"
    cohort.write_text("a\n")
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return made[-1]

    shared: ProcessShared[int] = ProcessShared()
    first, other = Settings(), Settings(kind="ray")
    assert shared.get(first, cohort, make) == 0 and shared.get(first, cohort, make) == 0
    assert shared.get(other, cohort, make) == 1  # other settings: made afresh
    os.utime(cohort, ns=(1, 1))  # a rewritten cohort (another modification time)
    assert shared.get(other, cohort, make) == 2
    with pytest.raises(RuntimeError, match="boom"):
        with shared.sharing(first, cohort, 41):
            assert shared.get(first, cohort, make) == 41  # the driver's own value, not made
            raise RuntimeError("boom")
    assert shared.get(first, cohort, make) == 3  # released after the block, also on failure
    assert made == [0, 1, 2, 3]
