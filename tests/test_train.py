"""Subject-level cross-validation and training (paper 1, 2.2): splits, determinism, resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_cohort
from voxplain.config import PredictConfig, TrainConfig
from voxplain.io import read_tsv
from voxplain.run import RunFolder, RunFolderError
from voxplain.steps.predict import run_predict
from voxplain.train.splits import subject_folds
from voxplain.steps.train import run_train
from voxplain.train.trainer import _update_state
from voxplain.models.checkpoint import TrainingState

TINY_MODEL = {"name": "cnn", "channels": [4, 8, 8]}


def _config(cohort: Path, out: Path, **changes) -> TrainConfig:
    values = {"cohort": cohort, "out": out, "folds": 3, "epochs": 2, "batch_size": 4,
              "device": "cpu", "model": TINY_MODEL, **changes}
    return TrainConfig.model_validate(values)


def _table(subjects: int = 20, sessions: int = 3) -> pd.DataFrame:
    return pd.DataFrame([
        {"participant_id": f"sub-{s:02d}", "session_id": f"ses-M{12 * k:02d}",
         "diagnosis": "AD" if s % 3 == 0 else "CN"}
        for s in range(subjects) for k in range(sessions)])


def test_folds_split_subjects_not_sessions():
    table = _table()
    folds = subject_folds(table, n_folds=4, seed=2)
    validation_subjects = []
    for fold in folds:
        train_subjects = set(fold.train.participant_id)
        assert train_subjects.isdisjoint(fold.validation.participant_id)
        assert fold.validation.participant_id.is_unique  # one session per subject
        assert set(fold.validation.session_id) == {"ses-M00"}  # the baseline
        assert (fold.train.groupby("participant_id").size() == 3).all()  # every session
        validation_subjects += list(fold.validation.participant_id)
    assert sorted(validation_subjects) == sorted(table.participant_id.unique())


def test_folds_are_stratified_and_reproducible():
    table = _table(subjects=40)
    folds = subject_folds(table, n_folds=4, seed=2)
    ad_per_fold = [(f.validation.diagnosis == "AD").sum() for f in folds]
    assert max(ad_per_fold) - min(ad_per_fold) <= 1
    again = subject_folds(table, n_folds=4, seed=2)
    other = subject_folds(table, n_folds=4, seed=3)
    assert all(a.validation.equals(b.validation) for a, b in zip(folds, again))
    assert not all(a.validation.equals(b.validation) for a, b in zip(folds, other))


def test_too_few_subjects_per_class_is_a_clear_error():
    with pytest.raises(ValueError, match="5-fold cross-validation needs at least 5 subjects"):
        subject_folds(_table(subjects=9, sessions=1), n_folds=5)


def test_early_stopping_counts_epochs_above_the_lowest_validation_loss():
    state, best = TrainingState(), {}

    class Model:
        def state_dict(self):
            return {}

    losses = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75]
    above = []
    for loss in losses:
        _update_state(state, Model(), best, loss, balanced_accuracy=0.5)
        state.next_epoch += 1
        above.append(state.epochs_above_lowest)
    assert above == [0, 0, 1, 2, 0, 1]
    assert state.lowest_loss == 0.7


def test_patience_counts_only_epochs_that_end_after_the_minimum_steps():
    state = TrainingState()

    class Model:
        def state_dict(self):
            return {}

    above = []
    for loss, counts in [(0.69, False), (0.70, False), (0.72, False), (0.71, True), (0.73, True),
                         (0.5, True), (0.6, True)]:
        _update_state(state, Model(), {}, loss, balanced_accuracy=0.5, counts=counts)
        above.append(state.epochs_above_lowest)
    # the wobble above 0.69 before min_steps does not count; after it, paper 1's rule applies
    assert above == [0, 0, 0, 1, 2, 0, 1]


def test_best_model_is_chosen_by_balanced_accuracy_then_loss():
    state = TrainingState()

    class Model:
        def state_dict(self):
            return {}

    for epoch, (loss, accuracy) in enumerate([(0.9, 0.6), (0.5, 0.55), (0.8, 0.7), (0.6, 0.7)]):
        state.next_epoch = epoch
        _update_state(state, Model(), {}, loss, accuracy)
    assert state.best_epoch == 3 and state.best_balanced_accuracy == 0.7


@pytest.mark.slow
def test_training_writes_the_run_folder_and_learns_an_easy_task(tmp_path):
    cohort_tsv = write_cohort(tmp_path / "cohort", subjects=24)
    summary = run_train(_config(cohort_tsv, tmp_path / "run", epochs=8, learning_rate=3e-3))
    run = RunFolder(tmp_path / "run")
    assert len(run.model_dirs()) == 3
    for fold in range(3):
        folder = run.model_dir(fold, 0)
        for name in ("model.safetensors", "model.json", "history.tsv", "metrics.tsv",
                     "predictions-validation.tsv"):
            assert (folder / name).is_file(), name
        assert not (folder / "checkpoint.safetensors").exists()
        validation = pd.read_csv(run.split_file(fold, "validation"), sep="\t")
        predictions = pd.read_csv(folder / "predictions-validation.tsv", sep="\t")
        assert list(predictions.participant_id) == list(validation.participant_id)
        np.testing.assert_allclose(predictions[["proba_CN", "proba_AD"]].sum(axis=1), 1, atol=1e-5)
    assert summary.balanced_accuracy.mean() >= 0.8, summary
    assert (tmp_path / "run" / "evaluation" / "cross_validation.tsv").is_file()
    assert "[train]" in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.slow
def test_same_seed_gives_identical_weights_after_one_epoch(cohort_tsv, tmp_path):
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_train(_config(cohort_tsv, tmp_path / name, folds=2, epochs=1, seed=seed))
        weights.append(load_file(str(RunFolder(tmp_path / name).model_dir(0, 0)
                                     / "model.safetensors")))
        split = (tmp_path / name / "splits/fold-0/validation.tsv").read_text()
        assert split == (tmp_path / "a" / "splits/fold-0/validation.tsv").read_text()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert any((weights[0][k] != weights[2][k]).any() for k in weights[0]
               if weights[0][k].is_floating_point())


@pytest.mark.slow
def test_quality_check_rejections_are_listed_and_left_out(cohort_tsv, tmp_path):
    table = pd.read_csv(cohort_tsv, sep="\t")
    import nibabel as nib

    image = nib.load(cohort_tsv.parent / table.path[3])
    dim = nib.Nifti1Image(np.asarray(image.dataobj) * 0.5, image.affine)
    nib.save(dim, cohort_tsv.parent / table.path[3])
    run_train(_config(cohort_tsv, tmp_path / "run", epochs=1))
    rejected = pd.read_csv(tmp_path / "run" / "qc_rejected.tsv", sep="\t")
    assert list(rejected.participant_id) == [table.participant_id[3]]
    assert rejected.max_value[0] == pytest.approx(0.5)
    kept = pd.read_csv(tmp_path / "run" / "cohort.tsv", sep="\t")
    assert len(kept) == len(table) - 1


@pytest.mark.slow
def test_one_class_only_is_refused(tmp_path):
    tsv = write_cohort(tmp_path / "c", subjects=4)
    table = pd.read_csv(tsv, sep="\t").assign(diagnosis="CN")
    table.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"only one diagnosis \(CN\)"):
        run_train(_config(tsv, tmp_path / "run"))


@pytest.mark.slow
def test_a_run_folder_refuses_other_settings(cohort_tsv, tmp_path):
    run_train(_config(cohort_tsv, tmp_path / "run", epochs=1, folds=2))
    with pytest.raises(RunFolderError, match=r"epochs: 1 -> 3"):
        run_train(_config(cohort_tsv, tmp_path / "run", epochs=3, folds=2))


@pytest.mark.slow
def test_killed_training_resumes_without_redoing_finished_folds(cohort_tsv, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "voxplain.cli", "train", "--cohort", str(cohort_tsv),
               "--out", str(run), "--folds", "3", "--epochs", "40", "--patience", "40",
               "--batch-size", "4", "--channels", "4,8,8", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "models/fold-0/run-0/metrics.tsv"
    checkpoint = run / "models/fold-1/run-0/checkpoint.safetensors"
    deadline = time.time() + 240
    while not checkpoint.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.is_file() and checkpoint.is_file(), "fold 0 must be done and fold 1 started"
    assert not (run / "models/fold-2/run-0/metrics.tsv").exists()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.parent.iterdir()}

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "fold 0 run 0 already trained: skipped" in result.stderr
    assert "fold 1 run 0: resuming at epoch" in result.stderr
    for path, (mtime, content) in finished.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    for fold in range(3):
        history = pd.read_csv(run / f"models/fold-{fold}/run-0/history.tsv", sep="\t")
        assert list(history.epoch) == list(range(len(history)))  # no epoch lost or repeated


@pytest.mark.slow
def test_held_out_test_cohort_is_scored_on_baseline_sessions(cohort_tsv, tmp_path):
    test_tsv = write_cohort(tmp_path / "test", subjects=6, sessions=2, seed=5)
    table = pd.read_csv(test_tsv, sep="\t")
    table["participant_id"] = table.participant_id.str.replace("sub-", "sub-T")
    table.to_csv(test_tsv, sep="\t", index=False)
    summary = run_train(_config(cohort_tsv, tmp_path / "run", folds=2, epochs=1,
                                   test=test_tsv))
    assert sorted(summary.subset) == ["test", "test", "validation", "validation"]
    assert (summary[summary.subset == "test"].n == 6).all()  # one session per subject
    predictions = pd.read_csv(tmp_path / "run/models/fold-0/run-0/predictions-test.tsv", sep="\t")
    assert set(predictions.session_id) == {"ses-M00"} and len(predictions) == 6


@pytest.mark.slow
def test_predict_writes_probabilities_of_every_model(cohort_tsv, tmp_path):
    run_train(_config(cohort_tsv, tmp_path / "run", folds=2, epochs=1))
    predictions = run_predict(PredictConfig(run=tmp_path / "run", cohort=cohort_tsv,
                                               device="cpu"))
    assert len(predictions) == 2 * 24
    assert set(predictions.fold) == {0, 1}
    assert RunFolder(tmp_path / "run").predictions_file(cohort_tsv).is_file()
    np.testing.assert_allclose(predictions.proba_CN + predictions.proba_AD, 1, atol=1e-5)


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    """The issue's reproduction: 60 subjects, one session each, 3 folds, the defaults."""
    from voxplain.config import AtrophyCohortConfig
    from voxplain.data.synthetic import generate_atrophy_cohort

    folder = tmp_path_factory.mktemp("reproduction")
    return generate_atrophy_cohort(AtrophyCohortConfig(out=folder / "cohort", subjects=60,
                                                       sessions=1, downsample=4, seed=3))


