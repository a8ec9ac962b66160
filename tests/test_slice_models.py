"""Slice models of volumes with several sequences (paper 2): slicing, channels, random splits,
soft vote, and the steps end to end on a tiny three-class cohort."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import AFFINE
from voxplain.config import ExplainStepConfig, GroupMaskStepConfig, PredictConfig, TrainConfig
from voxplain.data.cohort import Cohort, CohortError, load_images
from voxplain.data.slicing import SliceView, foreground_slices, slice_axis_index
from voxplain.io import read_tsv
from voxplain.run import RunFolder, RunFolderError
from voxplain.run.maps import read_map_on_grid
from voxplain.steps.explain import run_explain
from voxplain.steps.masks import run_group_masks
from voxplain.steps.predict import run_predict
from voxplain.steps.train import run_train
from voxplain.train.splits import random_splits
from voxplain.train.trainer import soft_vote

SHAPE = (12, 14, 10)
CLASSES = ("CN", "RRMS", "SPMS")


def write_sequence_cohort(folder: Path, subjects: int = 18, seed: int = 0) -> Path:
    """Two co-registered sequences per session (t1, t2); RRMS has a bright blob on t2 in the
    upper slices, SPMS a dark blob on t1 in the lower ones; slices 0 and 9 are empty."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in range(subjects):
        diagnosis = CLASSES[subject % 3]
        t1 = np.zeros(SHAPE, np.float32)
        t1[2:10, 2:12, 1:9] = 0.6 + 0.05 * rng.standard_normal((8, 10, 8))
        t2 = (1.0 - t1) * (t1 > 0)
        if diagnosis == "RRMS":
            t2[4:8, 4:10, 5:8] = 1.0
        if diagnosis == "SPMS":
            t1[4:8, 4:10, 1:4] = 0.1
        t1.flat[0] = t2.flat[0] = 1.0  # maximum 1: passes the quality check
        paths = {}
        for name, volume in (("t1", t1), ("t2", t2)):
            paths[name] = f"sub-{subject:02d}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(volume, AFFINE), folder / paths[name])
        rows.append({"participant_id": f"sub-{subject:02d}", "session_id": "ses-M00",
                     "diagnosis": diagnosis, **paths})
    tsv = folder / "cohort.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return tsv


# --- slicing ---------------------------------------------------------------------------------

def test_slices_keep_their_voxels_and_stack_back_where_they_came_from():
    volumes = np.arange(2 * 1 * 4 * 5 * 6, dtype=np.float32).reshape(2, 1, 4, 5, 6)
    view = SliceView(axis=2, indices=(1, 2, 4), volume_shape=(4, 5, 6))
    slices = view.to_slices(volumes)
    assert slices.shape == (6, 1, 4, 5)
    # session 1, third kept slice (index 4) is volume[1, :, :, :, 4]
    np.testing.assert_array_equal(slices[5, 0].numpy(), volumes[1, 0, :, :, 4])
    np.testing.assert_array_equal(slices[0, 0].numpy(), volumes[0, 0, :, :, 1])
    back = view.to_volume(slices[:, 0])
    assert back.shape == (2, 4, 5, 6)
    kept = [1, 2, 4]
    np.testing.assert_array_equal(back[..., kept], volumes[:, 0][..., kept])
    assert np.isnan(back[..., [0, 3, 5]]).all()


def test_slices_across_the_first_axis_and_resized_come_back_on_the_volume_grid():
    volume = np.zeros((1, 1, 5, 8, 8), np.float32)
    volume[0, 0, 3, 2:6, 2:6] = 1.0  # a square in slice 3
    view = SliceView(axis=0, indices=(2, 3), volume_shape=(5, 8, 8), size=(16, 16))
    slices = view.to_slices(volume)
    assert slices.shape == (2, 1, 16, 16)
    assert slices[0].abs().max() == 0 and slices[1].max() > 0.9
    back = view.to_volume(slices[:, 0])[0]
    assert back[3, 2:6, 2:6].min() > 0.5 and back[3].sum() == pytest.approx(16, rel=0.1)
    assert np.abs(back[2]).max() == 0 and np.isnan(back[[0, 1, 4]]).all()


