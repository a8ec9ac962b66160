"""Synthetic lesion patches (paper 3 data): classes defined by border shape, real CT backgrounds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage, stats

from voxplain.config import LesionCohortConfig
from voxplain.data import lesions
from voxplain.data.cohort import Cohort
from voxplain.data.lesions import generate_lesion_cohort
from voxplain.io import read_tsv


def make_cohort(out: Path, **settings) -> tuple[Path, pd.DataFrame]:
    """Generate a small cohort into ``out`` and return (folder, cohort table)."""
    config = LesionCohortConfig(out=out, **{"subjects": 24, **settings})
    table = read_tsv(generate_lesion_cohort(config))
    return out, table


def load_images(out: Path, table: pd.DataFrame) -> np.ndarray:
    """All NPY images of a cohort, ``(N, 1, H, W)``."""
    return np.stack([np.load(out / path) for path in table["path"]])


def load_masks(out: Path, table: pd.DataFrame) -> np.ndarray:
    """All ground-truth masks of a cohort, ``(N, H, W)``."""
    return np.stack([np.load(out / path) for path in table["mask_path"]])


def perimeter(mask: np.ndarray) -> float:
    """Perimeter estimate of a binary mask: pixel edges between lesion and background times pi/4.

    Counting edges measures a boundary in the city-block metric; pi/4 is the Cauchy-Crofton
    correction that makes it unbiased for boundaries of random orientation.
    """
    padded = np.pad(mask.astype(bool), 1)
    edges = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(
        padded[:, 1:] != padded[:, :-1]
    )
    return edges * np.pi / 4


def compactness(mask: np.ndarray) -> float:
    """Isoperimetric quotient 4 pi area / perimeter^2 (1 for a disc, lower for irregular shapes)."""
    return 4 * np.pi * mask.sum() / perimeter(mask) ** 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("synthetic"), subjects=40)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("ct"), background="ct", subjects=24)


def test_same_seed_gives_the_same_patches_and_another_seed_different_ones(tmp_path):
    first_out, first = make_cohort(tmp_path / "a", subjects=6, seed=3)
    again_out, again = make_cohort(tmp_path / "b", subjects=6, seed=3)
    other_out, other = make_cohort(tmp_path / "c", subjects=6, seed=4)
    assert first.equals(again)
    np.testing.assert_array_equal(load_images(first_out, first), load_images(again_out, again))
    np.testing.assert_array_equal(load_masks(first_out, first), load_masks(again_out, again))
    assert not np.array_equal(load_images(first_out, first), load_images(other_out, other))
    assert not np.array_equal(load_masks(first_out, first), load_masks(other_out, other))


def test_a_sample_does_not_depend_on_the_cohort_size(tmp_path):
    small_out, small = make_cohort(tmp_path / "small", subjects=4)
    large_out, large = make_cohort(tmp_path / "large", subjects=10)
    assert small.equals(large.iloc[:4])
    np.testing.assert_array_equal(load_images(small_out, small),
                                  load_images(large_out, large)[:4])


def test_classes_are_balanced_and_only_malignant_lesions_are_spiculated(synthetic):
    out, table = synthetic
    assert list(table.columns[:5]) == ["participant_id", "session_id", "diagnosis", "path",
                                       "mask_path"]
    assert table["participant_id"].tolist() == [f"sub-{i:04d}" for i in range(1, 41)]
    assert set(table["session_id"]) == {"ses-M00"}
    assert table["diagnosis"].value_counts().to_dict() == {"benign": 20, "malignant": 20}
    benign = table[table["diagnosis"] == "benign"]
    malignant = table[table["diagnosis"] == "malignant"]
    assert (benign["spicules"] == 0).all() and (benign["lobulation"] == 0).all()
    assert (malignant["spicules"] >= 3).all() and (malignant["lobulation"] > 0).all()


def test_lesion_size_ranges_of_the_two_classes_overlap(synthetic):
    _, table = synthetic
    radius = table.groupby("diagnosis")["radius_px"]
    assert radius.min().max() < radius.max().min()


def test_patches_are_float32_in_unit_range_and_masks_binary_and_non_empty(synthetic):
    out, table = synthetic
    images, masks = load_images(out, table), load_masks(out, table)
    assert images.dtype == np.float32 and images.shape == (40, 1, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    assert masks.dtype == np.uint8 and masks.shape == (40, 64, 64)
    assert set(np.unique(masks)) == {0, 1}
    assert (masks.sum(axis=(1, 2)) > 20).all()


@pytest.mark.parametrize("cohort", ["synthetic", "ct"])
def test_lesions_are_brighter_than_the_tissue_around_them(cohort, request):
    out, table = request.getfixturevalue(cohort)
    images, masks = load_images(out, table)[:, 0], load_masks(out, table).astype(bool)
    contrasts = []
    for image, mask in zip(images, masks):
        ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
        contrasts.append(image[mask].mean() - image[ring].mean())
    assert np.mean(contrasts) > 0.2
    assert np.mean(np.array(contrasts) > 0) >= 0.9


def test_malignant_masks_are_less_compact_than_benign_ones(synthetic):
    out, table = synthetic
    masks = load_masks(out, table)
    quotient = np.array([compactness(mask) for mask in masks])
    malignant = (table["diagnosis"] == "malignant").to_numpy()
    assert quotient[~malignant].mean() > 0.85
    assert quotient[malignant].mean() < 0.75 * quotient[~malignant].mean()


def test_png_patches_round_trip_to_the_npy_values_within_one_grey_level(tmp_path):
    npy_out, npy = make_cohort(tmp_path / "npy", subjects=4, file_format="npy")
    png_out, png = make_cohort(tmp_path / "png", subjects=4, file_format="png")
    assert all(path.endswith(".png") for path in png["path"])
    for npy_path, png_path in zip(npy["path"], png["path"]):
        grey = np.asarray(Image.open(png_out / png_path))
        assert grey.dtype == np.uint8 and grey.shape == (64, 64)
        expected = np.load(npy_out / npy_path)[0]
        assert np.abs(grey / 255.0 - expected).max() <= 1 / 255
    np.testing.assert_array_equal(load_masks(npy_out, npy), load_masks(png_out, png))


def test_ct_background_is_a_crop_of_the_named_dicom_slice_in_the_lung_window(tmp_path):
    out, table = make_cohort(tmp_path, background="ct", subjects=6, noise=0.0)
    for row in table.itertuples():
        package, _, relative = row.background_file.partition("/")
        root = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
        dataset = pydicom.dcmread(root / relative)
        assert dataset.Modality == "CT"
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        rows = row.background_origin_row + np.arange(64) * row.background_step_row
        cols = row.background_origin_col + np.arange(64) * row.background_step_col
        crop = bilinear_mirrored(hu, rows, cols)
        expected = np.clip((crop + 1000) / 1400, 0, 1)
        image = np.load(out / row.path)[0]
        away = ~ndimage.binary_dilation(np.load(out / row.mask_path), iterations=5)
        assert away.sum() > 1000
        np.testing.assert_allclose(image[away], expected[away], atol=1e-4)


def bilinear_mirrored(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``values`` on the grid ``rows x cols``, mirrored across the edges."""
    margin = 64
    padded = np.pad(values, margin, mode="reflect")
    r, c = np.meshgrid(rows + margin, cols + margin, indexing="ij")
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = r - r0, c - c0
    return ((1 - fr) * (1 - fc) * padded[r0, c0] + (1 - fr) * fc * padded[r0, c0 + 1]
            + fr * (1 - fc) * padded[r0 + 1, c0] + fr * fc * padded[r0 + 1, c0 + 1])