@pytest.fixture(scope="module")
def stopped_early(reproduction, tmp_path_factory):
    """The reproduction trained with paper 1's patience alone (no minimum number of steps)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    return run, run_train(TrainConfig(cohort=reproduction, out=run, folds=3, min_steps=0,
                                         device="cpu"))


def _validation_rows(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary.subset == "validation"].sort_values("fold")


@pytest.mark.slow
def test_training_learns_before_early_stopping_may_end_a_fold(reproduction, stopped_early,
                                                             tmp_path):
    """Without the minimum number of steps (paper 1's patience alone) folds stop at chance on
    this cohort (the issue's reproduction: two of three; which ones learn depends on the
    machine's floating-point paths); with the default, every fold learns."""
    stopped = _validation_rows(stopped_early[1])
    at_chance = stopped[stopped.at_chance.astype(bool)]
    assert len(at_chance) >= 2 and (at_chance.balanced_accuracy == 0.5).all()
    assert (at_chance.epochs < 30).all()
    learned = _validation_rows(run_train(TrainConfig(cohort=reproduction,
                                                        out=tmp_path / "default", folds=3,
                                                        device="cpu")))
    assert not learned.at_chance.any() and (learned.balanced_accuracy >= 0.9).all()
    assert (learned.chance_p < 0.05).all() and (learned.steps >= 100).all()


@pytest.mark.slow
def test_later_steps_skip_a_fold_that_cannot_serve_them_and_fail_only_if_none_can(
        stopped_early, caplog):
    """Folds at chance that predict CN for everyone have no correctly classified AD patient:
    `mask group` names them in a warning and masks the folds that predict AD (for everyone,
    or a fold that learned); asked for those folds only, it fails with every reason."""
    from voxplain.config import GroupMaskStepConfig
    from voxplain.steps.masks import run_group_masks
    from voxplain.run import RunFolderError

    run = stopped_early[0]
    predicted = {fold: set(pd.read_csv(run / f"models/fold-{fold}/run-0/predictions-validation.tsv",
                                       sep="\t").predicted) for fold in range(3)}
    serving = [fold for fold, classes in predicted.items() if "AD" in classes]
    idle = [fold for fold, classes in predicted.items() if classes == {"CN"}]
    assert serving and idle
    summary = run_group_masks(GroupMaskStepConfig(run=run, device="cpu",
                                              mask={"max_epochs": 2}))
    assert sorted(summary.fold) == serving
    for fold in idle:
        assert f"fold {fold} run 0 skipped: no correctly classified AD training session" in \
            caplog.text
    with pytest.raises(RunFolderError, match="no fold could be processed.*no correctly "
                                             "classified AD"):
        run_group_masks(GroupMaskStepConfig(run=run, folds=idle, device="cpu",
                                        mask={"max_epochs": 2}))


def test_balanced_class_weights_are_scikit_learns_and_weigh_the_loss_as_computed_by_hand():
    from sklearn.utils.class_weight import compute_class_weight

    from voxplain.train.trainer import class_weights

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(class_weights(labels, 3), expected)
    np.testing.assert_allclose(class_weights(labels, 3), [9 / 18, 9 / 6, 9 / 3])
    assert class_weights(np.array([0, 0, 1]), 3)[2] == 0.0  # an absent class weighs nothing
    # the weighted loss of one batch, by hand: sum_i w_{y_i} (-log p_{i, y_i}) / sum_i w_{y_i}
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2, 0])
    w = np.array([0.5, 1.5, 3.0])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    nll = -np.log(p[np.arange(4), y.numpy()])
    by_hand = (w[y.numpy()] * nll).sum() / w[y.numpy()].sum()
    loss = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor(w, dtype=torch.float32))
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)


