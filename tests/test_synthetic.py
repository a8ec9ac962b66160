"""The synthetic AD/CN grey-matter cohort: the ground truth that explanations are measured on."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from voxplain.config import AtrophyCohortConfig
from voxplain.data.atlas import Atlas
from voxplain.data.grid import SPM_AFFINE, Grid, downsample_affine, spm_grid
from voxplain.data.synthetic import (
    cohort_grid,
    cohort_template,
    deform,
    generate_atrophy_cohort,
    isotropic_mni_grid,
    smooth_displacement,
)
from voxplain.data.template import brain_mask, gm_template
from voxplain.io import read_tsv

QC_THRESHOLD = 0.95  # paper 1, section 2.3.1: GM maps with a maximum below this are rejected


def load(path) -> np.ndarray:
    return nib.load(path).get_fdata(dtype=np.float32)


def small_config(out, **changes) -> AtrophyCohortConfig:
    settings = dict(out=out, subjects=12, sessions=3, downsample=4, qc_failures=2, seed=0)
    return AtrophyCohortConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 subjects x 3 sessions + 2 quality-check failures on the 31x37x31 grid (6 mm)."""
    config = small_config(tmp_path_factory.mktemp("cohort"))
    tsv = generate_atrophy_cohort(config)
    return config, tsv, read_tsv(tsv)


@pytest.fixture(scope="module")
def regular(cohort):
    """The regular sessions (not the quality-check failures) with their images loaded."""
    config, tsv, table = cohort
    qc_failures = json.loads((config.out / "generator.json").read_text())["qc_failures"]
    table = table[~table.participant_id.isin(qc_failures)].copy()
    table["image"] = [load(tsv.parent / path) for path in table.path]
    table["atrophy"] = [load(config.out / "atrophy" / os.path.basename(path))
                        for path in table.path]
    return table


def hippocampus(grid: Grid) -> np.ndarray:
    return Atlas.aal2(grid).region_mask(["Hippocampus_L", "Hippocampus_R"])


def grid_of(path) -> Grid:
    image = nib.load(path)
    return Grid(image.shape, image.affine)


def test_cohort_tsv_has_the_clinica_columns_and_relative_paths(cohort):
    config, tsv, table = cohort
    assert list(table.columns) == ["participant_id", "session_id", "diagnosis", "path",
                                   "atrophy_path", "age", "sex", "severity"]
    assert len(table) == 12 * 3 + 2
    assert table.participant_id.iloc[0] == "sub-001" and table.participant_id.iloc[-1] == "sub-014"
    assert sorted(table.session_id.unique()) == ["ses-M00", "ses-M12", "ses-M24"]
    baseline = table[table.session_id == "ses-M00"].iloc[:12]
    assert (baseline.diagnosis == "CN").sum() == 6 and (baseline.diagnosis == "AD").sum() == 6
    assert set(table.sex) <= {"F", "M"} and table.age.between(60, 93).all()
    for path in (*table.path, *table.atrophy_path):
        assert not os.path.isabs(path) and (tsv.parent / path).is_file()


def test_images_carry_the_downsampled_spm_affine(cohort):
    config, tsv, table = cohort
    image = nib.load(tsv.parent / table.path.iloc[0])
    assert image.shape == (31, 37, 31)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, downsample_affine(SPM_AFFINE, 4))
    # a coarse voxel sits at the centre of the 4x4x4 block of SPM voxels it averages
    coarse = np.array([5, 7, 3])
    block = np.stack(np.meshgrid(*[np.arange(4 * c, 4 * c + 4) for c in coarse])).reshape(3, -1)
    fine_centres = SPM_AFFINE[:3, :3] @ block + SPM_AFFINE[:3, 3:]
    np.testing.assert_allclose(image.affine[:3, :3] @ coarse + image.affine[:3, 3],
                               fine_centres.mean(axis=1))


def test_downsampled_template_averages_the_spm_block_of_each_coarse_voxel():
    config = small_config("unused", downsample=4)
    template = cohort_template(config, cohort_grid(config))
    block = gm_template(spm_grid())[60:64, 72:76, 36:40]
    assert 0.2 < template[15, 18, 9] < 0.8  # a cortical voxel, where interpolation would differ
    assert template[15, 18, 9] == pytest.approx(block.mean(), abs=1e-6)