def test_the_axial_axis_is_found_from_the_affine_not_assumed():
    assert slice_axis_index("axial", AFFINE) == 2  # LAS: axis 2 is inferior-superior
    assert slice_axis_index("sagittal", AFFINE) == 0
    permuted = AFFINE[:, [2, 0, 1, 3]]  # voxel axes (S, L, A)
    assert slice_axis_index("axial", permuted) == 0
    assert slice_axis_index("coronal", permuted) == 2
    with pytest.raises(ValueError, match="unknown slice axis"):
        slice_axis_index("oblique", AFFINE)  # type: ignore[arg-type]


def test_slices_without_brain_are_dropped_from_the_top_and_bottom_only():
    image = np.zeros((4, 4, 8))
    image[:, :, 2] = 1.0  # 16 of 16 voxels
    image[0, 0, 4] = 1.0  # 1 of 16: below 10 %, but between two kept slices
    image[:, :, 5] = 1.0
    assert foreground_slices(image, axis=2, min_fraction=0.1) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="no positive voxel"):
        foreground_slices(np.zeros((3, 3, 3)), axis=0)


def test_soft_vote_averages_the_probabilities_of_each_sessions_slices():
    table = pd.DataFrame({"participant_id": ["sub-b", "sub-b", "sub-a", "sub-a", "sub-a"],
                          "session_id": ["ses-1"] * 5, "diagnosis": ["CN", "CN", "AD", "AD", "AD"],
                          "slice": [0, 1, 0, 1, 2]})
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    sessions, voted = soft_vote(table, probabilities)
    assert list(sessions.participant_id) == ["sub-b", "sub-a"] and "slice" not in sessions
    np.testing.assert_allclose(voted, [[0.6, 0.4], [0.5, 0.5]])


# --- sequences as channels -------------------------------------------------------------------

def test_sequences_become_channels_in_the_stated_order(tmp_path):
    tsv = write_sequence_cohort(tmp_path / "c", subjects=3)
    forward = Cohort.from_tsv(tsv, sequences=["t1", "t2"])
    backward = Cohort.from_tsv(tsv, sequences=["t2", "t1"])
    assert forward.image_shape == (2, *SHAPE)
    a, b = load_images(forward).array, load_images(backward).array
    t1 = nib.load(tmp_path / "c" / "sub-01_t1.nii.gz").get_fdata()
    np.testing.assert_allclose(a[1, 0], t1, atol=1e-6)
    np.testing.assert_array_equal(a[:, 0], b[:, 1])
    np.testing.assert_array_equal(a[:, 1], b[:, 0])


def test_a_sequence_on_another_grid_is_an_error_naming_the_file(tmp_path):
    tsv = write_sequence_cohort(tmp_path / "c", subjects=3)
    odd = tmp_path / "c" / "sub-02_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 14, 9), np.float32), AFFINE), odd)
    with pytest.raises(CohortError, match=r"sub-02_t2\.nii\.gz.*'t2'.*co-register"):
        Cohort.from_tsv(tsv, sequences=["t1", "t2"])
    with pytest.raises(CohortError, match="missing required columns.*flair"):
        Cohort.from_tsv(tsv, sequences=["t1", "flair"])


# --- random splits ---------------------------------------------------------------------------

def _subjects(n: int = 60) -> pd.DataFrame:
    return pd.DataFrame([{"participant_id": f"sub-{s:02d}", "session_id": f"ses-{k}",
                          "diagnosis": CLASSES[s % 3]} for s in range(n) for k in range(2)])


def test_random_splits_are_subject_level_stratified_and_sized_65_15_20():
    table = _subjects()
    splits = random_splits(table, 3, (0.65, 0.15, 0.20), seed=2)
    assert len(splits) == 3
    for split in splits:
        train, validation, test = (set(split.train.participant_id),
                                   set(split.validation.participant_id),
                                   set(split.test.participant_id))
        assert not (train & validation or train & test or validation & test)  # no leakage
        assert train | validation | test == set(table.participant_id)
        assert (len(train), len(validation), len(test)) == (39, 9, 12)
        assert (split.train.groupby("participant_id").size() == 2).all()  # every session
        assert split.test.participant_id.is_unique  # baseline only
        assert split.test.diagnosis.value_counts().to_dict() == {c: 4 for c in CLASSES}
    assert len({tuple(sorted(s.test.participant_id)) for s in splits}) == 3  # new seeds
    again = random_splits(table, 3, (0.65, 0.15, 0.20), seed=2)
    assert [list(s.test.participant_id) for s in again] == \
        [list(s.test.participant_id) for s in splits]


