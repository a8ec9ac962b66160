"""The synthetic MS cohort (paper 2): controls, RRMS and SPMS seen in T1, T2 and FLAIR, with the
lesions and the atrophy known."""

from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import MSCohortConfig
from voxplain.data.atlas import AAL2_LOBES, Atlas
from voxplain.data.ms import (
    class_models,
    generate_ms_cohort,
    nearest_label,
    plan_ms_sessions,
    render_session,
    subject_anatomy,
    template_anatomy,
)
from voxplain.data.synthetic import cohort_grid
from voxplain.data.template import wm_template
from voxplain.io import read_tsv
from voxplain.steps.pipeline import STEPS

FILE_COLUMNS = ["t1", "t2", "flair", "lesion_mask", "atrophy_path"]


def load(path) -> np.ndarray:
    return nib.load(path).get_fdata(dtype=np.float32)


def small_config(out, **changes) -> MSCohortConfig:
    return MSCohortConfig(**{"out": out, "subjects": 9, "seed": 0, **changes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 controls, 3 RRMS, 3 SPMS, one session each, on the default 61x73x61 grid (3 mm)."""
    config = small_config(tmp_path_factory.mktemp("ms"))
    tsv = generate_ms_cohort(config)
    table = read_tsv(tsv)
    for column in FILE_COLUMNS:
        table[f"{column}_image"] = [load(tsv.parent / path) for path in table[column]]
    return config, table


@pytest.fixture(scope="module")
def anatomy(cohort):
    config, _ = cohort
    return template_anatomy(config, cohort_grid(config))


def patients(table):
    return table[table.diagnosis != "CN"]


def test_cohort_has_a_third_of_each_class_and_a_column_per_sequence(cohort):
    config, table = cohort
    assert list(table.columns[:14]) == [
        "participant_id", "session_id", "diagnosis", "path", "t1", "t2", "flair", "lesion_mask",
        "atrophy_path", "age", "sex", "lesions", "lesion_volume_mm3", "atrophy"]
    assert table.diagnosis.value_counts().to_dict() == {"CN": 3, "RRMS": 3, "SPMS": 3}
    assert (table.path == table.t1).all()
    for column in ["path", *FILE_COLUMNS]:
        for path in table[column]:
            assert not os.path.isabs(path) and (config.out / path).is_file()
    assert table.sex.isin(["F", "M"]).all() and table.age.between(25, 70).all()


def test_remainder_subjects_go_to_rrms_then_spms(tmp_path):
    counts = {n: {d: sum(p.diagnosis == d for p in plan_ms_sessions(small_config(tmp_path,
                                                                                subjects=n)))
                  for d in ("CN", "RRMS", "SPMS")} for n in (10, 11)}
    assert counts[10] == {"CN": 3, "RRMS": 4, "SPMS": 3}
    assert counts[11] == {"CN": 3, "RRMS": 4, "SPMS": 4}


def test_the_three_sequences_and_the_truth_share_the_cohort_grid(cohort):
    config, table = cohort
    grid = cohort_grid(config)
    assert grid.shape == (61, 73, 61) and grid.voxel_size == (3.0, 3.0, 3.0)
    for row in table.itertuples():
        for column in FILE_COLUMNS:
            image = nib.load(config.out / getattr(row, column))
            assert image.shape == grid.shape
            np.testing.assert_allclose(image.affine, grid.affine)
    assert all(mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
               for mask in table.lesion_mask_image)
    assert nib.load(config.out / table.lesion_mask.iloc[0]).get_data_dtype() == np.uint8


def test_tissue_contrast_of_each_sequence(cohort, anatomy):
    _, table = cohort
    gm, wm, csf = anatomy.tissues
    tissues = {"gm": gm > 0.6, "wm": wm > 0.9, "csf": csf > 0.9}
    for row in table.itertuples():
        outside = row.lesion_mask_image == 0
        mean = {sequence: {tissue: getattr(row, f"{sequence}_image")[mask & outside].mean()
                           for tissue, mask in tissues.items()}
                for sequence in ("t1", "t2", "flair")}
        assert mean["t1"]["wm"] > mean["t1"]["gm"] + 0.1 > mean["t1"]["csf"] + 0.2
        assert mean["t2"]["csf"] > mean["t2"]["gm"] + 0.1 > mean["t2"]["wm"] + 0.2
        assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"] + 0.1
        assert mean["flair"]["csf"] < mean["t2"]["csf"] / 3  # FLAIR suppresses CSF


def test_lesions_lie_in_white_matter(cohort):
    config, table = cohort
    wm = wm_template(cohort_grid(config))
    for mask in patients(table).lesion_mask_image:
        assert mask.sum() > 0
        assert (wm[mask > 0] > 0.5).mean() >= 0.9


def test_lesions_are_bright_on_t2_and_flair_and_dark_on_t1(cohort, anatomy):
    _, table = cohort
    wm = anatomy.tissues[1]
    for row in patients(table).itertuples():
        lesion = row.lesion_mask_image > 0
        around = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (wm > 0.5)
        assert row.t1_image[lesion].mean() < row.t1_image[around].mean() - 0.2
        assert row.t2_image[lesion].mean() > row.t2_image[around].mean() + 0.2
        assert row.flair_image[lesion].mean() > row.flair_image[around].mean() + 0.3
        assert row.flair_image[lesion].mean() > np.percentile(row.flair_image[~lesion], 99.9)


def test_spms_has_more_lesion_volume_than_rrms_and_controls_none(cohort):
    _, table = cohort
    volume = table.groupby("diagnosis").lesion_volume_mm3.mean()
    assert volume["SPMS"] > 1.5 * volume["RRMS"] > 0
    assert all(not mask.any() for mask in table[table.diagnosis == "CN"].lesion_mask_image)
    for row in table.itertuples():
        assert row.lesion_volume_mm3 == row.lesion_mask_image.sum() * 27.0


def test_atrophy_truth_is_zero_for_controls_and_peaks_in_the_atrophy_locations(cohort):
    config, table = cohort
    assert all(not atrophy.any() for atrophy in table[table.diagnosis == "CN"].atrophy_path_image)
    atlas = Atlas.aal2(cohort_grid(config))
    regions = [name for lobe in ("frontal", "temporal", "parietal")
               for name in atlas.lobe_regions(lobe)]
    inside = atlas.region_mask(regions)
    occipital = atlas.region_mask(atlas.lobe_regions("occipital"))
    for row in table[table.diagnosis == "SPMS"].itertuples():
        atrophy = row.atrophy_path_image
        assert atrophy[inside].mean() > 1.5 * atrophy[occipital].mean()
        assert 0 < atrophy.max() <= 1


def test_lesion_mask_is_where_the_lesions_changed_the_intensities(cohort, anatomy):
    config, table = cohort
    plan = next(p for p in plan_ms_sessions(config) if p.diagnosis == "SPMS")
    subject = subject_anatomy(config, anatomy, plan, plan.lesions)
    with_lesions = render_session(config, anatomy, subject, plan)
    without = render_session(config, anatomy, subject, dataclasses.replace(plan, lesions=0))
    row = table[table.participant_id == plan.participant_id].iloc[0]
    written = load(config.out / row.lesion_mask) > 0
    np.testing.assert_array_equal(with_lesions["lesion_mask"] > 0, written)
    assert not without["lesion_mask"].any()
    for sequence in ("t1", "t2", "flair"):
        np.testing.assert_array_equal(with_lesions[sequence], load(config.out / row[sequence]))
        np.testing.assert_array_equal(with_lesions[sequence] != without[sequence], written)


def test_lesions_follow_the_locations_of_their_class(tmp_path):
    config = small_config(tmp_path, subjects=3, rrms_locations=["occipital"],
                          spms_locations=["frontal"])
    table = read_tsv(generate_ms_cohort(config))
    atlas = Atlas.aal2(cohort_grid(config))
    nearest = nearest_label(atlas)
    for row in table[table.diagnosis != "CN"].itertuples():
        lobe = {"RRMS": "occipital", "SPMS": "frontal"}[row.diagnosis]
        lobe_labels = [index for index, name in atlas.names.items()
                       if name in atlas.lobe_regions(lobe)]
        lesion = load(tmp_path / row.lesion_mask) > 0
        assert np.isin(nearest[lesion], lobe_labels).mean() >= 0.8


def test_later_sessions_keep_the_earlier_lesions_and_add_new_ones(tmp_path):
    config = small_config(tmp_path, subjects=3, sessions=2, new_lesions=4.0, spms_lesions=(2, 3))
    table = read_tsv(generate_ms_cohort(config))
    spms = table[table.diagnosis == "SPMS"]
    first, second = (load(tmp_path / path) > 0 for path in spms.lesion_mask)
    assert list(spms.session_id) == ["ses-M00", "ses-M12"]
    assert (first <= second).all() and second.sum() > first.sum()
    assert spms.lesions.iloc[1] > spms.lesions.iloc[0]


def test_difficulty_pulls_the_spms_model_towards_rrms(tmp_path):
    easy = class_models(small_config(tmp_path))
    hard = class_models(small_config(tmp_path, difficulty=1.0))
    half = class_models(small_config(tmp_path, difficulty=0.5, rrms_lesions=(2, 10),
                                     spms_lesions=(6, 20)))
    assert easy["SPMS"].lesions == (6, 20) and hard["SPMS"].lesions == hard["RRMS"].lesions
    assert hard["SPMS"].radius_mm == pytest.approx(hard["RRMS"].radius_mm)
    assert hard["SPMS"].atrophy == pytest.approx(hard["RRMS"].atrophy)
    assert hard["SPMS"].locations != hard["RRMS"].locations
    assert half["SPMS"].lesions == (4, 15)


def test_generation_is_byte_identical_for_a_seed_and_a_rerun_rewrites_nothing(tmp_path):
    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, folder in folders.items():
        generate_ms_cohort(small_config(folder, subjects=3, seed=5 if name != "c" else 6))
    files = sorted(p.relative_to(folders["a"]) for p in folders["a"].rglob("*.nii.gz"))
    assert len(files) == 3 * 5
    for relative in files:
        assert (folders["a"] / relative).read_bytes() == (folders["b"] / relative).read_bytes()
    assert (folders["a"] / "cohort.tsv").read_text() == (folders["b"] / "cohort.tsv").read_text()
    assert any((folders["a"] / r).read_bytes() != (folders["c"] / r).read_bytes() for r in files)
    before = {r: (folders["a"] / r).stat().st_mtime_ns for r in files}
    generate_ms_cohort(small_config(folders["a"], subjects=3, seed=5))
    assert {r: (folders["a"] / r).stat().st_mtime_ns for r in files} == before


def test_a_second_run_with_other_settings_is_refused(tmp_path):
    generate_ms_cohort(small_config(tmp_path, subjects=3))
    with pytest.raises(ValueError, match=r"other settings \(noise: 0.03 -> 0.05\)"):
        generate_ms_cohort(small_config(tmp_path, subjects=3, noise=0.05))


def test_an_unknown_location_names_close_matches(tmp_path):
    config = small_config(tmp_path, spms_locations=["frontl", "Occipital_Sup_L"])
    with pytest.raises(ValueError, match="unknown location 'frontl'; did you mean frontal"):
        template_anatomy(config, cohort_grid(config))
    config = small_config(tmp_path, atrophy_locations=["periventricular"])
    with pytest.raises(ValueError, match="'periventricular' is not one"):
        template_anatomy(config, cohort_grid(config))


def test_every_aal2_region_is_in_exactly_one_lobe():
    atlas = Atlas.aal2(cohort_grid(small_config("unused")))
    lobes = {name: [lobe for lobe in AAL2_LOBES if name in atlas.lobe_regions(lobe)]
             for name in atlas.region_names}
    assert len(lobes) == 120 and all(len(found) == 1 for found in lobes.values()), lobes
    assert "Thalamus_L" in atlas.lobe_regions("subcortical")
    with pytest.raises(ValueError, match="unknown lobe 'frontal_lobe'"):
        atlas.lobe_regions("frontal_lobe")


def test_cli_generates_an_ms_cohort_and_the_pipeline_knows_the_step(tmp_path):
    result = CliRunner().invoke(app, ["generate", "ms", "--out", str(tmp_path / "ms"),
                                      "--subjects", "3", "--downsample", "3", "--spms-locations",
                                      "periventricular,frontal", "--seed", "2"])
    assert result.exit_code == 0, result.output
    table = read_tsv(tmp_path / "ms" / "cohort.tsv")
    assert sorted(table.diagnosis) == ["CN", "RRMS", "SPMS"]
    assert nib.load(tmp_path / "ms" / table.flair.iloc[0]).shape == (41, 49, 41)
    assert STEPS["generate_ms"].schema is MSCohortConfig
