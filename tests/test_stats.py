"""Heatmap statistics of paper 2, 2.4, against scipy.stats and statsmodels and hand cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid
from voxplain.evaluate.stats import (
    bonferroni,
    brain_percentile,
    cluster_table,
    fdr_bh,
    normalise_map,
    one_sample_ttest,
    percentile_test,
    threshold_at_percentile,
    two_sample_ttest,
)

RNG = np.random.default_rng(0)
GROUP_A = RNG.normal(0.3, 1.0, (12, 5, 6, 4))
GROUP_B = RNG.normal(0.0, 2.0, (9, 5, 6, 4))
VOXELS = [(0, 0, 0), (2, 3, 1), (4, 5, 3), (1, 4, 2)]


def test_one_sample_t_test_matches_scipy_at_every_voxel():
    result = one_sample_ttest(GROUP_A, popmean=0.1)
    expected = stats.ttest_1samp(GROUP_A, 0.1, axis=0)
    np.testing.assert_allclose(result.t, expected.statistic, rtol=1e-10)
    np.testing.assert_allclose(result.p, expected.pvalue, rtol=1e-9)
    assert result.df == 11


@pytest.mark.parametrize("equal_var", [True, False])
def test_two_sample_t_test_matches_scipy_student_and_welch(equal_var):
    result = two_sample_ttest(GROUP_A, GROUP_B, equal_var=equal_var)
    for voxel in VOXELS:
        a = GROUP_A[(slice(None), *voxel)]
        b = GROUP_B[(slice(None), *voxel)]
        expected = stats.ttest_ind(a, b, equal_var=equal_var)
        assert result.t[voxel] == pytest.approx(expected.statistic, rel=1e-10)
        assert result.p[voxel] == pytest.approx(expected.pvalue, rel=1e-9)


def test_t_tests_stream_maps_one_at_a_time_with_the_same_result():
    as_array = two_sample_ttest(GROUP_A, GROUP_B)
    streamed = two_sample_ttest(iter(list(GROUP_A)), (m for m in GROUP_B))
    np.testing.assert_allclose(streamed.t, as_array.t, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy on constant data
def test_t_tests_leave_voxels_outside_the_brain_and_constant_voxels_untested():
    brain = np.zeros(GROUP_A.shape[1:], bool)
    brain[1:4, 1:5, 1:3] = True
    maps = GROUP_A.copy()
    maps[:, 2, 2, 2] = 0.0  # every map at the null mean: no variance, no difference, no test
    maps[:, 2, 3, 2] = 0.5  # no variance but a difference: T = inf, p = 0 as in scipy
    result = one_sample_ttest(maps, brain)
    assert np.isnan(result.t[~brain]).all()
    assert np.isnan(result.t[2, 2, 2]) and np.isnan(result.p[2, 2, 2])
    assert result.t[2, 3, 2] == stats.ttest_1samp(maps[:, 2, 3, 2], 0.0).statistic == np.inf
    assert result.p[2, 3, 2] == 0.0
    expected = stats.ttest_1samp(maps[:, 1, 3, 1], 0.0)
    assert result.t[1, 3, 1] == pytest.approx(expected.statistic, rel=1e-10)
    # Bonferroni counts the tested voxels only: brain minus the constant one
    assert np.isfinite(result.p).sum() == brain.sum() - 1
    corrected = bonferroni(result.p)
    assert corrected[1, 3, 1] == pytest.approx(min(1, result.p[1, 3, 1] * (brain.sum() - 1)))


def test_t_tests_reject_groups_of_one_map_and_mixed_grids():
    with pytest.raises(ValueError, match="at least 2 maps"):
        one_sample_ttest(GROUP_A[:1])
    with pytest.raises(ValueError, match="shape"):
        one_sample_ttest([GROUP_A[0], GROUP_A[1, :4]])


def test_bonferroni_and_benjamini_hochberg_match_statsmodels():
    p = RNG.uniform(size=500) ** 4
    np.testing.assert_allclose(bonferroni(p), multipletests(p, method="bonferroni")[1])
    np.testing.assert_allclose(fdr_bh(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)


def test_corrections_skip_nan_and_keep_the_map_shape():
    p = RNG.uniform(size=(4, 5)) ** 2
    p[0, :2] = np.nan
    finite = p[np.isfinite(p)]
    adjusted = fdr_bh(p)
    assert adjusted.shape == p.shape and np.isnan(adjusted[0, :2]).all()
    np.testing.assert_allclose(adjusted[np.isfinite(p)], multipletests(finite, method="fdr_bh")[1])


def test_percentile_test_is_student_t_test_with_group_mean_and_sd():
    a, b = [0.70, 0.75, 0.68, 0.80], [0.60, 0.66, 0.63]
    result = percentile_test(a, b)
    expected = stats.ttest_ind(a, b, equal_var=True)
    assert result["t"] == pytest.approx(expected.statistic)
    assert result["p"] == pytest.approx(expected.pvalue)
    assert result["mean_a"] == pytest.approx(0.7325)
    assert result["sd_b"] == pytest.approx(0.03)  # deviations -0.03, 0.03, 0: sqrt(0.0018/2)


def test_ninety_fifth_percentile_and_threshold_inside_the_brain():
    values = np.arange(200, dtype=np.float32).reshape(10, 20)
    brain = np.zeros_like(values, bool)
    brain[:5] = True  # values 0..99
    assert brain_percentile(values, brain) == pytest.approx(94.05)  # 0.95 * 99 = 94.05
    kept = threshold_at_percentile(values, brain)
    assert sorted(kept[kept > 0].tolist()) == [95, 96, 97, 98, 99]


def test_normalise_map_scales_the_brain_to_zero_one_and_zeroes_the_rest():
    values = np.array([[2.0, 4.0], [6.0, 100.0]])
    brain = np.array([[True, True], [True, False]])
    np.testing.assert_allclose(normalise_map(values, brain), [[0, 0.5], [1, 0]])
    assert not normalise_map(np.full((2, 2), 3.0)).any()


def _toy_atlas(shape, affine):
    labels = np.zeros(shape, np.int32)
    labels[:5] = 1
    labels[5:] = 2
    return Atlas(labels, {1: "Left_Thing", 2: "Right_Thing"}, Grid(shape, affine), "toy")


def test_cluster_table_sizes_peaks_in_mm_and_regions():
    shape = (10, 10, 10)
    affine = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    t = np.zeros(shape)
    t[1:3, 1:3, 1:3] = 3.0   # 8 voxels, in region 1
    t[2, 2, 1] = 5.0         # its peak
    t[7, 7, 7] = -4.0        # one negative voxel, region 2
    t[8, 8, 8] = -6.0        # touches (7,7,7) by a corner only
    table = cluster_table(t, t != 0, affine, _toy_atlas(shape, affine))
    assert table[["sign", "size"]].values.tolist() == [["+", 8], ["-", 1], ["-", 1]]
    first = table.iloc[0]
    assert first.peak_t == 5.0 and first.peak_voxel == "2,2,1"
    assert (first.x, first.y, first.z) == (-6.0, -16.0, 2.0)  # 2*2-10, 2*2-20, 2*1+0
    assert first.size_mm3 == pytest.approx(64.0) and first.region == "Left_Thing"
    assert table.iloc[1].peak_t == -6.0 and table.iloc[1].region == "Right_Thing"
    joined = cluster_table(t, t != 0, affine, connectivity=3)
    assert joined["size"].tolist() == [8, 2] and joined.iloc[1].peak_t == -6.0
    t[4:7, 1, 1] = 2.0  # 3 voxels straddling the regions: x = 4 in region 1, x = 5, 6 in 2
    straddling = cluster_table(t, t > 0, affine, _toy_atlas(shape, affine))
    assert straddling.regions.tolist()[:2] == ["Left_Thing (8)", "Right_Thing (2), Left_Thing (1)"]


def _write_explanations(run, grid, atlas, groups, sessions=("ses-M00",)):
    """Session maps under explanations/grad_cam: each group bright in its own region."""
    import pandas as pd

    from voxplain.io import save_nifti, write_tsv

    rng = np.random.default_rng(1)
    folder = run / "explanations" / "grad_cam" / "fold-0" / "run-0"
    rows, maps = [], {}
    for diagnosis, region in groups.items():
        for k, session in itertools.product(range(6), sessions):
            participant = f"sub-{diagnosis}{k}"
            values = rng.uniform(0, 0.3, grid.shape).astype(np.float32)
            inside = atlas.region_mask([region])
            values[inside] = 1.0 + rng.uniform(0, 0.05, inside.sum())
            save_nifti(folder / f"{participant}_{session}.nii.gz", values, grid.affine)
            rows.append({"participant_id": participant, "session_id": session,
                         "diagnosis": diagnosis, "path": f"{participant}_{session}.nii.gz"})
            maps.setdefault(diagnosis, []).append(values)
    write_tsv(folder / "index.tsv", pd.DataFrame(rows))
    return maps


def test_heatmap_statistics_of_a_run_folder_find_each_groups_region(tmp_path):
    import nibabel as nib
    import pandas as pd

    from voxplain.config import StatsConfig
    from voxplain.data.grid import downsample_affine, downsampled_shape, spm_grid
    from voxplain.data.template import brain_mask
    from voxplain.steps.stats import run_stats

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    atlas = Atlas.aal2(grid)
    maps = _write_explanations(tmp_path, grid, atlas,
                               {"AD": "Frontal_Sup_2_L", "CN": "Precentral_L"})
    summary = run_stats(StatsConfig(run=tmp_path, method="grad_cam"))
    assert summary.test.tolist() == ["one-sample_AD", "one-sample_CN", "two-sample_AD-CN",
                                     "permutation_one-sample_AD", "permutation_one-sample_CN",
                                     "permutation_two-sample_AD-CN"]
    out = tmp_path / "stats" / "grad_cam"
    clusters = pd.read_csv(out / "clusters.tsv", sep="\t")
    two = clusters[clusters.test == "two-sample_AD-CN"]
    assert two[two.sign == "+"].iloc[0].region == "Frontal_Sup_2_L"
    assert two[two.sign == "-"].iloc[0].region == "Precentral_L"
    image = nib.load(out / "two-sample_AD-CN_T.nii.gz")
    np.testing.assert_allclose(image.affine, grid.affine)
    # the T value at one voxel, recomputed by hand: min-max in the brain, own 95th percentile
    brain = brain_mask(grid)
    voxel = tuple(np.argwhere(atlas.region_mask(["Frontal_Sup_2_L"]) & brain)[0])

    def thresholded(values):
        inside = values[brain]
        scaled = (values - inside.min()) / (inside.max() - inside.min())
        return scaled[voxel] if scaled[voxel] >= np.percentile(scaled[brain], 95) else 0.0

    expected = stats.ttest_ind([thresholded(m) for m in maps["AD"]],
                               [thresholded(m) for m in maps["CN"]])
    assert image.get_fdata()[voxel] == pytest.approx(expected.statistic, rel=1e-5)
    test = pd.read_csv(out / "percentile_test.tsv", sep="\t").iloc[0]
    assert (test.group_a, test.n_a, test.n_b) == ("AD", 6, 6)


def test_heatmap_statistics_of_one_group_skip_the_group_comparison(tmp_path):
    from voxplain.config import StatsConfig
    from voxplain.data.grid import downsample_affine, downsampled_shape, spm_grid
    from voxplain.steps.stats import run_stats

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid), {"AD": "Frontal_Sup_2_L",
                                                           "CN": "Precentral_L"})
    summary = run_stats(StatsConfig(run=tmp_path, method="grad_cam", groups=["AD"],
                                    permutations=0))
    assert summary.test.tolist() == ["one-sample_AD"]
    assert not (tmp_path / "stats" / "grad_cam" / "percentile_test.tsv").exists()
    with pytest.raises(ValueError, match="no grad_cam session map of diagnosis"):
        run_stats(StatsConfig(run=tmp_path, method="grad_cam", groups=["MCI"]))
    with pytest.raises(ValueError, match="no session map of method 'mask'"):
        run_stats(StatsConfig(run=tmp_path, method="mask"))


def test_cli_stats_writes_t_maps_and_clusters(tmp_path):
    from typer.testing import CliRunner

    from voxplain.cli import app
    from voxplain.data.grid import downsample_affine, downsampled_shape, spm_grid

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid), {"AD": "Frontal_Sup_2_L",
                                                           "CN": "Precentral_L"})
    runner = CliRunner()
    result = runner.invoke(app, ["stats", "--run", str(tmp_path), "--method", "grad_cam",
                                 "--groups", "CN,AD", "--correction", "fdr"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = tmp_path / "stats" / "grad_cam"
    assert (out / "two-sample_CN-AD_p-fdr.nii.gz").is_file()
    assert (out / "clusters.tsv").is_file() and "two-sample_CN-AD" in result.output
    missing = runner.invoke(app, ["stats", "--run", str(tmp_path), "--method", "saliency"])
    assert missing.exit_code == 2 and "methods with session maps: grad_cam" in missing.output


def test_cluster_table_works_on_2d_maps_without_an_atlas():
    t = np.zeros((8, 8))
    t[1:3, 1:4] = 2.5
    t[2, 3] = 4.0
    table = cluster_table(t, t > 0, np.eye(4))
    assert table[["sign", "size", "peak_t", "peak_voxel"]].values.tolist() == [
        ["+", 6, 4.0, "2,3"]]
    assert (table.x[0], table.y[0], table.region[0]) == (2.0, 3.0, "")


def test_heatmap_statistics_take_one_map_per_subject_unless_asked_per_session(tmp_path):
    import pandas as pd

    from voxplain.config import StatsConfig
    from voxplain.data.grid import downsample_affine, downsampled_shape, spm_grid
    from voxplain.steps.stats import run_stats

    grid = Grid(downsampled_shape(spm_grid().shape, 8), downsample_affine(spm_grid().affine, 8))
    _write_explanations(tmp_path, grid, Atlas.aal2(grid), {"AD": "Frontal_Sup_2_L"},
                        sessions=("ses-M00", "ses-M12"))
    run_stats(StatsConfig(run=tmp_path, method="grad_cam"))
    per_subject = pd.read_csv(tmp_path / "stats/grad_cam/percentiles.tsv", sep="\t")
    assert len(per_subject) == 6 and (per_subject.sessions == 2).all()
    run_stats(StatsConfig(run=tmp_path, method="grad_cam", unit="session"))
    per_session = pd.read_csv(tmp_path / "stats/grad_cam/percentiles.tsv", sep="\t")
    assert len(per_session) == 12 and set(per_session.session_id) == {"ses-M00", "ses-M12"}
