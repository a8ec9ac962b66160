"""Baselines of the localisation scores: each map against a hand-computed case, and the rows the
localisation step writes for them beside the methods."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import AFFINE, SHAPE, write_cohort
from scipy import stats
from sklearn.metrics import roc_auc_score

from voxplain.config import ExplainStepConfig, TrainConfig
from voxplain.data.grid import Grid
from voxplain.data.template import brain_mask
from voxplain.evaluate.baselines import (activation_pattern, baseline_method, edge_map,
                                         compare_with_baseline, input_map, is_baseline,
                                         linear_maps, random_map, training_maps,
                                         welch_t_map)
from voxplain.explain.api import Explainer
from voxplain.explain.methods import METHODS
from voxplain.steps.explain import run_explain
from voxplain.steps.localisation import evaluate_localisation, evaluate_session_localisation
from voxplain.steps.train import run_train

BASELINES = ["baseline:random", "baseline:input", "baseline:edge", "baseline:t_map",
             "baseline:linear_weights", "baseline:linear_pattern"]


# --- the maps --------------------------------------------------------------------------------

def test_random_map_is_uniform_reproducible_by_seed_and_differs_between_seeds():
    first = random_map((4, 5, 6), np.random.default_rng(3))
    assert first.shape == (4, 5, 6) and (first >= 0).all() and (first < 1).all()
    np.testing.assert_array_equal(first, random_map((4, 5, 6), np.random.default_rng(3)))
    assert not np.allclose(first, random_map((4, 5, 6), np.random.default_rng(4)))


def test_input_map_is_the_image_averaged_over_channels():
    image = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 3.0)])
    np.testing.assert_array_equal(input_map(image), np.full((2, 3), 2.0))


def test_edge_filter_of_a_unit_step_is_half_a_unit_per_voxel_on_both_sides_of_it():
    step = np.zeros((6, 3, 4))
    step[3:] = 1.0  # the step lies between x = 2 and x = 3
    expected = np.zeros((6, 3, 4))
    expected[2:4] = 0.5  # central difference (1 - 0) / 2 at x = 2 and 3, flat elsewhere
    np.testing.assert_allclose(edge_map(step), expected)
    np.testing.assert_allclose(edge_map(step, (2.0, 1.0, 1.0)), expected / 2)  # per mm
    np.testing.assert_allclose(edge_map(step[:, :, 0]), expected[:, :, 0])  # 2D the same way


def test_edge_filter_of_a_ramp_is_its_slope_per_mm():
    x, y = np.meshgrid(np.arange(8.0), np.arange(9.0), indexing="ij")
    ramp = 3.0 * x * 2.0 + 4.0 * y * 0.5  # voxels of 2 x 0.5 mm: 3 per mm along x, 4 along y
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(edge_map(ramp, (2.0, 0.5))[inner], 5.0)  # sqrt(3^2 + 4^2)


def test_t_map_is_welch_s_t_of_patients_minus_controls_and_zero_without_variance():
    rng = np.random.default_rng(0)
    patients, controls = rng.normal(0, 1, (5, 3, 4)), rng.normal(1, 2, (7, 3, 4))
    expected = stats.ttest_ind(patients, controls, axis=0, equal_var=False).statistic
    patients[:, 0, 0] = controls[:, 0, 0] = 2.0  # no variance: no evidence
    t = welch_t_map(patients, controls)
    np.testing.assert_allclose(t.ravel()[1:], expected.ravel()[1:])
    assert t[0, 0] == 0.0


def test_activation_pattern_puts_nothing_on_a_pure_distractor():
    """Haufe et al. 2014, fig. 1: x1 = signal + distractor, x2 = distractor. The filter
    w = (1, -1) cancels the distractor; the pattern Cov(x) w = (var(s), 0) shows that only x1
    carries the signal."""
    signal = np.array([1.0, -1.0, 1.0, -1.0])
    distractor = np.array([1.0, 1.0, -1.0, -1.0])  # uncorrelated with the signal
    features = np.stack([signal + distractor, distractor], axis=1)
    np.testing.assert_allclose(activation_pattern(features, np.array([1.0, -1.0])),
                               [4 / 3, 0.0], atol=1e-12)  # var(s) = 4 / (4 - 1)


def test_linear_weights_point_up_where_patients_are_brighter_and_are_zero_outside_the_brain():
    rng = np.random.default_rng(0)
    patient = np.arange(20) % 2 == 1
    images = rng.normal(0, 1, (20, 2, 3))
    images[patient, 0, 0] += 4.0  # separable by voxel (0, 0) alone
    brain = np.ones((2, 3), dtype=bool)
    brain[1, 2] = False
    maps = linear_maps(images, patient, brain, seed=0)
    for name in ("linear_weights", "linear_pattern"):
        values = maps[name]
        assert values[0, 0] > 0 and np.abs(values[0, 0]) == np.abs(values).max()
        assert values[1, 2] == 0.0
    again = linear_maps(images, patient, brain, seed=0)
    np.testing.assert_array_equal(again["linear_weights"], maps["linear_weights"])


def test_training_maps_average_the_channels_first():
    rng = np.random.default_rng(1)
    images = rng.normal(0, 1, (8, 2, 3, 3))
    patient = np.arange(8) < 4
    mean = images.mean(axis=1)
    maps = training_maps(images, patient, None, seed=0)
    np.testing.assert_allclose(maps["t_map"], stats.ttest_ind(
        mean[patient], mean[~patient], axis=0, equal_var=False).statistic)
    assert set(maps) == {"t_map", "linear_weights", "linear_pattern"}


def test_baseline_names():
    assert baseline_method("edge") == "baseline:edge" and is_baseline("baseline:edge")
    assert not is_baseline("grad_cam")
    with pytest.raises(ValueError, match="unknown baseline 'sobel'; available: random"):
        baseline_method("sobel")


# --- the localisation step -------------------------------------------------------------------

#: The centre cube where the fixture's AD volumes are darker (conftest.write_cohort).
CUBE = tuple(slice(s // 2 - 3, s // 2 + 3) for s in SHAPE)


class CubeProbe(Explainer):
    """Points exactly at the darker cube, whatever the input."""

    name = "test_baseline_cube"
    signed = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(len(x), 1, *x.shape[2:])
        maps[(slice(None), slice(None), *CUBE)] = 1.0
        return maps


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory):
    """A 2-fold run of 12 subjects whose cohort names every session's truth (the cube for AD,
    nothing for CN), explained by the cube probe (every session of the group maps)."""
    folder = tmp_path_factory.mktemp("baselines")
    tsv = write_cohort(folder / "cohort", subjects=12)
    cohort = pd.read_csv(tsv, sep="\t")
    truth = np.zeros(SHAPE, np.float32)
    truth[CUBE] = 1.0
    nib.save(nib.Nifti1Image(truth, AFFINE), folder / "cohort" / "truth.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE),
             folder / "cohort" / "none.nii.gz")
    cohort.assign(truth_path=np.where(cohort.diagnosis == "AD", "truth.nii.gz", "none.nii.gz")
                  ).to_csv(tsv, sep="\t", index=False)
    run = folder / "run"
    run_train(TrainConfig(cohort=tsv, out=run, folds=2, epochs=1, batch_size=4, device="cpu",
                          model={"name": "cnn", "channels": [2, 4, 4]}))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(METHODS, CubeProbe.name, CubeProbe)
        run_explain(ExplainStepConfig(run=run, device="cpu",
                                      explain={"method": CubeProbe.name, "group": "all"}))
    return run, folder / "cohort"


@pytest.mark.slow
def test_group_table_holds_every_baseline_for_every_fold_beside_the_methods(explained_run):
    run, cohort = explained_run
    table = evaluate_localisation(run, cohort / "truth.nii.gz")
    assert table.method.tolist() == ["test_baseline_cube"] * 2 + [
        method for _ in range(2) for method in BASELINES]
    baselines = table[table.method.str.startswith("baseline:")]
    assert (baselines.key == baselines.method).all() and (baselines.layer == "").all()
    assert (table.diagnosis == "AD").all()
    by = baselines.set_index(["method", "fold"])
    # the t-map of the training set finds the darker cube; a random map does not
    assert (by.loc["baseline:t_map"].auc > 0.95).all()
    assert (by.loc["baseline:random"].auc.between(0.3, 0.7)).all()
    written = pd.read_csv(run / "evaluation/localisation.tsv", sep="\t")
    assert written.method.tolist() == table.method.tolist()


@pytest.mark.slow
def test_input_baseline_is_the_mean_image_of_the_group_maps_sessions_scored_alike(explained_run):
    run, cohort = explained_run
    table = evaluate_localisation(run, cohort / "truth.nii.gz")
    brain = brain_mask(Grid(SHAPE, AFFINE))
    truth = np.zeros(SHAPE, bool)
    truth[CUBE] = True
    for fold in (0, 1):
        index = pd.read_csv(run / f"explanations/test_baseline_cube_group-all/fold-{fold}/run-0/"
                                  "index.tsv", sep="\t")
        patients = index[index.diagnosis == "AD"]
        mean = np.mean([nib.load(cohort / f"{p}_{s}.nii.gz").get_fdata()
                        for p, s in zip(patients.participant_id, patients.session_id)], axis=0)
        row = table[(table.method == "baseline:input") & (table.fold == fold)].iloc[0]
        assert row.n_sessions == len(patients)
        assert row.auc == pytest.approx(roc_auc_score(truth[brain], mean[brain]))
        assert row.mass_inside == pytest.approx(mean[brain & truth].sum() / mean[brain].sum())
        # a darker cube: the image itself points away from it
        assert row.auc < 0.5


@pytest.mark.slow
def test_session_table_scores_baselines_on_the_explained_sessions(explained_run):
    run, _ = explained_run
    table = evaluate_session_localisation(run, "truth_path", seed=1)
    methods = table.drop_duplicates(["method"]).method.tolist()
    assert methods == ["test_baseline_cube", *BASELINES]
    columns = ["fold", "participant_id", "session_id", "diagnosis", "truth_voxels"]
    probe = table[table.method == "test_baseline_cube"].sort_values(columns[:3])
    for method in BASELINES:
        rows = table[table.method == method].sort_values(columns[:3])
        assert rows[columns].values.tolist() == probe[columns].values.tolist()
        assert rows[rows.diagnosis == "CN"].auc.isna().all()  # nothing to point at
        assert rows[rows.diagnosis == "AD"].auc.notna().all()
    again = evaluate_session_localisation(run, "truth_path", seed=1)
    pd.testing.assert_frame_equal(table, again)
    other = evaluate_session_localisation(run, "truth_path", seed=2)
    random = table.method == "baseline:random"
    assert not np.allclose(table[random].auc.dropna(), other[random].auc.dropna())
    assert table[~random].equals(other[~random])


@pytest.mark.slow
def test_baselines_can_be_left_out_or_chosen_by_name(explained_run):
    run, cohort = explained_run
    without = evaluate_localisation(run, cohort / "truth.nii.gz", baselines=False)
    assert set(without.method) == {"test_baseline_cube"}
    chosen = evaluate_localisation(run, cohort / "truth.nii.gz",
                                   methods=["test_baseline_cube", "baseline:edge"])
    assert set(chosen.method) == {"test_baseline_cube", "baseline:edge"}
    only = evaluate_session_localisation(run, "truth_path", methods=["test_baseline_cube"])
    assert set(only.method) == {"test_baseline_cube"}


# --- the report ------------------------------------------------------------------------------

def test_explanations_are_compared_with_the_edge_filter_on_the_same_folds():
    table = pd.DataFrame({
        "key": ["a", "a", "b", "baseline:edge", "baseline:edge", "baseline:random"],
        "method": ["a", "a", "b", "baseline:edge", "baseline:edge", "baseline:random"],
        "fold": [0, 1, 1, 0, 1, 1], "run": [0] * 6,
        "auc": [0.9, 0.5, 0.55, 0.6, 0.5, 0.9]})
    compared = compare_with_baseline(table)
    assert compared.index.tolist() == ["a", "b"]
    # a: (0.9 + 0.5) / 2 against (0.6 + 0.5) / 2; b has fold 1 only, where the edge has 0.5
    np.testing.assert_allclose(compared.auc, [0.7, 0.55])
    np.testing.assert_allclose(compared.baseline, [0.55, 0.5])
    assert compared.pairs.tolist() == [2, 1] and compared.beats.all()
    worse = compare_with_baseline(table.assign(auc=[0.5, 0.5, 0.5, 0.6, 0.5, 0.9]))
    assert worse.beats.tolist() == [False, False]  # a tie does not beat
    assert compare_with_baseline(table[table.method != "baseline:edge"]) is None


def test_report_labels_the_baseline_rows_and_names_the_methods_an_edge_filter_matches(tmp_path):
    from voxplain.config import ReportConfig
    from voxplain.report.sections import ReportContext, localisation_section
    from voxplain.run import RunFolder

    (tmp_path / "evaluation").mkdir()
    pd.DataFrame({"method": ["grad_cam", "saliency", "baseline:edge", "baseline:random"],
                  "fold": [0] * 4, "auc": [0.81, 0.52, 0.64, 0.5],
                  "key": ["grad_cam", "saliency", "baseline:edge", "baseline:random"]}).to_csv(
        tmp_path / "evaluation" / "localisation.tsv", sep="\t", index=False)
    section = localisation_section(ReportContext(RunFolder(tmp_path), ReportConfig(run=tmp_path),
                                                 tmp_path / "report"))
    table, verdict = section.blocks
    assert "<th>row</th>" in table.content and table.content.count(">baseline<") == 2
    assert verdict.kind == "warning"
    assert verdict.content.startswith("Not better than an edge filter of the input "
                                      "(baseline:edge) in localisation AUC")
    assert verdict.content.endswith(": saliency (0.520, edge filter 0.640).")
