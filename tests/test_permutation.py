"""Permutation inference of the heatmap statistics against brute-force permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from voxplain.evaluate.permutation import covariate_design, permutation_test

RNG = np.random.default_rng(3)
MASK = np.zeros((3, 3, 2), bool)
MASK[1, :, 0] = MASK[1, :2, 1] = True  # 5 voxels
MAPS = RNG.normal(size=(8, 5))
MAPS[:4, 0] += 3.0  # an effect of group a at one voxel
GROUP_A = np.array([1, 1, 1, 1, 0, 0, 0, 0], float)


def _max_t_p(observed: np.ndarray, null_max: np.ndarray) -> np.ndarray:
    """Max-T FWE p: the share of the null distribution of max |T| reaching each |T|."""
    return (null_max[:, None] >= np.abs(observed)[None, :] - 1e-12).mean(axis=0)


def test_two_sample_max_t_p_values_match_every_relabelling_of_the_groups():
    labellings = [np.isin(np.arange(8), chosen) for chosen in itertools.combinations(range(8), 4)]
    null_max = np.array([np.abs(stats.ttest_ind(MAPS[a], MAPS[~a]).statistic).max()
                         for a in labellings])  # all 70 relabellings, the observed one among them
    observed = stats.ttest_ind(MAPS[:4], MAPS[4:]).statistic
    result = permutation_test(MAPS, GROUP_A, MASK, n_permutations=4000, seed=0)
    np.testing.assert_allclose(result.t, observed, rtol=1e-10)
    exact = _max_t_p(observed, null_max)
    # Monte Carlo error of 4000 draws: sd <= sqrt(0.25 / 4000) = 0.008; 4 sd
    np.testing.assert_allclose(result.p("max-T"), exact, atol=0.032)
    assert exact[0] == exact.min() < 0.1  # 4 of 70: the smallest p is 2 / 70 here


def test_one_sample_max_t_p_values_match_every_sign_flip():
    flips = np.array(list(itertools.product([1, -1], repeat=8)))  # all 256
    null_max = np.array([np.abs(stats.ttest_1samp(MAPS * s[:, None], 0).statistic).max()
                         for s in flips])
    observed = stats.ttest_1samp(MAPS, 0).statistic
    result = permutation_test(MAPS, np.ones(8), MASK, n_permutations=4000, seed=1)
    np.testing.assert_allclose(result.t, observed, rtol=1e-10)
    np.testing.assert_allclose(result.p("max-T"), _max_t_p(observed, null_max), atol=0.032)


def test_a_group_effect_explained_by_a_covariate_is_no_longer_significant():
    rng = np.random.default_rng(7)
    age = np.r_[rng.normal(80, 3, 10), rng.normal(65, 3, 10)]  # group a older
    maps = 0.2 * (age[:, None] - 72) + rng.normal(0, 0.5, (20, 5))  # maps follow age only
    group = np.r_[np.ones(10), np.zeros(10)]
    plain = permutation_test(maps, group, MASK, n_permutations=500, seed=0)
    adjusted = permutation_test(maps, group, MASK, covariates=age[:, None],
                                n_permutations=500, seed=0)
    assert (plain.p("max-T") < 0.01).all()
    assert (adjusted.p("max-T") > 0.05).all()
    # the adjusted T is the group coefficient's t of the full linear model
    design = np.c_[group, age, np.ones(20)]
    beta, residual, *_ = np.linalg.lstsq(design, maps, rcond=None)
    sigma2 = residual / (20 - 3)
    se = np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0])
    np.testing.assert_allclose(adjusted.t, beta[0] / se, rtol=1e-8)


def test_tfce_and_cluster_p_values_are_seeded_and_shaped_like_the_mask_voxels():
    def run(seed):
        return permutation_test(MAPS, GROUP_A, MASK, n_permutations=30, tfce=True,
                                cluster_threshold=0.05, seed=seed)

    first, again = run(4), run(4)
    assert list(first.logp) == ["max-T", "TFCE", "cluster-size", "cluster-mass"]
    for inference, logp in first.logp.items():
        assert logp.shape == (5,)
        np.testing.assert_array_equal(logp, again.logp[inference])
        assert ((logp >= 0) & (logp <= np.log10(31) + 1e-12)).all()  # p in [1/31, 1]


def test_constant_voxels_are_not_tested_and_too_small_designs_are_refused():
    maps = MAPS.copy()
    maps[:, 3] = 0.0  # zero in every map, as after thresholding
    result = permutation_test(maps, GROUP_A, MASK, n_permutations=20, seed=0)
    assert np.isnan(result.t[3]) and np.isnan(result.logp["max-T"][3])
    assert np.isfinite(result.t[[0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match="no degree of freedom"):
        permutation_test(MAPS[2:5], GROUP_A[2:5], MASK, covariates=RNG.normal(size=(3, 1)))
    with pytest.raises(ValueError, match="5 voxels of the mask"):
        permutation_test(MAPS[:, :4], GROUP_A, MASK)


def test_covariate_design_keeps_numbers_and_dummy_codes_text():
    table = pd.DataFrame({"age": [70.0, 75.0, 80.0], "sex": ["F", "M", "M"],
                          "site": ["b", "a", "c"]})
    design, names = covariate_design(table, ["age", "sex", "site"])
    assert names == ["age", "sex[M]", "site[b]", "site[c]"]
    np.testing.assert_array_equal(design, [[70, 0, 1, 0], [75, 1, 0, 0], [80, 1, 0, 1]])
    with pytest.raises(ValueError, match="not columns of the cohort"):
        covariate_design(table, ["education"])


def test_heatmap_statistics_write_permutation_maps_and_summary_rows(tmp_path):
    import nibabel as nib

    from test_stats import _write_explanations
    from voxplain.config import StatsConfig
    from voxplain.data.atlas import Atlas
    from voxplain.data.grid import Grid, downsample_affine, downsampled_shape, spm_grid
    from voxplain.io import write_tsv
    from voxplain.steps.stats import run_stats

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid),
                        {"AD": "Frontal_Sup_2_L", "CN": "Precentral_L"},
                        sessions=("ses-M00", "ses-M12"))
    subjects = [f"sub-{d}{k}" for d in ("AD", "CN") for k in range(6)]
    write_tsv(tmp_path / "cohort.tsv", pd.DataFrame(
        [{"participant_id": s, "session_id": ses, "diagnosis": s[4:6],
          "age": 70 + i + (ses == "ses-M12"), "sex": "FM"[i % 2]}
         for i, s in enumerate(subjects) for ses in ("ses-M00", "ses-M12")]))
    summary = run_stats(StatsConfig(run=tmp_path, method="grad_cam", permutations=20,
                                    covariates=["age", "sex"], tfce=True, cluster_threshold=0.01,
                                    paired_sessions=["ses-M00", "ses-M12"]))
    out = tmp_path / "stats" / "grad_cam"
    permutation = summary[summary.test.str.startswith("permutation_")]
    assert sorted(set(permutation.test)) == [
        "permutation_one-sample_AD", "permutation_one-sample_CN",
        "permutation_paired_AD_ses-M12-ses-M00", "permutation_paired_CN_ses-M12-ses-M00",
        "permutation_two-sample_AD-CN"]
    two = permutation[permutation.test == "permutation_two-sample_AD-CN"]
    assert two.correction.tolist() == ["permutation max-T", "permutation TFCE",
                                       "permutation cluster-size", "permutation cluster-mass"]
    assert (two.permutations == 20).all() and (two.covariates == "age,sex").all()
    assert (two.min_p >= 1 / 21 - 1e-12).all()
    for tag in ("T", "logp-maxt", "logp-tfce", "logp-cluster-size", "logp-cluster-mass"):
        image = nib.load(out / f"permutation_two-sample_AD-CN_{tag}.nii.gz")
        assert image.shape == grid.shape
        np.testing.assert_allclose(image.affine, grid.affine)
    # each group bright in its own region: the two-sample T agrees with the parametric T where
    # both test (no covariate changes the sign of a difference this large)
    parametric = nib.load(out / "two-sample_AD-CN_T.nii.gz").get_fdata()
    permuted = nib.load(out / "permutation_two-sample_AD-CN_T.nii.gz").get_fdata()
    both = np.isfinite(parametric) & np.isfinite(permuted) & (np.abs(parametric) > 5)
    assert both.any() and (np.sign(parametric[both]) == np.sign(permuted[both])).all()
    per_session = run_stats(StatsConfig(run=tmp_path, method="grad_cam", permutations=20,
                                        unit="session"))
    assert not per_session.test.str.startswith("permutation_").any()  # not exchangeable
    assert not list(out.glob("permutation_*"))  # nor left from the run before
    with pytest.raises(ValueError, match="one map per subject"):
        run_stats(StatsConfig(run=tmp_path, method="grad_cam", permutations=20, unit="session",
                              paired_sessions=["ses-M00", "ses-M12"]))
    with pytest.raises(ValueError, match="not columns of"):
        run_stats(StatsConfig(run=tmp_path, method="grad_cam", permutations=20,
                              covariates=["education"]))



def test_report_shows_permutation_rows_and_one_figure_of_significant_voxels_per_test(tmp_path):
    from test_stats import _write_explanations
    from voxplain.config import ReportConfig, StatsConfig
    from voxplain.data.atlas import Atlas
    from voxplain.data.grid import Grid, downsample_affine, downsampled_shape, spm_grid
    from voxplain.report.sections import ReportContext, statistics_section
    from voxplain.run import RunFolder
    from voxplain.steps.stats import run_stats

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid),
                        {"AD": "Frontal_Sup_2_L", "CN": "Precentral_L"})
    run_stats(StatsConfig(run=tmp_path, method="grad_cam", permutations=30))
    figures = tmp_path / "figures"
    section = statistics_section(ReportContext(RunFolder(tmp_path), ReportConfig(run=tmp_path),
                                               figures))
    drawn = sorted(p.name for p in figures.glob("*.png"))
    assert "stats_grad_cam_permutation_two-sample_AD-CN_ortho.png" in drawn
    assert "stats_grad_cam_two-sample_AD-CN_T_ortho.png" in drawn  # the parametric T as before
    assert not any("permutation_two-sample_AD-CN_T" in name for name in drawn)
    tables = " ".join(b.content for b in section.blocks if b.kind == "table")
    assert "permutation max-T" in tables and "bonferroni" in tables


def test_cli_stats_takes_permutations_covariates_tfce_and_a_cluster_threshold(tmp_path):
    from typer.testing import CliRunner

    from test_stats import _write_explanations
    from voxplain.cli import app
    from voxplain.data.atlas import Atlas
    from voxplain.data.grid import Grid, downsample_affine, downsampled_shape, spm_grid
    from voxplain.io import write_tsv

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid), {"AD": "Frontal_Sup_2_L",
                                                           "CN": "Precentral_L"})
    write_tsv(tmp_path / "cohort.tsv", pd.DataFrame(
        [{"participant_id": f"sub-{d}{k}", "session_id": "ses-M00", "diagnosis": d,
          "age": 60 + 3 * k, "sex": "FM"[k % 2]} for d in ("AD", "CN") for k in range(6)]))
    result = CliRunner().invoke(app, [
        "stats", "--run", str(tmp_path), "--method", "grad_cam", "--permutations", "15",
        "--covariates", "age,sex", "--tfce", "--cluster-threshold", "0.01", "--seed", "2"],
        env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = tmp_path / "stats" / "grad_cam"
    assert (out / "permutation_two-sample_AD-CN_logp-tfce.nii.gz").is_file()
    assert (out / "permutation_one-sample_CN_logp-cluster-mass.nii.gz").is_file()
    assert "permutation TFCE" in result.output
    summary = pd.read_csv(out / "summary.tsv", sep="\t")
    assert set(summary.covariates.dropna()) == {"age,sex"}