def test_ct_cohort_records_its_source_slice(ct):
    _, table = ct
    assert set(table["background_file"]) == {"pydicom/data/test_files/CT_small.dcm"}
    assert table[["background_origin_row", "background_origin_col"]].nunique().min() > 10


def background_dicom(background_file: str) -> pydicom.Dataset:
    """The DICOM slice a CT cohort row names (``package/path/in/package``), read by pydicom."""
    package, _, relative = background_file.partition("/")
    root = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
    return pydicom.dcmread(root / relative)


def test_ct_patches_record_the_dicom_pixel_spacing_times_the_resampling_step(ct):
    out, table = ct
    for row in table.itertuples():
        row_mm, col_mm = (float(s) for s in background_dicom(row.background_file).PixelSpacing)
        assert row.pixel_spacing_row == pytest.approx(row_mm * row.background_step_row)
        assert row.pixel_spacing_col == pytest.approx(col_mm * row.background_step_col)
    # the patch spans 45 mm in 64 pixels (paper 3), not the slice's own 0.66 mm pixels
    assert set(table.pixel_spacing_row) == set(table.pixel_spacing_col) == {0.703125}
    np.testing.assert_allclose(Cohort.from_tsv(out / "cohort.tsv").affine,
                               np.diag([0.703125, 0.703125, 1.0, 1.0]))