def test_random_split_sizes_are_checked():
    with pytest.raises(ValueError, match="at least 3 subjects per diagnosis"):
        random_splits(_subjects(6), 1)
    with pytest.raises(ValueError, match="sum to 1"):
        random_splits(_subjects(), 1, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="n_folds >= 2"):
        TrainConfig(cohort="c.tsv", run="r", n_folds=1)


# --- the steps on a slice run ----------------------------------------------------------------

@pytest.fixture(scope="module")
def slice_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("slices")
    tsv = write_sequence_cohort(folder / "cohort", subjects=18)
    config = TrainConfig.model_validate({
        "cohort": tsv, "run": folder / "run", "sequences": ["t1", "t2"], "slice_axis": "axial",
        "split": "random", "folds": 1, "epochs": 3, "batch_size": 8, "device": "cpu",
        "min_steps": 0, "select_by": "loss",
        "model": {"name": "cnn", "channels": [4, 8], "dropout": 0.0}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(config)
    finally:
        torch.set_num_threads(threads)
    return folder / "run", tsv


def test_a_slice_run_trains_on_the_slices_with_brain_and_scores_slices_and_subjects(slice_run):
    run, _ = slice_run
    folder = RunFolder(run)
    view = folder.slice_view()
    assert view is not None and view.axis == 2 and view.indices == tuple(range(1, 9))
    metrics = read_tsv(run / "models" / "fold-0" / "run-0" / "metrics.tsv")
    assert list(metrics.subset) == ["validation", "validation-slices", "test", "test-slices"]
    splits = {s: folder.read_split(0, s) for s in ("train", "validation", "test")}
    assert sum(len(t) for t in splits.values()) == 18
    slices = read_tsv(run / "models" / "fold-0" / "run-0" / "predictions-test-slices.tsv")
    sessions = read_tsv(run / "models" / "fold-0" / "run-0" / "predictions-test.tsv")
    assert len(slices) == 8 * len(splits["test"]) and len(sessions) == len(splits["test"])
    assert set(slices.participant_id) == set(splits["test"].participant_id)
    first = sessions.participant_id.iloc[0]
    mean = slices[slices.participant_id == first][[f"proba_{c}" for c in CLASSES]].mean()
    np.testing.assert_allclose(sessions.iloc[0][[f"proba_{c}" for c in CLASSES]].astype(float),
                               mean, atol=1e-5)
    model = __import__("json").loads((run / "models/fold-0/run-0/model.json").read_text())
    assert model["model"]["input_shape"] == [12, 14] and model["model"]["in_channels"] == 2


def test_slice_maps_are_stacked_back_into_volumes_with_a_per_slice_index(slice_run):
    run, _ = slice_run
    index = run_explain(ExplainStepConfig.model_validate({
        "run": run, "device": "cpu", "explain": {"method": "grad_cam", "target": "predicted",
                                                 "group": "all"}}))
    folder = run / "explanations" / "grad_cam_target-predicted_group-all" / "fold-0" / "run-0"
    assert len(index) == len(RunFolder(run).read_split(0, "validation"))
    values, grid = read_map_on_grid(folder / index.path.iloc[0])
    assert values.shape == SHAPE
    np.testing.assert_allclose(grid.affine, AFFINE)
    assert np.isnan(values[..., [0, 9]]).all() and np.isfinite(values[..., 1:9]).all()
    slices = read_tsv(folder / "slices.tsv")
    assert len(slices) == 8 * len(index) and list(slices.slice[:8]) == list(range(1, 9))
    assert (slices.target == slices.predicted).all()  # each slice explained for its own class
    assert (folder / "group_CN.nii.gz").is_file()


def test_predict_on_a_slice_run_writes_votes_and_slices(slice_run, tmp_path):
    run, tsv = slice_run
    out = tmp_path / "p.tsv"
    table = run_predict(PredictConfig(run=run, cohort=tsv, out=out, device="cpu"))
    assert len(table) == 18
    slices = read_tsv(tmp_path / "p-slices.tsv")
    assert len(slices) == 18 * 8 and set(slices.slice) == set(range(1, 9))
    columns = [f"proba_{c}" for c in CLASSES]
    means = slices.groupby("participant_id")[columns].mean()  # the soft vote, by hand
    np.testing.assert_allclose(table.set_index("participant_id").loc[means.index, columns],
                               means, atol=1e-5)


def test_masks_are_refused_on_a_slice_run(slice_run):
    run, _ = slice_run
    with pytest.raises(RunFolderError, match="classify 2D slices"):
        run_group_masks(GroupMaskStepConfig(run=run, device="cpu"))


def test_the_report_of_a_slice_run_shows_confusion_matrices_and_misclassified_slices(slice_run):
    from voxplain.config import ClassificationEvaluationConfig, ReportConfig
    from voxplain.report import build_report
    from voxplain.steps.classification import run_classification

    run, _ = slice_run
    if not (run / "explanations").is_dir():
        run_explain(ExplainStepConfig.model_validate({
            "run": run, "device": "cpu", "explain": {"method": "grad_cam",
                                                     "target": "predicted"}}))
    run_classification(ClassificationEvaluationConfig(run=run, n_boot=50))
    confusion = read_tsv(run / "evaluation" / "confusion-slices.tsv")
    mean = confusion[confusion.scope == "mean"]
    assert len(mean) == 9 and set(mean.true) == set(CLASSES)
    validation = RunFolder(run).read_split(0, "validation")
    assert mean["count"].sum() == pytest.approx(8 * len(validation))  # one model: its slices
    assert (run / "evaluation" / "slices.tsv").is_file()
    page = build_report(ReportConfig(run=run, dpi=40)).read_text()
    assert "confusion-slices.png" in page and "confusion.png" in page
    assert re.search(r"slices_sub-\d+_ses-M00\.png", page)
    assert "slices misclassified (framed in red" in page


def test_paper_2_statistics_run_on_stacked_slice_maps_and_leave_unread_slices_untested(
        slice_run):
    from voxplain.config import StatsConfig
    from voxplain.run.maps import read_map
    from voxplain.steps.stats import run_stats

    run, tsv = slice_run
    run_explain(ExplainStepConfig.model_validate({
        "run": run, "device": "cpu", "cohort": tsv, "explain": {"method": "grad_cam",
                                                                "group": "all"}}))
    key = next(p.name for p in (run / "explanations").iterdir() if "cohort" in p.name)
    summary = run_stats(StatsConfig(run=run, method=key, groups=["RRMS", "SPMS"]))
    assert (summary.tested_voxels > 0).all()
    t = read_map(run / "stats" / key / "two-sample_RRMS-SPMS_T.nii.gz")
    assert np.isnan(t[..., [0, 9]]).all() and np.isfinite(t[..., 1:9]).any()
    test = read_tsv(run / "stats" / key / "percentile_test.tsv")
    assert int(test.n_a.iloc[0]) == 6 and int(test.n_b.iloc[0]) == 6


def test_the_report_compares_networks_in_table_1s_layout(slice_run, tmp_path):
    from voxplain.config import ReportConfig
    from voxplain.report import build_report
    from voxplain.report.sections import network_row

    run, _ = slice_run
    row = network_row(run)
    metrics = read_tsv(run / "models" / "fold-0" / "run-0" / "metrics.tsv").set_index("subset")
    assert row["network"] == "cnn" and row["initialisation"] == "random"
    assert row["validation loss"] == f"{metrics.loss['validation-slices']:.3f} ± 0.000"
    assert row["test accuracy"] == f"{metrics.accuracy['test-slices']:.3f} ± 0.000"
    assert row["test accuracy (subjects)"] == f"{metrics.accuracy['test']:.3f} ± 0.000"
    page = build_report(ReportConfig(run=run, out=tmp_path / "r", compare=[run], dpi=40))
    assert "Networks compared" in page.read_text()
    alone = build_report(ReportConfig(run=run, out=tmp_path / "alone", dpi=40)).read_text()
    assert "Networks compared" not in alone
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    pd.DataFrame({"key": ["grad_cam", "grad_cam", "grad_cam", "cam", "grad_cam_target-predicted"],
                  "method": ["grad_cam", "grad_cam", "grad_cam", "cam", "grad_cam"],
                  "diagnosis": ["RRMS", "SPMS", "CN", "RRMS", "RRMS"],
                  "auc": [0.6, 0.8, np.nan, 0.1, 0.2]}).to_csv(
        copy / "evaluation" / "localisation_sessions.tsv", sep="\t", index=False)
    assert network_row(copy)["Grad-CAM localisation AUC"] == "0.700 (n=2)"
