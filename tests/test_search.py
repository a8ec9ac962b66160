"""Paper 1's random search (2.2.2) and the CNN options it explores."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import write_cohort
from pydantic import ValidationError
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import ExecutorConfig, ModelConfig, SearchConfig, TrainConfig, read_toml
from voxplain.models.networks import CNN
from voxplain.models.registry import build_model
from voxplain.run import RunFolder, UnitFailed
from voxplain.steps import search as search_step
from voxplain.steps.pipeline import read_pipeline
from voxplain.steps.search import SearchTrial, TrialResult, run_search, trial_dir
from voxplain.steps.train import run_train

#: Keys and shapes of CNN((20, 24, 20), channels=[4, 8], convs_per_block=[1, 2]) before the
#: search options existed: saved model.json files must rebuild into the same network.
BEFORE = {
    "features.0.0.0.weight": (4, 1, 3, 3, 3), "features.0.0.0.bias": (4,),
    "features.0.0.1.weight": (4,), "features.0.0.1.bias": (4,),
    "features.0.0.1.running_mean": (4,), "features.0.0.1.running_var": (4,),
    "features.0.0.1.num_batches_tracked": (),
    "features.1.0.0.weight": (8, 4, 3, 3, 3), "features.1.0.0.bias": (8,),
    "features.1.0.1.weight": (8,), "features.1.0.1.bias": (8,),
    "features.1.0.1.running_mean": (8,), "features.1.0.1.running_var": (8,),
    "features.1.0.1.num_batches_tracked": (),
    "features.1.1.0.weight": (8, 8, 3, 3, 3), "features.1.1.0.bias": (8,),
    "features.1.1.1.weight": (8,), "features.1.1.1.bias": (8,),
    "features.1.1.1.running_mean": (8,), "features.1.1.1.running_var": (8,),
    "features.1.1.1.num_batches_tracked": (),
    "classifier.1.weight": (2, 1200), "classifier.1.bias": (2,),
}

TINY_SPACE = {"blocks": (2, 3), "first_channels": [4], "max_channels": 8, "batch_size": [4, 8],
              "fc_layers": (1, 2)}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# --- the CNN ----------------------------------------------------------------------------------

def test_cnn_defaults_keep_the_network_saved_runs_were_trained_with():
    config = ModelConfig(channels=[4, 8], convs_per_block=[1, 2], input_shape=[20, 24, 20])
    assert _shapes(build_model(config)) == BEFORE


@pytest.mark.parametrize("shape", [(21, 24, 19), (33, 17)])
def test_stride_reduction_halves_every_axis_like_max_pool(shape):
    pooled = CNN(shape, channels=[4, 4, 4], convs_per_block=[1, 2, 3])
    strided = CNN(shape, channels=[4, 4, 4], convs_per_block=[1, 2, 3], reduction="stride")
    x = torch.zeros(1, 1, *shape)
    assert strided.features(x).shape == pooled.features(x).shape
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.MaxPool3d))
                   for m in strided.modules())
    last_convs = [block[-1][0] for block in strided.features]
    assert all(conv.stride == (2,) * len(shape) for conv in last_convs)


def test_fc_layers_are_linear_layers_shrinking_from_the_features_to_the_classes():
    model = CNN((16, 16, 16), channels=[4, 8], fc_layers=3, n_classes=3)
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    widths = [layer.out_features for layer in linears]
    assert linears[0].in_features == 8 * 4 * 4 * 4
    assert widths == [round(512 * (3 / 512) ** (1 / 3)), round(512 * (3 / 512) ** (2 / 3)), 3]
    assert isinstance(model.classifier[0], torch.nn.Dropout)
    assert model(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 3)


def test_cnn_options_are_refused_for_other_networks():
    with pytest.raises(ValidationError, match="reduction apply to model 'cnn'"):
        ModelConfig(name="convnet", reduction="stride")
    with pytest.raises(ValidationError, match="fc_layers apply to model 'cnn'"):
        ModelConfig(name="vgg_gap", fc_layers=2)


# --- the search space -------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("blocks", (5, 3)), ("learning_rate", (0.0, 1e-2)),
                                        ("dropout", (0.2, 1.0)), ("convs_per_block", (0, 3)),
                                        ("batch_size", [])])
def test_bad_search_ranges_are_errors_naming_the_key(tmp_path, key, value):
    with pytest.raises(ValidationError) as error:
        SearchConfig(cohort=tmp_path / "c.tsv", run=tmp_path, space={key: value})
    assert error.value.errors()[0]["loc"] == ("space", key)


def test_the_search_space_is_paper_1s_cnn(tmp_path):
    with pytest.raises(ValidationError, match="model 'cnn'"):
        SearchConfig(cohort=tmp_path / "c.tsv", run=tmp_path, model={"name": "convnet"})


def test_a_pipeline_table_search_validates_its_space(tmp_path):
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(f'[search]\ncohort = "c.tsv"\nrun = "{tmp_path}/run"\nn_trials = 3\n'
                        "[search.space]\nblocks = [2, 4]\n")
    (step,) = read_pipeline(pipeline)
    assert step.name == "search" and step.config.space.blocks == (2, 4)
    pipeline.write_text('[search]\ncohort = "c.tsv"\nrun = "r"\n[search.space]\nblocks = [4, 2]\n')
    with pytest.raises(ValueError, match="space.blocks"):
        read_pipeline(pipeline)


# --- the search, with a stand-in for the training ---------------------------------------------

@pytest.fixture
def fake_training(monkeypatch):
    """run_train replaced by a function recording the trial settings and returning a value."""
    calls: list[TrainConfig] = []

    def train(config, progress=None, *, folds=None, prepared=None):
        calls.append(config)
        Path(config.run).mkdir(parents=True, exist_ok=True)
        return pd.DataFrame({"subset": ["validation"], "loss": [config.learning_rate],
                             "balanced_accuracy": [config.model.dropout]})

    monkeypatch.setattr(search_step, "run_train", train)
    return calls


def _search(tsv: Path, run: Path, **settings) -> SearchConfig:
    values = {"n_folds": 2, "epochs": 2, "min_steps": 0, "space": TINY_SPACE, **settings}
    return SearchConfig(cohort=tsv, run=run, **values)


def test_the_random_sampler_is_seeded(tmp_path, fake_training):
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    tables = [run_search(_search(tsv, tmp_path / name, n_trials=3, sampler_seed=seed))
              for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    parameters = [table.drop(columns=["seconds"]) for table in tables]
    pd.testing.assert_frame_equal(parameters[0], parameters[1])
    assert not parameters[0]["dropout"].equals(parameters[2]["dropout"])


def test_a_resumed_search_draws_what_an_uninterrupted_one_draws(tmp_path, fake_training):
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    whole = run_search(_search(tsv, tmp_path / "whole", n_trials=4))
    run_search(_search(tsv, tmp_path / "parts", n_trials=2))
    resumed = run_search(_search(tsv, tmp_path / "parts", n_trials=4))
    pd.testing.assert_frame_equal(whole.drop(columns=["seconds"]),
                                  resumed.drop(columns=["seconds"]))


def _killed_after(trials: int, fake_training: list):
    """The (fake) training of the search, killed in the trial that follows ``trials`` finished
    ones: it leaves a checkpoint in its folder, as a killed training does."""
    train = search_step.run_train

    def killed(config, progress=None, **kwargs):
        if len(fake_training) == trials:
            Path(config.run).mkdir(parents=True)
            (Path(config.run) / "checkpoint").write_text("epoch 1")
            fake_training.append(config)
            raise KeyboardInterrupt
        return train(config, progress, **kwargs)

    return killed


def test_an_interrupted_trial_is_retried_with_its_parameters_in_its_folder(tmp_path, monkeypatch,
                                                                          fake_training):
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    monkeypatch.setattr(search_step, "run_train", _killed_after(1, fake_training))
    with pytest.raises(KeyboardInterrupt):
        run_search(_search(tsv, tmp_path / "run", n_trials=3))
    table = run_search(_search(tsv, tmp_path / "run", n_trials=3))
    assert list(table.state) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    interrupted, retried = table.iloc[1], table.iloc[2]
    parameters = _parameters(table)
    assert interrupted[parameters].equals(retried[parameters])
    assert (trial_dir(tmp_path / "run", 2) / "checkpoint").read_text() == "epoch 1"
    assert not trial_dir(tmp_path / "run", 1).exists()


def _parameters(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("number", "state", "value", "seconds", "folder")]


def test_trials_drawn_in_batches_are_the_trials_drawn_one_by_one(tmp_path, monkeypatch,
                                                                 fake_training):
    """A batch of trials (Ray: as many as the cluster runs at once) asks trial n with seed
    ``sampler_seed + n``: the same trials as a local search."""
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    one_by_one = run_search(_search(tsv, tmp_path / "one", n_trials=5))
    monkeypatch.setattr(search_step, "parallel_units", lambda executor: 3)
    batched = run_search(_search(tsv, tmp_path / "batched", n_trials=5))
    assert len(fake_training) == 10
    pd.testing.assert_frame_equal(one_by_one.drop(columns=["seconds"]),
                                  batched.drop(columns=["seconds"]))


def test_a_failed_trial_fails_its_batch_but_finished_trials_keep_their_value(
        tmp_path, monkeypatch, fake_training):
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    train = search_step.run_train

    def second_trial_fails(config, progress=None, **kwargs):
        if Path(config.run).name == "trial-001":
            raise ValueError("no brain in this trial")
        metrics = train(config, progress, **kwargs)
        folder = RunFolder(config.run)
        folder.evaluation_dir.mkdir()
        metrics.to_csv(folder.evaluation_file("cross_validation.tsv"), sep="\t", index=False)
        return metrics

    monkeypatch.setattr(search_step, "run_train", second_trial_fails)
    monkeypatch.setattr(search_step, "parallel_units", lambda executor: 3)
    with pytest.raises(ValueError, match="no brain"):
        run_search(_search(tsv, tmp_path / "run", n_trials=4))
    written = pd.read_csv(tmp_path / "run" / "search" / "trials.tsv", sep="\t")
    assert list(written.state) == ["COMPLETE", "FAIL", "FAIL"]
    assert written["value"][0] == fake_training[0].model.dropout  # read from its folder
    assert len(fake_training) == 1  # the third trial never ran: the error stopped the batch
    table = run_search(_search(tsv, tmp_path / "run", n_trials=4))  # failures: not retried
    assert list(table.state) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]


def test_every_trial_a_killed_batch_left_running_is_retried_once(tmp_path, monkeypatch,
                                                                 fake_training):
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    monkeypatch.setattr(search_step, "run_train", _killed_after(0, fake_training))
    monkeypatch.setattr(search_step, "parallel_units", lambda executor: 3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_search(_search(tsv, run, n_trials=3))
    study = search_step.open_study(_search(tsv, run, n_trials=3))
    assert [t.state.name for t in study.trials] == ["RUNNING"] * 3
    monkeypatch.setattr(search_step, "parallel_units", lambda executor: 2)  # batches of 2, 1
    table = run_search(_search(tsv, run, n_trials=3))
    assert list(table.state) == ["FAIL"] * 3 + ["COMPLETE"] * 3
    parameters = _parameters(table)
    for interrupted in range(3):
        retried = table.iloc[3 + interrupted]
        assert table.iloc[interrupted][parameters].equals(retried[parameters])
    assert [Path(config.run) for config in fake_training[1:]] == [trial_dir(run, n)
                                                                  for n in (3, 4, 5)]
    assert (trial_dir(run, 3) / "checkpoint").read_text() == "epoch 1"  # trial 0's folder
    assert not any(trial_dir(run, n).exists() for n in range(3))
    assert run_search(_search(tsv, run, n_trials=3)).equals(table)  # nothing left to retry


# --- the search, trained ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_search_resumes_without_retraining_finished_trials(tmp_path, monkeypatch,
                                                                     one_thread):
    tsv = write_cohort(tmp_path / "cohort", subjects=8, sessions=1)
    trained: list[Path] = []

    def counted(config, progress=None, **kwargs):
        trained.append(Path(config.run))
        return run_train(config, progress, **kwargs)

    monkeypatch.setattr(search_step, "run_train", counted)
    run = tmp_path / "run"
    run_search(_search(tsv, run, n_trials=2))  # "killed" after 2 trials
    first = trial_dir(run, 0) / "models" / "fold-0" / "run-0" / "model.safetensors"
    stamp = os.stat(first).st_mtime_ns
    table = run_search(_search(tsv, run, n_trials=3))
    assert trained == [trial_dir(run, n) for n in (0, 1, 2)]
    assert list(table.number) == [0, 1, 2] and set(table.state) == {"COMPLETE"}
    assert os.stat(first).st_mtime_ns == stamp
    assert not (trial_dir(run, 0) / "models" / "fold-1").exists()  # the first split only
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{run}/search/study.db")
    assert len(study.trials) == 3
    written = pd.read_csv(run / "search" / "trials.tsv", sep="\t")
    assert list(written.number) == [0, 1, 2] and written["value"].between(0, 1).all()

    best = run / "search" / "best_train.toml"
    config = TrainConfig.model_validate(read_toml(best)["train"])
    assert config.run == run and config.model.channels is not None
    result = CliRunner().invoke(app, ["train", "--config", str(best)])  # unchanged
    assert result.exit_code == 0, result.output
    assert {fold for fold, _, _ in RunFolder(run).model_dirs()} == {0, 1}


def test_the_report_shows_the_trials_the_best_one_and_their_parameters(tmp_path,
                                                                         fake_training):
    from voxplain.config import ReportConfig
    from voxplain.report.order import SECTIONS
    from voxplain.report.sections import ReportContext, search_section

    run = tmp_path / "run"
    context = ReportContext(RunFolder(run), ReportConfig(run=run), tmp_path / "figures")
    assert not search_section(context).applies  # no search: the section is left out
    tsv = write_cohort(tmp_path / "cohort", subjects=6, sessions=1)
    run_search(_search(tsv, run, n_trials=3))
    section = search_section(context)
    kinds = [block.kind for block in section.blocks]
    assert section.applies and kinds == ["table", "text", "code", "figure"]
    best = pd.read_csv(run / "search" / "trials.tsv", sep="\t")["value"].idxmax()
    assert section.blocks[1].content.startswith(f"Best trial {best}:")
    assert section.blocks[3].content.is_file()
    assert SECTIONS[SECTIONS.index(search_section) - 1].__name__ == "classification_section"


# --- the search on Ray --------------------------------------------------------------------------

ON_RAY = ExecutorConfig(kind="ray", cpus_per_task=1, max_retries=0)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # the work function of the failing trial travels to the workers by value: they cannot
    # import this module (pytest put the tests folder on the path of this process only)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _searched(root: Path, tsv: Path, executor: ExecutorConfig | str) -> tuple[pd.DataFrame,
                                                                               dict[str, str]]:
    run = root / "run"
    table = run_search(_search(tsv, run, n_trials=2, epochs=1, device="cpu", executor=executor))
    files = sorted(run.glob("search/trial-*/models/fold-*/run-*/model.safetensors"))
    return table, {path.relative_to(run).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                   for path in files}


@pytest.mark.slow
def test_trials_on_ray_are_the_trials_of_the_local_executor(tmp_path, ray_cluster, one_thread):
    """The two trials run at once on the 2-CPU cluster, each in a worker that reads the cohort
    itself: the same parameters, values and bit-identical models as one after the other here."""
    tsv = write_cohort(tmp_path / "cohort", subjects=8, sessions=1)
    local_table, local_models = _searched(tmp_path / "local", tsv, "local")
    ray_table, ray_models = _searched(tmp_path / "ray", tsv, ON_RAY)
    assert len(local_models) == 2 and set(local_table.state) == {"COMPLETE"}
    pd.testing.assert_frame_equal(local_table.drop(columns=["seconds"]),
                                  ray_table.drop(columns=["seconds"]))
    assert ray_models == local_models
    written = pd.read_csv(tmp_path / "ray" / "run" / "search" / "trials.tsv", sep="\t")
    assert list(written.number) == [0, 1]


def _trial_1_fails_once_trial_0_finished(unit: SearchTrial, progress=None) -> TrialResult:
    if unit.number != 1:
        return search_step.trial_unit(unit, progress)
    finished = RunFolder(trial_dir(unit.config.run, 0)).evaluation_file("cross_validation.tsv")
    deadline = time.monotonic() + 120
    while not finished.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    raise ValueError(f"no brain in trial {unit.number}")


@pytest.mark.slow
def test_a_trial_failing_on_ray_is_named_and_its_finished_neighbour_keeps_its_value(
        tmp_path, monkeypatch, ray_cluster, one_thread):
    tsv = write_cohort(tmp_path / "cohort", subjects=8, sessions=1)
    monkeypatch.setattr(search_step, "trial_unit", _trial_1_fails_once_trial_0_finished)
    assert search_step.parallel_units(ON_RAY) == 2  # trials 0 and 1 run at once
    run = tmp_path / "run"
    config = _search(tsv, run, n_trials=3, epochs=1, device="cpu", executor=ON_RAY)
    with pytest.raises(UnitFailed, match=r"search: trial 1 failed on Ray: "
                                         r"ValueError: no brain in trial 1"):
        run_search(config)
    written = pd.read_csv(run / "search" / "trials.tsv", sep="\t")
    assert list(written.state) == ["COMPLETE", "FAIL"]  # one batch of 2 (2 CPUs)
    finished = pd.read_csv(trial_dir(run, 0) / "evaluation" / "cross_validation.tsv", sep="\t")
    assert written["value"][0] == pytest.approx(
        finished.loc[finished.subset == "validation", "balanced_accuracy"].mean())
