"""2D intensities: pictures through their palette and bit depth, NPY of real numbers only, 2D
NIfTI and DICOM with their pixel spacing, and messages that say what a path is when it is not a
readable file."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from voxplain.data.images import ImageError, read_header, read_image

GREYS = np.array([[0, 1], [2, 3]], np.uint8)


def _palette_png(path: Path, palette: list[int]) -> Path:
    picture = Image.fromarray(GREYS, mode="L").convert("P")
    picture.putpalette(palette)
    picture.save(path)
    return path


def test_grey_palette_png_is_read_as_its_grey_levels_not_its_indices(tmp_path):
    levels = [255, 170, 85, 0]  # index 0 is white
    path = _palette_png(tmp_path / "grey.png", [v for level in levels for v in (level,) * 3])
    image, _ = read_image(path)
    assert image.shape == (1, 2, 2)
    np.testing.assert_allclose(image[0], np.array(levels).reshape(2, 2) / 255)


def test_colour_palette_png_is_read_as_rgb(tmp_path):
    colours = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]
    image, _ = read_image(_palette_png(tmp_path / "colour.png", colours))
    assert image.shape == (3, 2, 2)
    np.testing.assert_allclose(image[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(image[:, 1, 0], [0, 0, 1])


def test_16_bit_png_is_scaled_by_the_16_bit_full_scale(tmp_path):
    values = np.array([[0, 4095], [32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image, _ = read_image(tmp_path / "deep.png")
    np.testing.assert_allclose(image[0], values / 65535, rtol=1e-6)


def test_16_bit_png_read_as_mode_i_by_older_pillow_is_scaled_the_same(tmp_path, monkeypatch):
    values = np.array([[0, 4095], [32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    opened = Image.open

    def open_as_older_pillow(path, *args, **kwargs):  # Pillow < 10.1 opened 16-bit PNGs as "I"
        return opened(path, *args, **kwargs).convert("I")

    monkeypatch.setattr(Image, "open", open_as_older_pillow)
    image, _ = read_image(tmp_path / "deep.png")
    np.testing.assert_allclose(image[0], values / 65535, rtol=1e-6)


@pytest.mark.parametrize(("values", "problem"), [
    (np.array([[1 + 2j, 3 + 0j]]), "complex values"),
    (np.array([["1", "2"]]), "are not numbers"),
    (np.array([["a", "b"]]), "are not numbers"),
    (np.array([[1, None]], dtype=object), "not a plain numeric NPY array"),
])
def test_npy_that_is_not_real_numbers_is_refused_naming_the_file(tmp_path, values, problem):
    path = tmp_path / "odd.npy"
    np.save(path, values)
    with pytest.raises(ImageError, match=problem) as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_directory_is_reported_as_a_directory(tmp_path):
    folder = tmp_path / "scan.npy"
    folder.mkdir()
    with pytest.raises(ImageError, match="scan.npy: is a directory"):
        read_image(folder)


def test_symbolic_link_loop_is_reported_as_a_loop(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.symlink_to(second)
    second.symlink_to(first)
    with pytest.raises(ImageError, match="a.png: is a symbolic link loop"):
        read_image(first)


def test_dangling_symbolic_link_names_its_missing_target(tmp_path):
    link = tmp_path / "scan.npy"
    link.symlink_to(tmp_path / "moved" / "scan.npy")
    with pytest.raises(ImageError, match="scan.npy: symbolic link to a missing file .*moved"):
        read_image(link)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_reported_as_unreadable_not_missing(tmp_path):
    path = tmp_path / "scan.npy"
    np.save(path, np.zeros((2, 2), np.float32))
    path.chmod(0)
    with pytest.raises(ImageError, match="scan.npy: file cannot be read .*ermission denied"):
        read_image(path)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1)])
def test_a_2d_nifti_is_read_as_an_image_with_the_spacing_of_its_header(tmp_path, shape):
    values = np.arange(24, dtype=np.float32).reshape(shape)
    affine = np.diag([0.6, 0.9, 1.0, 1.0])
    nib.save(nib.Nifti1Image(values, affine), tmp_path / "slice.nii.gz")
    image, read_affine = read_image(tmp_path / "slice.nii.gz")
    assert image.shape == (1, 4, 6)
    np.testing.assert_array_equal(image[0], values.reshape(4, 6))
    np.testing.assert_allclose(read_affine, affine)
    assert read_header(tmp_path / "slice.nii.gz")[0] == (1, 4, 6)


def test_a_nifti_of_more_than_three_spatial_axes_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 2), np.float32), np.eye(4)),
             tmp_path / "series.nii.gz")
    with pytest.raises(ImageError, match=r"series.nii.gz: expected a 3D volume .* shape \(2, 3"):
        read_image(tmp_path / "series.nii.gz")


def test_a_dicom_image_carries_its_pixel_spacing_rows_then_columns():
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    row_mm, col_mm = (float(s) for s in pydicom.dcmread(path).PixelSpacing)
    image, affine = read_image(path)
    np.testing.assert_allclose(np.diag(affine), [row_mm, col_mm, 1.0, 1.0])
    assert image.shape == (1, 128, 128)


@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_npy_and_png_images_hold_no_spacing_and_get_1_mm_pixels(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros((3, 5), np.float32))
    else:
        Image.fromarray(np.zeros((3, 5), np.uint8)).save(path)
    np.testing.assert_array_equal(read_image(path)[1], np.eye(4))
