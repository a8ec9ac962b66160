"""2D intensities: pictures through their palette and bit depth, NPY of real numbers only, and
messages that say what a path is when it is not a readable file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from voxplain.data.images import ImageError, read_image

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