@pytest.mark.parametrize("deformation_mm, max_spread", [(0.0, 1.05), (2.0, None)])
def test_deformation_is_the_only_source_of_anatomical_change(tmp_path, deformation_mm,
                                                              max_spread):
    """Without deformation a subject is the template times a smooth field (+-2 %) and a scale."""
    config = small_config(tmp_path, subjects=4, sessions=1, qc_failures=0, noise=0.0,
                          deformation_mm=deformation_mm)
    table = read_tsv(generate_atrophy_cohort(config))
    template = cohort_template(config, cohort_grid(config))
    for path in table[table.diagnosis == "CN"].path:
        image = load(tmp_path / path)
        unclipped = (template > 0.3) & (image < 0.999)
        ratio = image[unclipped] / template[unclipped]
        spread = ratio.max() / ratio.min()
        if max_spread is None:
            assert spread > 1.5
        else:
            assert spread < max_spread


def test_sessions_of_a_cn_subject_differ_by_independent_voxel_noise(regular, cohort):
    config, _, _ = cohort
    cn = regular[regular.diagnosis == "CN"]
    first_subject = cn[cn.participant_id == cn.participant_id.iloc[0]]
    first, second = first_subject.image.iloc[0], first_subject.image.iloc[1]
    unclipped = (first > 0.2) & (first < 0.8) & (second > 0.2) & (second < 0.8)
    difference = (second - first)[unclipped]
    assert difference.std() == pytest.approx(np.sqrt(2) * config.noise, rel=0.1)
    assert abs(difference.mean()) < 0.005


def test_generator_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    paths = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        config = small_config(tmp_path / name, subjects=4, sessions=1, qc_failures=0, seed=seed,
                              downsample=5)
        paths[name] = generate_atrophy_cohort(config).parent / "images" / "sub-002_ses-M00.nii.gz"
    assert load(paths["a"]).tobytes() == load(paths["b"]).tobytes()
    assert not np.array_equal(load(paths["a"]), load(paths["c"]))


def test_a_subject_does_not_depend_on_the_order_of_generation(tmp_path):
    config = small_config(tmp_path, subjects=4, sessions=2, qc_failures=0, downsample=5)
    generate_atrophy_cohort(config)
    first = tmp_path / "images" / "sub-003_ses-M12.nii.gz"
    expected = load(first)
    first.unlink()
    generate_atrophy_cohort(config)  # regenerates this session alone, after all the others
    assert load(first).tobytes() == expected.tobytes()


def test_cn_sessions_have_a_zero_atrophy_map(regular):
    cn = regular[regular.diagnosis == "CN"]
    assert all(not atrophy.any() for atrophy in cn.atrophy)
    assert (cn.severity == 0).all()


def test_ad_atrophy_maps_peak_at_the_session_severity(regular):
    ad = regular[regular.diagnosis == "AD"]
    for atrophy, severity in zip(ad.atrophy, ad.severity):
        assert 0.3 <= severity < 1
        assert 0.8 * severity < atrophy.max() <= severity + 1e-6


def test_ad_lose_grey_matter_in_the_hippocampus_and_not_far_from_it(regular, cohort):
    config, _, _ = cohort
    grid = grid_of(config.out / "ground_truth.nii.gz")
    far = (load(config.out / "ground_truth.nii.gz") == 0) & brain_mask(grid)
    baseline = regular[regular.session_id == "ses-M00"]
    inside = {dx: np.mean([image[hippocampus(grid)].mean()
                           for image in baseline[baseline.diagnosis == dx].image])
              for dx in ("CN", "AD")}
    outside = {dx: np.mean([image[far].mean()
                            for image in baseline[baseline.diagnosis == dx].image])
               for dx in ("CN", "AD")}
    assert inside["CN"] - inside["AD"] > 0.15  # severity 0.3-0.6 at the atrophy peak
    assert abs(outside["CN"] - outside["AD"]) < 0.02