def test_select_by_loss_keeps_the_epoch_of_the_lowest_validation_loss():
    class Model:
        def __init__(self):
            self.epoch = 0

        def state_dict(self):
            return {"epoch": torch.tensor(self.epoch)}

    # epoch 1 has the best balanced accuracy, epoch 3 the lowest loss
    epochs = [(0.60, 0.70), (0.50, 0.95), (0.45, 0.90), (0.40, 0.90)]
    kept = {}
    for select_by in ("balanced_accuracy", "loss"):
        state, model, best = TrainingState(), Model(), {}
        for epoch, (loss, accuracy) in enumerate(epochs):
            model.epoch = epoch
            _update_state(state, model, best, loss, accuracy, select_by=select_by)
            state.next_epoch += 1
        kept[select_by] = (state.best_epoch, int(best["epoch"]))
    assert kept == {"balanced_accuracy": (1, 1), "loss": (3, 3)}


def test_training_with_class_weights_and_select_by_loss_records_them(cohort_tsv, tmp_path):
    summary = run_train(_config(cohort_tsv, tmp_path / "run", epochs=3, select_by="loss",
                                class_weights="balanced"))
    recorded = RunFolder(tmp_path / "run").train_config()
    assert (recorded.select_by, recorded.class_weights) == ("loss", "balanced")
    for fold in summary.fold.unique():
        history = read_tsv(tmp_path / "run" / "models" / f"fold-{fold}" / "run-0" / "history.tsv")
        rows = summary[(summary.fold == fold) & (summary.subset == "validation")]
        best = int(rows.best_epoch.iloc[0])
        assert history.validation_loss.idxmin() == best