def test_synthetic_patches_have_no_physical_spacing_and_get_1_mm_pixels(synthetic):
    out, table = synthetic
    assert not {"pixel_spacing_row", "pixel_spacing_col"} & set(table.columns)
    np.testing.assert_allclose(Cohort.from_tsv(out / "cohort.tsv").affine, np.eye(4))


def test_missing_ct_slices_raise_an_error_naming_what_was_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(lesions, "CT_SLICES", (("pydicom", "data/test_files/absent.dcm"),
                                               ("no_such_package", "data/ct.dcm")))
    with pytest.raises(FileNotFoundError) as error:
        make_cohort(tmp_path, background="ct", subjects=4)
    message = str(error.value)
    assert "absent.dcm (missing)" in message
    assert "package 'no_such_package' not installed" in message


def test_non_ct_dicom_files_are_not_used_as_backgrounds(tmp_path, monkeypatch):
    monkeypatch.setattr(lesions, "CT_SLICES", (("pydicom", "data/test_files/MR_small.dcm"),))
    with pytest.raises(FileNotFoundError, match="modality 'MR', not CT"):
        make_cohort(tmp_path, background="ct", subjects=4)


def test_rerun_rewrites_nothing(tmp_path):
    out, _ = make_cohort(tmp_path, subjects=4)
    files = sorted(path for path in out.rglob("*") if path.is_file())
    assert len(files) == 2 * 4 + 2
    before = {path: path.stat().st_mtime_ns for path in files}
    make_cohort(tmp_path, subjects=4)
    assert {path: path.stat().st_mtime_ns for path in files} == before
    assert sorted(path for path in out.rglob("*") if path.is_file()) == files


def test_missing_files_are_rendered_again_identically(tmp_path):
    out, table = make_cohort(tmp_path, subjects=4)
    image = out / table["path"][1]
    original = np.load(image)
    image.unlink()
    make_cohort(tmp_path, subjects=4)
    np.testing.assert_array_equal(np.load(image), original)


def test_generator_json_keeps_the_settings_and_other_settings_are_refused(tmp_path):
    make_cohort(tmp_path, subjects=4, noise=0.02)
    settings = json.loads((tmp_path / "generator.json").read_text())
    assert settings == LesionCohortConfig(out=tmp_path, subjects=4, noise=0.02).model_dump(
        mode="json")
    with pytest.raises(ValueError, match="noise: 0.02 -> 0.1"):
        make_cohort(tmp_path, subjects=4, noise=0.1)


def test_progress_is_reported_after_every_sample(tmp_path):
    calls = []
    generate_lesion_cohort(LesionCohortConfig(out=tmp_path, subjects=5),
                           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_negative_seed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="seed\n  Input should be greater than or equal to 0"):
        make_cohort(tmp_path, seed=-1)


def test_a_failed_ct_lookup_leaves_the_folder_unclaimed(tmp_path, monkeypatch):
    monkeypatch.setattr(lesions, "CT_SLICES", (("pydicom", "data/test_files/absent.dcm"),))
    with pytest.raises(FileNotFoundError):
        make_cohort(tmp_path, background="ct", subjects=4)
    assert not (tmp_path / "generator.json").exists()


def far_background_detail_sd(image: np.ndarray, mask: np.ndarray) -> float:
    """SD of the fine detail (image minus its Gaussian blur, sigma 3 px) away from the lesion."""
    detail = image - ndimage.gaussian_filter(image, 3.0)
    far = ~ndimage.binary_dilation(mask.astype(bool), iterations=6)
    return float(detail[far].std())


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("varied"), subjects=40, background_variation=2.0)


def test_background_variation_draws_gains_in_range_and_the_pixels_follow_them(varied):
    out, table = varied
    gains = table[["texture_fine_gain", "texture_coarse_gain"]].to_numpy()
    noise_gain = table["noise_sd"].to_numpy() / 0.05
    for values in (gains[:, 0], gains[:, 1], noise_gain):
        assert values.min() >= 0.5 - 1e-4 and values.max() <= 2.0 + 1e-4
        assert values.min() < 0.65 and values.max() > 1.6  # wide, not collapsed near 1
    images, masks = load_images(out, table)[:, 0], load_masks(out, table)
    measured = np.array([far_background_detail_sd(i, m) for i, m in zip(images, masks)])
    # The measured background detail follows the recorded noise SD (pixel noise dominates the
    # fine detail) and spans a wide range, unlike the default cohort.
    assert stats.spearmanr(measured, table["noise_sd"]).statistic > 0.8
    assert measured.max() / measured.min() > 2.5