def test_images_are_identical_wherever_neither_cohort_has_atrophy(tmp_path):
    """Anatomy and noise do not depend on the regions: moving the atrophy moves nothing else."""
    outs = {}
    for regions in (["Hippocampus_L"], ["Precuneus_L"]):
        config = small_config(tmp_path / regions[0], subjects=4, sessions=1, qc_failures=0,
                              regions=regions, downsample=5)
        outs[regions[0]] = generate_atrophy_cohort(config).parent
    table = read_tsv(outs["Hippocampus_L"] / "cohort.tsv")
    for path in table[table.diagnosis == "AD"].path:
        name = os.path.basename(path)
        healthy = ((load(outs["Hippocampus_L"] / "atrophy" / name) == 0)
                   & (load(outs["Precuneus_L"] / "atrophy" / name) == 0))
        first, second = (load(out / path) for out in outs.values())
        assert healthy.mean() > 0.5
        np.testing.assert_array_equal(first[healthy], second[healthy])
        assert not np.array_equal(first, second)


def test_atrophy_progresses_across_sessions(regular, cohort):
    config, _, _ = cohort
    grid = grid_of(config.out / "ground_truth.nii.gz")
    for _, subject in regular[regular.diagnosis == "AD"].groupby("participant_id"):
        subject = subject.sort_values("session_id")
        assert np.all(np.diff(subject.severity) == pytest.approx(config.progression))
        assert np.all(np.diff([atrophy.sum() for atrophy in subject.atrophy]) > 0)
        hippocampal_gm = [image[hippocampus(grid)].mean() for image in subject.image]
        assert hippocampal_gm[-1] < hippocampal_gm[0]


def test_ground_truth_lies_in_the_unit_interval_and_peaks_in_the_chosen_regions(cohort):
    config, _, _ = cohort
    truth = load(config.out / "ground_truth.nii.gz")
    regions = Atlas.aal2(grid_of(config.out / "ground_truth.nii.gz")).region_mask(config.regions)
    assert truth.min() >= 0 and truth.max() == pytest.approx(1.0)
    assert regions.ravel()[truth.argmax()]
    assert truth[regions].mean() > 10 * truth[~regions].mean()


def test_choosing_other_regions_moves_the_ground_truth_there(tmp_path):
    config = small_config(tmp_path, subjects=4, sessions=1, qc_failures=0,
                          regions=["Precuneus_L"], downsample=5)
    truth = load(generate_atrophy_cohort(config).parent / "ground_truth.nii.gz")
    grid = grid_of(tmp_path / "ground_truth.nii.gz")
    atlas = Atlas.aal2(grid)
    assert atlas.region_mask(["Precuneus_L"]).ravel()[truth.argmax()]
    assert truth[hippocampus(grid)].mean() < 0.05
    voxels = np.indices(grid.shape).reshape(3, -1)
    centre_of_mass = grid.affine[:3, :3] @ (voxels @ truth.ravel()) / truth.sum()
    centre_of_mass += grid.affine[:3, 3]
    precuneus_voxels = np.argwhere(atlas.region_mask(["Precuneus_L"])).mean(axis=0)
    precuneus = grid.affine[:3, :3] @ precuneus_voxels + grid.affine[:3, 3]
    assert np.linalg.norm(centre_of_mass - precuneus) < 5.0


def test_unknown_region_is_refused_with_close_matches_before_writing(tmp_path):
    config = small_config(tmp_path / "out", regions=["Hipocampus_L"])
    with pytest.raises(ValueError, match="'Hipocampus_L'; did you mean Hippocampus_L"):
        generate_atrophy_cohort(config)
    assert not (tmp_path / "out").exists()


def test_only_the_quality_check_failures_have_a_maximum_below_095(cohort, regular):
    config, tsv, table = cohort
    qc_failures = json.loads((config.out / "generator.json").read_text())["qc_failures"]
    assert qc_failures == ["sub-013", "sub-014"]
    failing = table[table.participant_id.isin(qc_failures)]
    assert list(failing.session_id) == ["ses-M00", "ses-M00"]
    assert all(load(tsv.parent / path).max() < QC_THRESHOLD for path in failing.path)
    assert all(image.max() >= QC_THRESHOLD for image in regular.image)
    assert all(image.min() >= 0 and image.max() <= 1 for image in regular.image)


def test_regular_images_pass_the_quality_check_even_without_noise(tmp_path):
    config = small_config(tmp_path, subjects=6, sessions=1, qc_failures=0, noise=0.0,
                          severity=(0.9, 0.9), downsample=5)
    table = read_tsv(generate_atrophy_cohort(config))
    assert all(load(tmp_path / path).max() >= QC_THRESHOLD for path in table.path)


