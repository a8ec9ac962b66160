"""Robustness experiments of paper 1 (3.2-3.3) on a fake run folder of region-wide masks.

Masks are built on the SPM grid downsampled by 8 (16x19x16) and hide whole AAL2 regions, so
their ROI vectors are known by hand: a mask equal to ``1 - v`` on region R has density ``v``
in R and 0 elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from voxplain.config import RobustnessConfig
from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid, downsample_affine, downsampled_shape, spm_grid
from voxplain.steps.robustness import run_robustness, natural_key
from voxplain.io import save_nifti, write_tsv

GRID = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
ATLAS = Atlas.aal2(GRID)


def hiding(**densities: float) -> np.ndarray:
    """A mask hiding each named region with the given density (``m = 1 - density``)."""
    mask = np.ones(GRID.shape, np.float32)
    for region, density in densities.items():
        mask[ATLAS.region_mask([region])] = 1 - density
    return mask


def attribution(**values: float) -> np.ndarray:
    """An attribution map with a value per region, a little noise-free ramp elsewhere."""
    data = np.linspace(0, 0.01, np.prod(GRID.shape), dtype=np.float32).reshape(GRID.shape)
    for region, value in values.items():
        data[ATLAS.region_mask([region])] = value
    return data


def write_group_mask(run: Path, fold: int, run_index: int, mask: np.ndarray,
                     level: str = "group") -> None:
    folder = run / "masks" / level / f"fold-{fold}" / f"run-{run_index}"
    save_nifti(folder / "mask.nii.gz", mask, GRID.affine)
    (folder / "summary.json").write_text(json.dumps({"diagnosis": "AD"}))


def write_sessions(root: Path, fold: int, maps: dict[tuple[str, str], np.ndarray],
                   diagnosis: str | dict[str, str] = "AD",
                   flagged: tuple[tuple[str, str], ...] | None = None) -> None:
    folder = root / f"fold-{fold}" / "run-0"
    rows = []
    for (participant, session), values in maps.items():
        save_nifti(folder / f"{participant}_{session}.nii.gz", values, GRID.affine)
        label = diagnosis if isinstance(diagnosis, str) else diagnosis[participant]
        rows.append({"participant_id": participant, "session_id": session, "diagnosis": label,
                     "path": f"{participant}_{session}.nii.gz"})
        if flagged is not None:
            rows[-1]["flagged"] = (participant, session) in flagged
    write_tsv(folder / "index.tsv", pd.DataFrame(rows))


def read_matrix(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", index_col=0)


def summary_value(summary: pd.DataFrame, method: str, experiment: str, metric: str,
                  column: str = "mean") -> float:
    row = summary[(summary.method == method) & (summary.experiment == experiment)
                  & (summary.metric == metric)]
    assert len(row) == 1, summary
    return row.iloc[0][column]


def test_intra_subject_similarity_of_identical_sessions_is_one_and_inter_subject_is_hand_cosine(
        tmp_path):
    run = tmp_path / "run"
    write_sessions(run / "masks" / "session", 0, {
        ("sub-01", "ses-M00"): hiding(Hippocampus_L=1.0),
        ("sub-01", "ses-M12"): hiding(Hippocampus_L=1.0),
        ("sub-02", "ses-M06"): hiding(Hippocampus_L=0.5, Hippocampus_R=1.0),
        ("sub-02", "ses-M12"): hiding(Hippocampus_L=0.5, Hippocampus_R=1.0),
        ("sub-03", "ses-M00"): hiding(Precentral_L=1.0),
    })
    summary = run_robustness(RobustnessConfig(run=run))
    assert summary_value(summary, "mask", "intra-subject", "roi_cosine") == pytest.approx(1.0)
    assert summary_value(summary, "mask", "intra-subject", "roi_cosine", "n_subjects") == 2
    # baselines: sub-01 M00, sub-02 M06 (M06 before M12), sub-03 M00; cosines 0.5/sqrt(1.25),
    # 0 (disjoint regions), 0
    inter = summary_value(summary, "mask", "inter-subject", "roi_cosine")
    assert inter == pytest.approx((0.5 / math.sqrt(1.25)) / 3)
    assert summary_value(summary, "mask", "inter-subject", "roi_cosine", "n_pairs") == 3
    assert summary_value(summary, "mask", "inter-subject", "roi_cosine", "median") == \
        pytest.approx(0, abs=1e-12)  # of 0.447, 0, 0
    pairs = pd.read_csv(run / "evaluation/robustness/mask/session_pairs.tsv", sep="\t")
    assert sorted(pairs.kind.value_counts().items()) == [("inter-subject", 3),
                                                          ("intra-subject", 2)]
    matrix = read_matrix(run / "evaluation/robustness/mask/session_fold-0_run-0_roi_cosine.tsv")
    assert matrix.shape == (5, 5)
    np.testing.assert_allclose(np.diag(matrix.to_numpy()), 1.0)


def test_session_masks_flagged_as_not_converged_are_left_out_unless_asked(tmp_path, caplog):
    run = tmp_path / "run"
    write_sessions(run / "masks" / "session", 0, {
        ("sub-01", "ses-M00"): hiding(Hippocampus_L=1.0),
        ("sub-01", "ses-M12"): hiding(Precentral_L=1.0),  # the stuck mask: disjoint from M00
        ("sub-02", "ses-M00"): hiding(Hippocampus_L=1.0),
        ("sub-02", "ses-M12"): hiding(Hippocampus_L=1.0),
    }, flagged=(("sub-01", "ses-M12"),))
    with caplog.at_level(logging.WARNING, logger="voxplain"):
        summary = run_robustness(RobustnessConfig(run=run))
    assert "sub-01_ses-M12" in caplog.text and "--include-flagged" in caplog.text
    # left out: sub-01 has one session (no intra pair); sub-02's pair is identical
    assert summary_value(summary, "mask", "intra-subject", "roi_cosine") == pytest.approx(1.0)
    assert summary_value(summary, "mask", "intra-subject", "roi_cosine", "n_subjects") == 1
    kept = run_robustness(RobustnessConfig(run=run, include_flagged=True))
    # kept: sub-01's sessions are disjoint (cosine 0), sub-02's identical (1): mean 0.5
    assert summary_value(kept, "mask", "intra-subject", "roi_cosine") == pytest.approx(0.5)
    assert summary_value(kept, "mask", "intra-subject", "roi_cosine", "n_subjects") == 2


def test_inter_fold_and_inter_run_similarity_are_means_of_the_pairs(tmp_path):
    run = tmp_path / "run"
    write_group_mask(run, 0, 0, hiding(Hippocampus_L=1.0))
    write_group_mask(run, 0, 1, hiding(Hippocampus_L=1.0))
    write_group_mask(run, 1, 0, hiding(Hippocampus_L=1.0))
    write_group_mask(run, 1, 1, hiding(Hippocampus_L=1.0, Hippocampus_R=1.0))
    summary = run_robustness(RobustnessConfig(run=run))
    half = 1 / math.sqrt(2)
    # inter-run: (f0r0, f0r1) = 1, (f1r0, f1r1) = 1/sqrt 2; inter-fold: (f0r0, f1r0) = 1,
    # (f0r1, f1r1) = 1/sqrt 2
    assert summary_value(summary, "mask", "inter-run", "roi_cosine") == pytest.approx(
        (1 + half) / 2)
    assert summary_value(summary, "mask", "inter-fold", "roi_cosine") == pytest.approx(
        (1 + half) / 2)
    assert summary_value(summary, "mask", "inter-fold", "roi_cosine", "n_pairs") == 2
    matrix = read_matrix(run / "evaluation/robustness/mask/group_AD_roi_cosine.tsv")
    assert list(matrix.index) == ["fold-0_run-0", "fold-0_run-1", "fold-1_run-0", "fold-1_run-1"]
    assert matrix.loc["fold-0_run-0", "fold-1_run-1"] == pytest.approx(half)


def grid_setting(l1, l2, b1, b2):
    return f"l1-{l1:g}_l2-{l2:g}_b1-{b1:g}_b2-{b2:g}"


def test_grid_tables_have_the_layout_of_paper_1_tables_2_and_3(tmp_path):
    run = tmp_path / "run"
    b1_masks = {0.1: hiding(Hippocampus_L=1.0), 0.5: hiding(Hippocampus_L=1.0),
                1.0: hiding(Hippocampus_L=1.0, Hippocampus_R=1.0)}
    for b1, mask in b1_masks.items():
        write_group_mask(run, 0, 0, mask, f"grid/{grid_setting(1e-4, 1e-3, b1, 1)}")
    for l1, mask in {1e-4: hiding(Precentral_L=1.0), 1e-2: hiding(Precentral_L=1.0)}.items():
        write_group_mask(run, 0, 0, mask, f"grid/{grid_setting(l1, 1e-2, 0.1, 1)}")
    summary = run_robustness(RobustnessConfig(run=run))
    folder = run / "evaluation/robustness/mask"
    b1 = pd.read_csv(folder / "grid_fold-0_run-0_b1_at_l1-0.0001_l2-0.001_b2-1.tsv", sep="\t")
    assert b1.columns.tolist() == ["b1", "b1 = 0.1", "b1 = 0.5", "b1 = 1"]
    assert b1.b1.tolist() == ["b1 = 0.1", "b1 = 0.5", "b1 = 1"]  # betas ascending
    values = b1.iloc[:, 1:].to_numpy(float)
    assert np.isnan(np.diag(values)).all()
    half = 1 / math.sqrt(2)
    np.testing.assert_allclose(values[0, 1:], [1.0, half])
    np.testing.assert_allclose(values, values.T)
    l1 = pd.read_csv(folder / "grid_fold-0_run-0_l1_at_l2-0.01_b1-0.1_b2-1.tsv", sep="\t")
    assert l1.l1.tolist() == ["l1 = 0.01", "l1 = 0.0001"]  # lambdas descending, as the paper
    # neighbours: (0.1, 0.5) = 1 and (0.5, 1) = 1/sqrt 2
    assert summary_value(summary, "mask", "grid b1 neighbours at l1-0.0001_l2-0.001_b2-1",
                         "roi_cosine") == pytest.approx((1 + half) / 2)
    assert not any("b2 neighbours" in e for e in summary.experiment)  # one b2 value only


def test_grid_tables_compare_masks_of_one_learning_rate(tmp_path):
    """Paper 1, fig. 4: masks at lr 0.01 beside those at the mask's lr; tables never mix the
    two, and name theirs."""
    run = tmp_path / "run"
    for suffix, masks in (("", {0.1: hiding(Hippocampus_L=1.0), 1.0: hiding(Amygdala_L=1.0)}),
                          ("_lr-0.01", {0.1: hiding(Precentral_L=1.0),
                                        1.0: hiding(Precentral_L=1.0)})):
        for b1, mask in masks.items():
            write_group_mask(run, 0, 0, mask, f"grid/{grid_setting(1e-4, 1e-3, b1, 1)}{suffix}")
    run_robustness(RobustnessConfig(run=run))
    folder = run / "evaluation/robustness/mask"
    for rate, similarity in (("0.1", 0.0), ("0.01", 1.0)):
        table = pd.read_csv(folder / f"grid_fold-0_run-0_b1_at_l1-0.0001_l2-0.001_b2-1_lr-{rate}"
                            ".tsv", sep="\t")
        assert table.iloc[0, 2] == pytest.approx(similarity)


def test_missing_parts_of_the_run_folder_are_skipped_with_a_message(tmp_path, caplog):
    run = tmp_path / "run"
    write_sessions(run / "masks" / "session", 0, {("sub-01", "ses-M00"): hiding(Hippocampus_L=1.0),
                                                  ("sub-02", "ses-M00"): hiding(Amygdala_L=1.0)})
    with caplog.at_level(logging.INFO, logger="voxplain"):
        summary = run_robustness(RobustnessConfig(run=run))
    assert summary.experiment.tolist() == ["inter-subject"]
    messages = caplog.text
    assert "no group map" in messages and "intra-subject skipped" in messages
    assert "hyperparameter tables skipped" in messages
    assert (run / "evaluation/robustness/summary.tsv").is_file()
    empty = run_robustness(RobustnessConfig(run=tmp_path / "empty"))
    assert empty.empty and list(empty.columns)[:3] == ["method", "experiment", "diagnosis"]


def test_attribution_methods_get_the_same_experiments_with_rank_correlation(tmp_path):
    run = tmp_path / "run"
    write_sessions(run / "masks" / "session", 0, {
        ("sub-01", "ses-M00"): hiding(Hippocampus_L=1.0),
        ("sub-01", "ses-M12"): hiding(Hippocampus_L=1.0)})
    base = attribution(Hippocampus_L=1.0, Hippocampus_R=0.5)
    write_sessions(run / "explanations" / "grad_cam", 0, {
        ("sub-01", "ses-M00"): base, ("sub-01", "ses-M12"): 3 * base,   # same ranks, same ROI
        ("sub-02", "ses-M00"): 1 - base,                                 # reversed ranks
        ("sub-02", "ses-M12"): 1 - base}, diagnosis={"sub-01": "AD", "sub-02": "AD"})
    folder = run / "explanations" / "grad_cam"
    for fold in (0, 1):
        save_nifti(folder / f"fold-{fold}" / "run-0" / "group_AD.nii.gz", base, GRID.affine)
    summary = run_robustness(RobustnessConfig(run=run))
    assert set(summary.method) == {"mask", "grad_cam"}
    assert summary_value(summary, "grad_cam", "intra-subject", "rank_correlation") == \
        pytest.approx(1.0)
    # inside the brain a map and 1 - map have exactly reversed ranks
    assert summary_value(summary, "grad_cam", "inter-subject", "rank_correlation") == \
        pytest.approx(-1.0)
    assert summary_value(summary, "grad_cam", "intra-subject", "roi_cosine") == pytest.approx(1.0)
    assert summary_value(summary, "grad_cam", "inter-fold", "roi_cosine") == pytest.approx(1.0)
    assert summary_value(summary, "mask", "intra-subject", "roi_cosine") == pytest.approx(1.0)
    only = run_robustness(RobustnessConfig(run=run, methods=["grad_cam"]))
    assert set(only.method) == {"grad_cam"}


def test_across_datasets_compares_the_same_fold_and_run_of_two_run_folders(tmp_path):
    first, second = tmp_path / "adni", tmp_path / "aibl"
    write_group_mask(first, 0, 0, hiding(Hippocampus_L=1.0))
    write_group_mask(first, 1, 0, hiding(Hippocampus_L=1.0))
    write_group_mask(second, 0, 0, hiding(Hippocampus_L=1.0, Hippocampus_R=1.0))
    summary = run_robustness(RobustnessConfig(run=first, other_run=second))
    assert summary_value(summary, "mask", "across datasets", "roi_cosine") == pytest.approx(
        1 / math.sqrt(2))
    assert summary_value(summary, "mask", "across datasets", "roi_cosine", "n_pairs") == 1


def test_baseline_is_the_first_session_in_natural_order():
    assert sorted(["ses-M12", "ses-M6", "ses-M00"], key=natural_key) == \
        ["ses-M00", "ses-M6", "ses-M12"]


def test_cli_evaluate_robustness_writes_the_summary(tmp_path):
    from typer.testing import CliRunner

    from voxplain.cli import app

    run = tmp_path / "run"
    write_group_mask(run, 0, 0, hiding(Hippocampus_L=1.0))
    write_group_mask(run, 1, 0, hiding(Hippocampus_L=1.0))
    result = CliRunner().invoke(app, ["evaluate", "robustness", "--run", str(run)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(run / "evaluation/robustness/summary.tsv", sep="\t")
    assert summary[["experiment", "metric", "mean"]].values.tolist() == [
        ["inter-fold", "roi_cosine", pytest.approx(1.0)]]


def test_cli_evaluate_classification_writes_metrics_with_cis(tmp_path):
    from typer.testing import CliRunner

    from voxplain.cli import app

    run = tmp_path / "run"
    # fold 0: 3 of 4 right (one AD called CN); fold 1: all right -> balanced accuracy 0.75, 1
    for fold, calls in ((0, ["CN", "CN", "AD", "CN"]), (1, ["CN", "CN", "AD", "AD"])):
        table = pd.DataFrame({"participant_id": [f"sub-{fold}{i}" for i in range(4)],
                              "session_id": "ses-M00", "diagnosis": ["CN", "CN", "AD", "AD"],
                              "proba_CN": [0.9 if c == "CN" else 0.1 for c in calls]})
        table["proba_AD"] = 1 - table.proba_CN
        write_tsv(run / "models" / f"fold-{fold}" / "run-0" / "predictions-validation.tsv",
                  table)
    result = CliRunner().invoke(app, ["evaluate", "classification", "--run", str(run),
                                      "--n-boot", "50"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(run / "evaluation/classification.tsv", sep="\t")
    mean = metrics[(metrics.scope == "mean") & (metrics.metric == "balanced_accuracy")].iloc[0]
    assert mean.value == pytest.approx(0.875) and mean.per_fold == "0.75, 1"
    assert {"ci_low", "ci_high"} <= set(metrics.columns)
    assert "balanced_accuracy" in result.output


@pytest.mark.slow
def test_prob_cnn_of_a_mask_on_its_own_context_is_the_mask_steps_probability_after(tmp_path):
    from conftest import write_cohort
    from voxplain.config import GroupMaskStepConfig, SessionMaskStepConfig, TrainConfig
    from voxplain.steps.masks import run_group_masks, run_session_masks
    from voxplain.steps.train import run_train

    tsv = write_cohort(tmp_path / "cohort", subjects=24, shape=(12, 14, 12))
    run = tmp_path / "run"
    run_train(TrainConfig(cohort=tsv, out=run, folds=2, epochs=6, batch_size=4,
                             learning_rate=3e-3, device="cpu",
                             model={"name": "cnn", "channels": [4, 8, 8]}))
    groups = run_group_masks(GroupMaskStepConfig(run=run, folds=[0, 1], device="cpu",
                                             mask={"max_epochs": 2, "batch_size": 4}))
    sessions = run_session_masks(SessionMaskStepConfig(
        run=run, folds=[0], device="cpu", max_sessions=4,
        mask={"max_iterations": 10, "patience": 5, "batch_size": 4}))
    # two-epoch masks of a toy model are flagged (dense); the formula is what is checked here
    summary = run_robustness(RobustnessConfig(run=run, prob_cnn=True, device="cpu",
                                                   include_flagged=True))
    folder = run / "evaluation/robustness/mask"
    matrix = read_matrix(folder / "group_prob_cnn.tsv")
    assert matrix.shape == (2, 2)
    # entry [i, i]: model i, its validation patients, its own mask = the mask step's figure
    np.testing.assert_allclose(np.diag(matrix.to_numpy()),
                               groups.sort_values("fold").probability_after, rtol=1e-4)
    assert summary_value(summary, "mask", "inter-fold", "prob_cnn") == pytest.approx(
        (matrix.iloc[0, 1] + matrix.iloc[1, 0]) / 2)
    per_session = read_matrix(folder / "session_fold-0_run-0_prob_cnn.tsv")
    expected = sessions.set_index(sessions.participant_id + "_" + sessions.session_id)
    np.testing.assert_allclose(np.diag(per_session.to_numpy()),
                               expected.loc[per_session.index, "probability_after"], rtol=1e-4)


def test_2d_attribution_maps_get_rank_correlation_and_png_previews_are_ignored(tmp_path):
    run = tmp_path / "run"
    ramp = np.arange(64, dtype=np.float32).reshape(8, 8)
    for fold, values in ((0, ramp), (1, ramp**2), (2, -ramp)):
        folder = run / "explanations" / "saliency" / f"fold-{fold}" / "run-0"
        folder.mkdir(parents=True)
        np.save(folder / "group_AD.npy", values)
        (folder / "group_AD.png").write_bytes(b"not an image")
    summary = run_robustness(RobustnessConfig(run=run))
    matrix = read_matrix(run / "evaluation/robustness/saliency/group_AD_rank_correlation.tsv")
    # monotone transforms keep Spearman at 1; a reversal gives -1
    np.testing.assert_allclose(matrix.to_numpy(), [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    assert summary_value(summary, "saliency", "inter-fold", "rank_correlation") == \
        pytest.approx(-1 / 3)
    assert "roi_cosine" not in set(summary.metric)  # no atlas for 2D images
