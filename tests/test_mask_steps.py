"""Mask steps on a run folder: which sessions, which files, resume (paper 1, 2.3.3-2.3.4)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import write_cohort
from voxplain.config import (GroupMaskConfig, GroupMaskStepConfig, MaskGridConfig,
                             SessionMaskStepConfig, TrainConfig)
from voxplain.steps.masks import grid_settings, run_group_masks, run_mask_grid, run_session_masks
from voxplain.steps.train import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    tsv = write_cohort(folder / "cohort", subjects=24)
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=6, batch_size=4,
                             learning_rate=3e-3, device="cpu",
                             model={"name": "cnn", "channels": [4, 8, 8]}))
    return folder / "run"


def test_group_masks_write_the_mask_its_losses_and_quality_flags(trained_run):
    config = GroupMaskStepConfig(run=trained_run, folds=[0], device="cpu",
                                 mask={"max_epochs": 4, "batch_size": 4})
    summary = run_group_masks(config)
    folder = trained_run / "masks/group/fold-0/run-0"
    mask = nib.load(folder / "mask.nii.gz")
    reference = nib.load(trained_run.parent / "cohort" / "sub-00_ses-M00.nii.gz")
    np.testing.assert_allclose(mask.affine, reference.affine)
    values = mask.get_fdata()
    assert values.shape == (20, 24, 20) and values.min() >= 0 and values.max() <= 1
    assert not ((values > 0.95) & (values < 1)).any()  # thresholded
    losses = pd.read_csv(folder / "image_losses.tsv", sep="\t")
    split = pd.read_csv(trained_run / "splits/fold-0/train.tsv", sep="\t")
    assert set(losses.participant_id) <= set(split[split.diagnosis == "AD"].participant_id)
    flags = pd.read_csv(folder / "qc_flags.tsv", sep="\t")
    assert set(flags.columns) >= {"participant_id", "session_id", "robust_z", "flagged"}
    record = json.loads((folder / "summary.json").read_text())
    assert record["diagnosis"] == "AD" and len(record["top_regions"]) == 5
    assert summary.fold.tolist() == [0]
    again = run_group_masks(config)  # finished: read back, not recomputed
    assert again.probability_after.tolist() == summary.probability_after.tolist()
    assert not (folder / "checkpoint.safetensors").exists()


def test_session_masks_cover_validation_subjects_only(trained_run):
    config = SessionMaskStepConfig(run=trained_run, folds=[1], device="cpu", max_sessions=3,
                                   mask={"max_iterations": 20, "patience": 5, "batch_size": 2})
    index = run_session_masks(config)
    validation = pd.read_csv(trained_run / "splits/fold-1/validation.tsv", sep="\t")
    assert 0 < len(index) <= 3
    assert set(index.participant_id) <= set(validation.participant_id)
    assert (index.diagnosis == "AD").all()
    assert {"robust_z", "flagged"} <= set(index.columns)
    folder = trained_run / "masks/session/fold-1/run-0"
    for name in index.path:
        assert nib.load(folder / name).shape == (20, 24, 20)


def test_one_at_a_time_grid_varies_each_hyperparameter_around_the_mask_settings(tmp_path):
    config = MaskGridConfig(run=tmp_path, l1=[1e-3, 1e-4], l2=[1e-3, 1e-2], b1=[0.1, 2.0],
                            b2=[1.0, 3.0], design="one-at-a-time", mask={"l2": 1e-3})
    # centre (1e-4, 1e-3, 0.1, 1) once, then one hyperparameter away from it at a time, at the
    # [mask] learning rate
    assert grid_settings(config) == [(1e-3, 1e-3, 0.1, 1.0, 0.1), (1e-4, 1e-3, 0.1, 1.0, 0.1),
                                     (1e-4, 1e-2, 0.1, 1.0, 0.1), (1e-4, 1e-3, 2.0, 1.0, 0.1),
                                     (1e-4, 1e-3, 0.1, 3.0, 0.1)]
    full = grid_settings(config.model_copy(update={"design": "full"}))
    assert len(full) == 2**4 and (1e-3, 1e-2, 2.0, 3.0, 0.1) in full
    rates = config.model_copy(update={"learning_rate": [0.1, 0.01]})
    assert grid_settings(rates)[-1] == (1e-4, 1e-3, 0.1, 1.0, 0.01)
    assert len(grid_settings(rates.model_copy(update={"design": "full"}))) == 2**5


def test_grid_keys_masks_by_their_hyperparameters(trained_run):
    """Paper 1, fig. 4: a learning rate of 0.01 beside the [mask] one (0.1); the settings at
    the [mask] learning rate keep the folder names of grids without that dimension."""
    from voxplain.run import RunFolder
    from voxplain.run.maps import grid_masks

    config = MaskGridConfig(run=trained_run, folds=[2], device="cpu", b1=[0.1, 1.0],
                            learning_rate=[0.1, 0.01], mask={"max_epochs": 2, "batch_size": 8})
    table = run_mask_grid(config)
    assert sorted(table.b1) == [0.1, 0.1, 1.0, 1.0]
    assert sorted(table.learning_rate) == [0.01, 0.01, 0.1, 0.1]
    grid = trained_run / "masks/grid"
    for setting in ("l1-0.0001_l2-0.01_b1-0.1_b2-1", "l1-0.0001_l2-0.01_b1-1_b2-1",
                    "l1-0.0001_l2-0.01_b1-0.1_b2-1_lr-0.01", "l1-0.0001_l2-0.01_b1-1_b2-1_lr-0.01"):
        assert (grid / setting / "fold-2/run-0/mask.nii.gz").is_file()
    slow, fast = (nib.load(grid / setting / "fold-2/run-0/mask.nii.gz").get_fdata()
                  for setting in ("l1-0.0001_l2-0.01_b1-0.1_b2-1_lr-0.01",
                                  "l1-0.0001_l2-0.01_b1-0.1_b2-1"))
    assert not np.array_equal(slow, fast)
    assert (grid / "summary.tsv").is_file()
    found = grid_masks(RunFolder(trained_run))
    assert sorted(zip(found.b1, found.learning_rate)) == [(0.1, 0.01), (0.1, 0.1), (1.0, 0.01),
                                                          (1.0, 0.1)]


def test_grid_folders_without_a_learning_rate_read_as_the_recorded_one(tmp_path):
    """A grid written before the learning rate was a dimension: its folders used the [mask]
    learning rate of [mask_grid]."""
    from voxplain.run import RunFolder
    from voxplain.run.maps import grid_masks

    run = tmp_path / "run"
    for setting in ("l1-0.0001_l2-0.01_b1-0.1_b2-1", "l1-0.0001_l2-0.1_b1-0.1_b2-1_lr-0.01"):
        path = _summary(run, f"grid/{setting}", 0, 0.01)
        (path.parent / "mask.nii.gz").write_bytes(b"")  # listed, not read
    found = grid_masks(RunFolder(run))
    assert found[["l2", "learning_rate"]].values.tolist() == [[0.01, 0.1], [0.1, 0.01]]
    (run / "config.toml").write_text("[mask_grid]\nrun = \"run\"\n\n[mask_grid.mask]\n"
                                     "learning_rate = 0.05\n")
    assert grid_masks(RunFolder(run)).learning_rate.tolist() == [0.05, 0.01]


def test_a_target_index_outside_the_classes_is_refused(trained_run):
    with pytest.raises(ValueError, match=r"target class 2 is not an index of the classes"):
        run_session_masks(SessionMaskStepConfig(run=trained_run, folds=[0], device="cpu",
                                            mask={"target": 2, "max_iterations": 2}))


def test_a_diagnosis_that_is_not_a_class_is_refused(trained_run):
    with pytest.raises(ValueError, match="diagnosis 'MCI' is not a class of the model"):
        run_group_masks(GroupMaskStepConfig(run=trained_run, folds=[0], diagnosis="MCI",
                                        device="cpu"))


def test_group_masks_find_the_atrophied_regions_of_a_synthetic_cohort(tmp_path):
    """Paper 1, 3.2.1 on ground truth: the most masked AAL2 regions are the atrophied ones."""
    from voxplain.config import DEFAULT_ATROPHY_REGIONS, AtrophyCohortConfig
    from voxplain.data.synthetic import generate_atrophy_cohort

    tsv = generate_atrophy_cohort(AtrophyCohortConfig(out=tmp_path / "cohort", subjects=40,
                                                      sessions=1, downsample=5, seed=3))
    # patience = epochs: 26 training images give 4 steps per epoch, too few for patience 5
    run_train(TrainConfig(cohort=tsv, out=tmp_path / "run", folds=3, epochs=20, patience=20,
                             device="cpu",
                             model={"name": "cnn", "channels": [8, 16, 32, 64]}))
    summary = run_group_masks(GroupMaskStepConfig(run=tmp_path / "run", device="cpu"))
    assert len(summary) == 3
    for row in summary.itertuples():
        assert row.probability_after < 0.1, row
        hits = set(row.top_regions) & set(DEFAULT_ATROPHY_REGIONS)
        assert len(hits) >= 2, row.top_regions


def _summary(run, level, fold, fraction, before=0.9, after=0.01):
    folder = run / "masks" / level / f"fold-{fold}" / "run-0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({
        "fold": fold, "run": 0, "diagnosis": "AD", "masked_fraction": fraction,
        "probability_before": before, "probability_after": after, "top_regions": []}))
    return folder / "summary.json"


def test_a_dense_mask_and_one_that_does_not_hide_the_class_are_flagged_in_their_summary(
        tmp_path):
    """Fractions 0.010, 0.012, 0.009, 0.015 and 0.20 (median 0.012, robust z in the hundreds,
    0.19 above it): fold 4 is flagged as far denser than the others; fold 1's probability
    0.9 -> 0.6 is not halved."""
    from voxplain.steps.masks import flag_group_masks
    from voxplain.run import RunFolder

    run = tmp_path / "run"
    for fold, fraction in enumerate([0.010, 0.012, 0.009, 0.015, 0.20]):
        _summary(run, "group", fold, fraction, after=0.6 if fold == 1 else 0.01)
    flags = flag_group_masks(RunFolder(run), GroupMaskConfig()).set_index("fold")
    assert flags.flagged.tolist() == [False, True, False, False, True]
    assert "not halved" in flags.flag_reasons[1][0]
    assert "masks 0.20 of the image" in flags.flag_reasons[4][0]
    written = json.loads((run / "masks/group/fold-4/run-0/summary.json").read_text())
    assert written["flagged"] and written["flag_reasons"] == flags.flag_reasons[4]
    assert json.loads((run / "masks/group/fold-0/run-0/summary.json").read_text())["flagged"] \
        is False
    # a spread of ordinary masks (all within 0.05 of the median) flags none
    for fold, fraction in enumerate([0.010, 0.012, 0.009, 0.015, 0.04]):
        _summary(run, "group", fold, fraction)
    assert not flag_group_masks(RunFolder(run), GroupMaskConfig()).flagged.any()
    # when most masks are dense the relative rule cannot see them; the absolute one does
    for fold, fraction in enumerate([0.50, 0.51, 0.49, 0.015, 0.01]):
        _summary(run, "group", fold, fraction)
    flags = flag_group_masks(RunFolder(run), GroupMaskConfig()).set_index("fold")
    assert flags.flagged.tolist() == [True, True, True, False, False]
    assert "hides 0.50 of the image (more than 0.25)" in flags.flag_reasons[0][0]


def test_flagged_group_masks_are_left_out_of_robustness_unless_asked(tmp_path, caplog):
    from voxplain.run.maps import group_maps
    from voxplain.steps.masks import flag_group_masks
    from voxplain.run import RunFolder

    run = tmp_path / "run"
    for fold, fraction in enumerate([0.010, 0.012, 0.009, 0.015, 0.50]):
        path = _summary(run, "group", fold, fraction)
        (path.parent / "mask.nii.gz").write_bytes(b"")  # listed, not read
    flag_group_masks(RunFolder(run), GroupMaskConfig())
    assert group_maps(RunFolder(run), "mask", include_flagged=False).fold.tolist() == [0, 1, 2, 3]
    assert "1 flagged mask(s) left out" in caplog.text
    assert len(group_maps(RunFolder(run), "mask", include_flagged=True)) == 5


def test_a_dense_group_mask_is_optimised_again_at_a_tenth_of_the_learning_rate(tmp_path):
    tsv = write_cohort(tmp_path / "cohort", subjects=24)
    run = tmp_path / "run"
    run_train(TrainConfig(cohort=tsv, out=run, n_folds=3, epochs=6, batch_size=4,
                          learning_rate=3e-3, device="cpu",
                          model={"name": "cnn", "channels": [4, 8, 8]}))
    # every mask hides more than a millionth of the image: the retry always runs here
    config = GroupMaskStepConfig(run=run, folds=[0], device="cpu",
                                 mask={"max_epochs": 3, "batch_size": 4, "dense_fraction": 1e-6,
                                       "qc_step2": "flag"})
    summary = run_group_masks(config)
    folder = run / "masks/group/fold-0/run-0"
    record = json.loads((folder / "summary.json").read_text())
    retry = record["dense_retry"]
    assert retry["dense_learning_rate"] == 0.1 and retry["learning_rate"] == pytest.approx(0.01)
    assert retry["dense_masked_fraction"] > 1e-6 and retry["dense_epochs"] == 3
    dense = nib.load(folder / "dense" / "mask.nii.gz").get_fdata()
    assert (dense < 1).mean() == pytest.approx(retry["dense_masked_fraction"], abs=1e-6)
    first, second = (pd.read_csv(path, sep="\t") for path in
                     (folder / "dense" / "loss.tsv", folder / "loss.tsv"))
    assert not np.allclose(first.train_loss, second.train_loss)  # another learning rate
    assert not list(folder.rglob("checkpoint*"))
    assert summary.fold.tolist() == [0]