def test_generating_twice_rewrites_nothing(tmp_path):
    config = small_config(tmp_path, subjects=4, sessions=2, qc_failures=1, downsample=5)
    generate_atrophy_cohort(config)
    files = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    before = {path: path.stat().st_mtime_ns for path in files}
    calls = []
    generate_atrophy_cohort(config, progress=lambda done, total: calls.append((done, total)))
    assert {path: path.stat().st_mtime_ns for path in files} == before
    assert calls == [(done, 9) for done in range(1, 10)]
    assert len(files) == 2 * 9 + 3  # images, atrophy maps, ground truth, TSV, JSON


def test_a_folder_generated_with_other_settings_is_refused(tmp_path):
    generate_atrophy_cohort(small_config(tmp_path, subjects=4, sessions=1, downsample=5))
    with pytest.raises(ValueError, match=r"other settings \(noise: 0.03 -> 0.1\)"):
        generate_atrophy_cohort(small_config(tmp_path, subjects=4, sessions=1, downsample=5,
                                             noise=0.1))


def test_a_folder_generated_before_a_setting_existed_is_taken_at_its_default(tmp_path):
    config = small_config(tmp_path, subjects=4, sessions=1, downsample=5)
    generate_atrophy_cohort(config)
    record = json.loads((tmp_path / "generator.json").read_text())
    del record["config"]["heterogeneity"]  # as written before the setting existed
    (tmp_path / "generator.json").write_text(json.dumps(record))
    generate_atrophy_cohort(config)  # the same cohort: accepted
    with pytest.raises(ValueError, match=r"other settings \(heterogeneity: 0.0 -> 0.5\)"):
        generate_atrophy_cohort(small_config(tmp_path, subjects=4, sessions=1, downsample=5,
                                             heterogeneity=0.5))


def test_heterogeneous_patients_weigh_the_regions_differently_and_keep_it_across_sessions(
        tmp_path):
    regions = ["Hippocampus_L", "Precuneus_R"]  # far apart: each region's share is readable
    config = small_config(tmp_path, subjects=8, sessions=2, qc_failures=0, downsample=5,
                          regions=regions, heterogeneity=0.8)
    table = read_tsv(generate_atrophy_cohort(config))
    grid = grid_of(tmp_path / "ground_truth.nii.gz")
    atlas = Atlas.aal2(grid)
    homogeneous = small_config(tmp_path / "h0", subjects=8, sessions=2, qc_failures=0,
                               downsample=5, regions=regions)
    generate_atrophy_cohort(homogeneous)
    np.testing.assert_allclose(load(tmp_path / "ground_truth.nii.gz"),
                               load(tmp_path / "h0" / "ground_truth.nii.gz"), atol=1e-6)
    ratios = {}
    for row in table[table.diagnosis == "AD"].itertuples():
        name = os.path.basename(row.path)
        shares = []
        for folder in (tmp_path, tmp_path / "h0"):
            atrophy = load(folder / "atrophy" / name)
            shares.append(atrophy[atlas.region_mask([regions[0]])].sum()
                          / atrophy[atlas.region_mask([regions[1]])].sum())
        # share of the two regions relative to the homogeneous patient (same anatomy and warp):
        # the ratio of the subject's two weights, in [1 - h, 1 / (1 - h)]
        ratios[row.participant_id, row.session_id] = shares[0] / shares[1]
    by_subject = {}
    for (participant, _), ratio in ratios.items():
        by_subject.setdefault(participant, []).append(ratio)
    for values in by_subject.values():
        assert values[0] == pytest.approx(values[1], rel=1e-3)  # one pattern per patient
        assert 0.2 - 1e-3 <= values[0] <= 5 + 1e-3
    spread = [values[0] for values in by_subject.values()]
    assert max(spread) / min(spread) > 1.5  # patients differ


def test_generator_json_records_config_regions_and_grid(cohort):
    config, _, _ = cohort
    record = json.loads((config.out / "generator.json").read_text())
    assert record["config"] == json.loads(config.model_dump_json())
    assert record["regions"] == config.regions
    assert record["grid"]["shape"] == [31, 37, 31]
    assert record["grid"]["voxel_size"] == [6.0, 6.0, 6.0]


