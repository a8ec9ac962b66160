"""Map files of a run folder (issue 17): 2D maps are NIfTI slices that keep the pixel spacing,
3D maps keep their affine, and the ``.npy`` 2D maps of earlier versions are still read."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import check_niimg_3d, load_img

from voxplain.data.grid import Grid
from voxplain.io import save_map
from voxplain.run import RunFolder
from voxplain.run.maps import (
    group_maps,
    map_grid,
    read_map,
    read_map_on_grid,
    write_map,
)

#: A 2D grid of 0.7 mm rows and 0.8 mm columns, shifted: nothing in it is 1 or 0.
PLANE = np.array([[0.7, 0.0, 0.0, -12.5],
                  [0.0, 0.8, 0.0, 30.0],
                  [0.0, 0.0, 1.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0]])


def plane_map(shape=(5, 7)) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(shape).astype(np.float32)


def test_a_2d_map_is_one_nifti_slice_whose_header_holds_the_pixel_spacing(tmp_path):
    values = plane_map()
    path = write_map(tmp_path / "sub-01_ses-M00", values, Grid((5, 7), PLANE))
    assert path == tmp_path / "sub-01_ses-M00.nii.gz"
    image = nib.load(path)
    assert image.shape == (5, 7, 1)
    assert image.header.get_zooms() == pytest.approx((0.7, 0.8, 1.0))
    assert image.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(image.affine, PLANE)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 0], values)


def test_nilearn_opens_a_2d_map_as_an_image_and_as_a_3d_image(tmp_path):
    path = write_map(tmp_path / "map", plane_map(), Grid((5, 7), PLANE))
    assert load_img(str(path)).shape == (5, 7, 1)
    assert check_niimg_3d(str(path)).header.get_zooms()[:2] == pytest.approx((0.7, 0.8))


def test_a_2d_map_reads_back_with_its_values_shape_and_spacing(tmp_path):
    values = plane_map()
    path = write_map(tmp_path / "map", values, Grid((5, 7), PLANE))
    read, grid = read_map_on_grid(path)
    assert read.shape == (5, 7) and read.dtype == np.float32
    np.testing.assert_array_equal(read, values)
    assert grid.shape == (5, 7)
    assert grid.voxel_size == pytest.approx((0.7, 0.8))
    np.testing.assert_allclose(grid.affine, PLANE)
    assert map_grid(path).voxel_size == pytest.approx((0.7, 0.8))


def test_a_3d_map_reads_back_with_its_values_and_affine(tmp_path):
    values = np.random.default_rng(4).random((4, 5, 6)).astype(np.float32)
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    path = write_map(tmp_path / "group_AD", values, Grid((4, 5, 6), affine))
    assert nib.load(path).shape == (4, 5, 6)
    read, grid = read_map_on_grid(path)
    np.testing.assert_array_equal(read, values)
    assert grid.shape == (4, 5, 6) and grid.voxel_size == pytest.approx((1.5, 1.5, 1.5))
    np.testing.assert_allclose(grid.affine, affine)


def test_a_map_keeps_its_nan_voxels_an_input_image_may_not(tmp_path):
    from voxplain.data.images import ImageError, read_image

    values = np.ones((4, 5, 6), np.float32)
    values[0] = np.nan  # a T-map's untested voxels
    path = write_map(tmp_path / "one-sample_AD_T", values, Grid((4, 5, 6), np.eye(4)))
    assert np.isnan(read_map(path)[0]).all() and np.isfinite(read_map(path)[1:]).all()
    with pytest.raises(ImageError, match="30 voxels are NaN or Inf"):
        read_image(path)


def test_a_3x3_affine_of_a_2d_image_is_written_as_its_4x4_nifti_affine(tmp_path):
    plane = np.array([[0.5, 0.0, 10.0], [0.0, 0.25, -3.0], [0.0, 0.0, 1.0]])
    path = save_map(tmp_path / "map", plane_map((3, 4)), plane)
    np.testing.assert_allclose(nib.load(path).affine, [[0.5, 0, 0, 10], [0, 0.25, 0, -3],
                                                       [0, 0, 1, 0], [0, 0, 0, 1]])
    grid = Grid((3, 4), plane)
    assert grid.affine.shape == (4, 4) and grid.voxel_size == pytest.approx((0.5, 0.25))


def test_an_affine_that_is_neither_3x3_nor_4x4_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"got \(2, 2\)"):
        save_map(tmp_path / "map", plane_map((3, 4)), np.eye(2))


def test_a_map_shaped_unlike_its_grid_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"map of shape \(5, 7\) on a grid of shape \(7, 5\)"):
        write_map(tmp_path / "map", plane_map(), Grid((7, 5), PLANE))


def test_an_npy_map_of_an_earlier_version_is_still_read_on_1_mm_pixels(tmp_path):
    values = plane_map()
    np.save(tmp_path / "sub-01_ses-M00.npy", values)
    read, grid = read_map_on_grid(tmp_path / "sub-01_ses-M00.npy")
    np.testing.assert_array_equal(read, values)
    assert grid.shape == (5, 7) and grid.voxel_size == (1.0, 1.0)
    np.testing.assert_array_equal(read_map(tmp_path / "sub-01_ses-M00.npy"), values)


def test_group_maps_lists_old_npy_and_new_nifti_maps_once_each_nifti_first(tmp_path):
    run = RunFolder(tmp_path)
    old = run.explanation_dir("saliency", 0, 0)
    new = run.explanation_dir("saliency", 1, 0)
    old.mkdir(parents=True)
    np.save(old / "group_AD.npy", plane_map())
    (old / "group_AD.png").write_bytes(b"preview")
    for folder in (old, new):  # fold 0 was resumed: it holds both files of AD
        write_map(folder / "group_CN", plane_map(), Grid((5, 7), PLANE))
    write_map(old / "group_AD", plane_map(), Grid((5, 7), PLANE))
    table = group_maps(run, "saliency")
    assert table[["fold", "diagnosis"]].to_numpy().tolist() == [[0, "AD"], [0, "CN"], [1, "CN"]]
    assert all(path.endswith(".nii.gz") for path in table.path)