def test_background_variation_is_independent_of_the_class(varied, synthetic):
    out, table = varied
    images, masks = load_images(out, table)[:, 0], load_masks(out, table)
    measured = np.array([far_background_detail_sd(i, m) for i, m in zip(images, masks)])
    malignant = (table["diagnosis"] == "malignant").to_numpy()
    assert stats.mannwhitneyu(measured[malignant], measured[~malignant]).pvalue > 0.05
    # Without variation the background detail is nearly constant across patches.
    base_out, base = synthetic
    baseline = np.array([far_background_detail_sd(i, m) for i, m in
                         zip(load_images(base_out, base)[:, 0], load_masks(base_out, base))])
    assert baseline.std() < 0.25 * measured.std()


def test_background_variation_leaves_every_other_draw_unchanged(tmp_path):
    plain_out, plain = make_cohort(tmp_path / "plain", subjects=6, seed=5)
    varied_out, varied = make_cohort(tmp_path / "varied", subjects=6, seed=5,
                                     background_variation=3.0)
    again_out, again = make_cohort(tmp_path / "again", subjects=6, seed=5,
                                   background_variation=3.0)
    assert list(plain.columns) == list(varied.columns[: len(plain.columns)])
    assert plain.equals(varied[plain.columns])
    np.testing.assert_array_equal(load_masks(plain_out, plain), load_masks(varied_out, varied))
    assert not np.array_equal(load_images(plain_out, plain), load_images(varied_out, varied))
    assert varied.equals(again)
    np.testing.assert_array_equal(load_images(varied_out, varied), load_images(again_out, again))


def test_a_generator_json_without_background_variation_reads_it_as_the_default(tmp_path):
    make_cohort(tmp_path, subjects=4)
    path = tmp_path / "generator.json"
    settings = json.loads(path.read_text())
    del settings["background_variation"]
    path.write_text(json.dumps(settings))
    make_cohort(tmp_path, subjects=4)
    with pytest.raises(ValueError, match="background_variation: 1.0 -> 2.0"):
        make_cohort(tmp_path, subjects=4, background_variation=2.0)


@pytest.mark.parametrize("cohort", ["synthetic", "ct"])
def test_a_counterfactual_patch_differs_only_where_the_class_features_are(cohort, request):
    """Same background, texture and noise; the pixels change only within the Gaussian opacity
    blur (0.5 px, truncated at 2 px) of pixels the two lesions do not cover alike."""
    out, table = request.getfixturevalue(cohort)
    config = LesionCohortConfig.model_validate(json.loads((out / "generator.json").read_text()))
    slices = lesions.background_slices(config)
    real = load_images(out, table)
    twins = lesions.counterfactual_patches(out, list(table["participant_id"]))
    assert twins.shape == real.shape and twins.dtype == np.float32
    for index, (image, twin) in enumerate(zip(real[:, 0], twins[:, 0])):
        _, shape, _, _ = lesions.design_sample(config, index, slices)
        other = lesions.counterfactual_shape(shape, np.random.default_rng([config.seed, index, 3]),
                                             config.size)
        differ = lesions.lesion_coverage(shape, config.size) != lesions.lesion_coverage(
            other, config.size)
        assert differ.any()
        near = ndimage.binary_dilation(differ, np.ones((3, 3), bool), iterations=2)
        np.testing.assert_array_equal(image[~near], twin[~near])
        assert np.abs(image - twin)[near].max() > 0.05


def test_a_counterfactual_lesion_swaps_exactly_the_class_features(synthetic):
    out, table = synthetic
    config = LesionCohortConfig.model_validate(json.loads((out / "generator.json").read_text()))
    for index, diagnosis in enumerate(table["diagnosis"]):
        _, shape, _, _ = lesions.design_sample(config, index, [])
        other = lesions.counterfactual_shape(shape, np.random.default_rng(index), config.size)
        kept = ("center", "radius_px", "elongation", "orientation", "lesion_hu")
        assert all(getattr(other, name) == getattr(shape, name) for name in kept)
        if diagnosis == "malignant":
            assert len(other.harmonics) == len(other.spicules) == 0
        else:
            assert 2 <= len(other.harmonics) <= 3 and 3 <= len(other.spicules) <= 10
            assert 0.08 <= other.lobulation <= 0.2
            lengths = other.spicules[:, 1] / shape.radius_px
            assert np.all((lengths >= 0.4) & (lengths <= 0.9))


def test_counterfactual_patches_name_a_folder_without_settings_and_a_bad_participant(
        tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="generator.json"):
        lesions.counterfactual_patches(tmp_path, ["sub-0001"])
    out, _ = synthetic
    with pytest.raises(ValueError, match="'patient-1'"):
        lesions.counterfactual_patches(out, ["patient-1"])