def test_severity_outside_the_unit_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="severity must be a range"):
        generate_atrophy_cohort(small_config(tmp_path, severity=(0.5, 1.2)))


def test_voxel_size_gives_an_isotropic_grid_over_the_spm_field_of_view(tmp_path):
    np.testing.assert_allclose(isotropic_mni_grid(1.5).affine, spm_grid().affine)
    assert isotropic_mni_grid(1.5).shape == (121, 145, 121)
    config = small_config(tmp_path, subjects=4, sessions=1, qc_failures=0, voxel_size=8.0)
    grid = cohort_grid(config)
    assert grid.voxel_size == (8.0, 8.0, 8.0) and grid.affine[0, 0] < 0  # MNI x flips like SPM
    table = read_tsv(generate_atrophy_cohort(config))
    image = nib.load(tmp_path / table.path.iloc[0])
    assert image.shape == grid.shape
    np.testing.assert_allclose(image.affine, grid.affine)


def test_displacement_field_peaks_at_the_deformation_amplitude():
    grid = cohort_grid(small_config("unused", downsample=5))
    displacement = smooth_displacement(np.random.default_rng(0), grid, amplitude_mm=2.0)
    assert displacement.shape == (3, *grid.shape)
    peaks_mm = np.abs(displacement).reshape(3, -1).max(axis=1) * np.array(grid.voxel_size)
    np.testing.assert_allclose(peaks_mm, 2.0, rtol=1e-5)


def test_a_zero_displacement_leaves_the_volume_unchanged():
    volume = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(deform(volume, np.zeros((3, 6, 7, 5), np.float32)), volume)


def test_a_one_voxel_displacement_shifts_the_volume():
    volume = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    displacement = np.zeros((3, 6, 7, 5), np.float32)
    displacement[0] = 1.0
    np.testing.assert_allclose(deform(volume, displacement)[:-1], volume[1:])


def test_gm_template_is_a_probability_map_cached_per_grid():
    grid = cohort_grid(small_config("unused", downsample=5))
    template = gm_template(grid)
    assert template.dtype == np.float32 and template.shape == grid.shape
    assert template.min() >= 0 and 0.9 < template.max() <= 1
    assert gm_template(Grid(grid.shape, grid.affine.copy())) is template


def test_brain_mask_fills_the_white_matter_enclosed_by_grey_matter():
    grid = spm_grid()
    mask, template = brain_mask(grid), gm_template(grid)
    white_matter = np.round(np.linalg.inv(grid.affine) @ [-28, -20, 30, 1]).astype(int)[:3]
    assert template[tuple(white_matter)] < 0.1 and mask[tuple(white_matter)]
    assert np.all(mask[template > 0.1])
    assert 1.0e6 < mask.sum() * np.prod(grid.voxel_size) < 2.0e6  # brain volume, mm^3



def test_ageing_lowers_grey_matter_by_the_stated_rate_in_the_regions_and_half_elsewhere(
        tmp_path):
    """With noise 0, an aged image divided by the same subject without ageing is
    ``1 - a (t - 60) / 10 (1 + A) / 2``: ``1 - loss`` where the warped pattern A is 1, ``1 -
    loss / 2`` far from the regions, never outside that range; CN and AD alike; the atrophy
    maps (the ground truth) do not change."""
    rate = 0.05
    outs = {}
    for ageing in (0.0, rate):
        config = small_config(tmp_path / f"ageing-{ageing}", subjects=4, sessions=1,
                              qc_failures=0, downsample=5, noise=0.0, ageing=ageing)
        outs[ageing] = generate_atrophy_cohort(config).parent
    table = read_tsv(outs[rate] / "cohort.tsv")
    assert set(table.diagnosis) == {"AD", "CN"}
    for row in table.itertuples():
        young, aged = (load(outs[a] / row.path) for a in (0.0, rate))
        loss = rate * (row.age - 60) / 10
        tissue = (young > 0.05) & (young < 0.9)  # away from the clipping at 0 and 1
        ratio = aged[tissue] / young[tissue]
        assert ratio.min() >= 1 - loss - 1e-5 and ratio.max() <= 1 - loss / 2 + 1e-5
        assert ratio.min() == pytest.approx(1 - loss, abs=0.05 * loss)  # warped A peaks < 1
        assert np.median(ratio) == pytest.approx(1 - loss / 2, abs=0.05 * loss)
        name = os.path.basename(row.path)
        np.testing.assert_array_equal(load(outs[rate] / "atrophy" / name),
                                      load(outs[0.0] / "atrophy" / name))


# Acquisition sites: subjects spread over sites, each site with its own gain, blur and bias field.

def site_config(out, **changes) -> AtrophyCohortConfig:
    settings = dict(subjects=8, sessions=1, qc_failures=1, voxel_size=8.0)
    return small_config(out, **{**settings, **changes})


def bias_field(coefficients, order, shape) -> np.ndarray:
    """exp of the polynomial of the coordinates scaled to [-1, 1] per axis, terms ordered by
    the x degree, then y, then z (TorchIO's order), written out independently of TorchIO."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    terms = [x ** i * y ** j * z ** k for i in range(order + 1) for j in range(order + 1 - i)
             for k in range(order + 1 - i - j)]
    assert len(terms) == len(coefficients)
    return np.exp(sum(c * term for c, term in zip(coefficients, terms)))


def test_one_site_without_site_effects_is_the_cohort_generated_before_sites_existed(tmp_path):
    default = small_config(tmp_path / "default", subjects=8, sessions=1, qc_failures=1,
                           voxel_size=8.0)
    assert (default.sites, default.site_effects) == (1, 0.0)
    explicit = site_config(tmp_path / "explicit", sites=1, site_effects=0.0)
    two_sites = site_config(tmp_path / "two_sites", sites=2, site_effects=0.0)
    tables = {config.out.name: read_tsv(generate_atrophy_cohort(config))
              for config in (default, explicit, two_sites)}
    assert "site" not in tables["default"].columns
    assert ((tmp_path / "default" / "cohort.tsv").read_text()
            == (tmp_path / "explicit" / "cohort.tsv").read_text())
    # a site assignment alone changes no image and adds only the site column
    assert tables["two_sites"].drop(columns="site").equals(tables["default"])
    record = json.loads((tmp_path / "default" / "generator.json").read_text())
    assert "sites" not in record and not any(key.startswith("site")
                                             for key in record["constants"])
    for path in tables["default"].path:
        images = [nib.load(tmp_path / name / path) for name in tables]
        assert all(image.get_fdata(dtype=np.float32).tobytes()
                   == images[0].get_fdata(dtype=np.float32).tobytes() for image in images)
        assert all(np.array_equal(image.affine, images[0].affine) for image in images)


def test_a_folder_generated_before_sites_existed_is_accepted_at_one_site(tmp_path):
    config = site_config(tmp_path)
    generate_atrophy_cohort(config)
    record = json.loads((tmp_path / "generator.json").read_text())
    del record["config"]["sites"], record["config"]["site_effects"]  # as written before
    (tmp_path / "generator.json").write_text(json.dumps(record))
    generate_atrophy_cohort(config)  # the same cohort: accepted
    with pytest.raises(ValueError, match=r"other settings \(sites: 1 -> 2\)"):
        generate_atrophy_cohort(site_config(tmp_path, sites=2))


def test_sites_split_each_diagnosis_evenly_and_are_seeded(tmp_path):
    config = site_config(tmp_path / "a", subjects=10, qc_failures=2, sites=3)
    table = read_tsv(generate_atrophy_cohort(config))
    again = read_tsv(generate_atrophy_cohort(config.model_copy(update={"out": tmp_path / "b"})))
    assert list(table.columns)[-1] == "site"
    assert list(table.site) == list(again.site)  # the same seed, the same assignment
    regular = table.iloc[:10]
    assert set(regular.site) == {"site-1", "site-2", "site-3"}
    for diagnosis in ("CN", "AD"):
        counts = regular[regular.diagnosis == diagnosis].site.value_counts()
        assert counts.sum() == 5 and counts.max() - counts.min() <= 1
    counts = regular.site.value_counts()
    assert counts.max() - counts.min() <= 1
    assert table.iloc[10:].site.str.fullmatch(r"site-[123]").all()  # QC failures have one too
    record = json.loads((tmp_path / "a" / "generator.json").read_text())
    assert [site["site"] for site in record["sites"]] == ["site-1", "site-2", "site-3"]
    for site in record["sites"]:
        assert site["participants"] == sorted(table[table.site == site["site"]].participant_id)
        assert site["gain"] == 1.0 and site["blur_mm"] == 0.0  # site_effects = 0
        assert len(site["bias_coefficients"]) == 20 and not any(site["bias_coefficients"])
    assignments = [list(read_tsv(generate_atrophy_cohort(
        site_config(tmp_path / f"seed{seed}", subjects=10, sites=3, seed=seed))).site)
        for seed in (1, 2, 3)]
    assert len({tuple(sites) for sites in assignments}) > 1  # the assignment is drawn


def test_site_effects_are_gain_then_blur_in_mm_then_bias_field(tmp_path, monkeypatch):
    """Against scipy and numpy with the recorded parameters; on 8 mm voxels a blur std read in
    voxels instead of mm would be 8 times too wide."""
    monkeypatch.setattr("voxplain.data.synthetic.SATURATION", 0.5)  # nothing clips at 1
    settings = dict(sites=2, noise=0.0, qc_failures=0)
    plain = read_tsv(generate_atrophy_cohort(site_config(tmp_path / "plain", **settings)))
    config = site_config(tmp_path / "sites", site_effects=1.0, **settings)
    table = read_tsv(generate_atrophy_cohort(config))
    assert list(table.site) == list(plain.site)
    sites = {site["site"]: site
             for site in json.loads((tmp_path / "sites" / "generator.json").read_text())["sites"]}
    assert all(1.0 <= site["gain"] <= 1.1 and 0 <= site["blur_mm"] <= 4.0
               for site in sites.values())
    assert max(site["gain"] for site in sites.values()) > 1.02
    assert max(site["blur_mm"] for site in sites.values()) > 1.0
    for row, before in zip(table.itertuples(), plain.itertuples()):
        site = sites[row.site]
        gm = load(tmp_path / "plain" / before.path).astype(np.float64)
        assert 0.1 < gm.max() < 1  # the GM before clipping
        blurred = ndimage.gaussian_filter(site["gain"] * gm, site["blur_mm"] / 8.0)
        expected = blurred * bias_field(site["bias_coefficients"], 3, gm.shape)
        image = load(tmp_path / "sites" / row.path)
        assert image.max() < 1
        np.testing.assert_allclose(image, expected, atol=2e-6)


@pytest.mark.parametrize("noise", [0.03, 0.0])
def test_regular_images_with_full_site_effects_pass_the_quality_check(tmp_path, noise):
    config = small_config(tmp_path, subjects=12, sessions=1, qc_failures=2, sites=3,
                          site_effects=1.0, noise=noise, downsample=4)
    table = read_tsv(generate_atrophy_cohort(config))
    maxima = [load(tmp_path / path).max() for path in table.path]
    assert all(maximum >= QC_THRESHOLD for maximum in maxima[:12])
    assert all(maximum == pytest.approx(0.7) for maximum in maxima[12:])  # QC failures


def test_site_effects_leave_the_ground_truth_and_the_atrophy_maps_unchanged(tmp_path):
    settings = dict(sites=2, qc_failures=1)
    plain = read_tsv(generate_atrophy_cohort(site_config(tmp_path / "plain", **settings)))
    table = read_tsv(generate_atrophy_cohort(site_config(tmp_path / "sites", site_effects=1.0,
                                                         **settings)))
    pairs = [("ground_truth.nii.gz", "ground_truth.nii.gz"),
             *zip(plain.atrophy_path, table.atrophy_path)]
    assert (table.diagnosis == "AD").any()
    for before, after in pairs:
        assert (load(tmp_path / "plain" / before).tobytes()
                == load(tmp_path / "sites" / after).tobytes())
    assert not np.array_equal(load(tmp_path / "plain" / plain.path[0]),
                              load(tmp_path / "sites" / table.path[0]))


def test_site_effects_with_a_single_site_are_refused(tmp_path):
    with pytest.raises(ValidationError, match=r"site_effects = 0.5 needs sites > 1"):
        site_config(tmp_path, site_effects=0.5)
