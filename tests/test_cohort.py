"""Cohort reading, checks with one-line errors naming the file, caching and quality check."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import AFFINE, SHAPE
from voxplain.data import cohort as cohort_module
from voxplain.data.cohort import (Cohort, CohortError, caps_image_path, class_names, load_images,
                                  quality_check)
from voxplain.data.grid import downsample


def _edit(tsv: Path, session: int, volume: np.ndarray, affine=AFFINE) -> Path:
    table = pd.read_csv(tsv, sep="\t")
    path = tsv.parent / table.path[session]
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def _one_line_error(tsv: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(CohortError) as caught:
        Cohort.from_tsv(tsv, **kwargs)
        load_images(Cohort.from_tsv(tsv, **kwargs))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message, message
    return message


def test_reads_paths_relative_to_the_tsv_and_keeps_extra_columns(cohort_tsv):
    cohort = Cohort.from_tsv(cohort_tsv)
    assert len(cohort) == 24 and cohort.image_shape == (1, *SHAPE)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in cohort.table.path)
    assert "age" in cohort.table and cohort.table.participant_id.iloc[0] == "sub-00"
    np.testing.assert_allclose(cohort.affine, AFFINE)


def test_missing_file_is_named(cohort_tsv):
    (cohort_tsv.parent / "sub-03_ses-M12.nii.gz").unlink()
    _one_line_error(cohort_tsv, "sub-03 ses-M12", "sub-03_ses-M12.nii.gz", "not found")


def test_non_nifti_file_is_named(cohort_tsv):
    (cohort_tsv.parent / "sub-02_ses-M00.nii.gz").write_text("this is not an image")
    _one_line_error(cohort_tsv, "sub-02_ses-M00.nii.gz", "not a readable NIfTI")


def test_unsupported_extension_is_named(cohort_tsv):
    table = pd.read_csv(cohort_tsv, sep="\t")
    table.loc[1, "path"] = "notes.txt"
    (cohort_tsv.parent / "notes.txt").write_text("x")
    table.to_csv(cohort_tsv, sep="\t", index=False)
    _one_line_error(cohort_tsv, "notes.txt", "unsupported image format")


def test_4d_volume_is_refused(cohort_tsv):
    _edit(cohort_tsv, 5, np.ones((*SHAPE, 3), np.float32))
    _one_line_error(cohort_tsv, "sub-02_ses-M12.nii.gz", "expected a 3D volume", "4D")


def test_shape_mismatch_names_both_shapes(cohort_tsv):
    _edit(cohort_tsv, 4, np.ones((20, 24, 18), np.float32))
    _one_line_error(cohort_tsv, "sub-02 ses-M00", "(20, 24, 18)", "(20, 24, 20)")


def test_affine_mismatch_is_refused(cohort_tsv):
    shifted = AFFINE.copy()
    shifted[0, 3] += 3.0
    _edit(cohort_tsv, 7, np.ones(SHAPE, np.float32), shifted)
    _one_line_error(cohort_tsv, "sub-03 ses-M12", "affine [[-6.0,0.0,0.0,93.0]",
                    "differs from the cohort's [[-6.0,0.0,0.0,90.0]")


def test_nan_values_are_refused_when_decoded(cohort_tsv):
    volume = np.ones(SHAPE, np.float32)
    volume[3, 4, 5] = np.nan
    _edit(cohort_tsv, 2, volume)
    cohort = Cohort.from_tsv(cohort_tsv)  # headers are fine
    with pytest.raises(CohortError, match=r"sub-01 ses-M00: .*sub-01_ses-M00.nii.gz: 1 voxels are NaN"):
        load_images(cohort)


def test_unknown_diagnosis_column_lists_the_columns(cohort_tsv):
    message = _one_line_error(cohort_tsv, "diagnosis column 'dx' not found", "participant_id",
                              diagnosis_column="dx")
    assert str(cohort_tsv) in message


def test_tsv_without_required_columns(tmp_path):
    tsv = tmp_path / "bad.tsv"
    pd.DataFrame({"participant_id": ["sub-01"], "diagnosis": ["AD"]}).to_csv(tsv, sep="\t",
                                                                           index=False)
    _one_line_error(tsv, str(tsv), "missing required columns ['session_id', 'path']")


def test_duplicated_session_is_refused(cohort_tsv):
    table = pd.read_csv(cohort_tsv, sep="\t")
    pd.concat([table, table.iloc[[3]]]).to_csv(cohort_tsv, sep="\t", index=False)
    _one_line_error(cohort_tsv, "sub-01 ses-M12 is listed twice")


def test_labels_not_in_classes_are_named(cohort_tsv):
    cohort = Cohort.from_tsv(cohort_tsv)
    with pytest.raises(CohortError, match=r"diagnoses \['AD'\] are not among the classes"):
        cohort.labels(["CN", "MCI"])


def test_class_order_puts_controls_first():
    assert class_names(["AD", "CN", "AD"]) == ["CN", "AD"]
    assert class_names(["malignant", "benign"]) == ["benign", "malignant"]
    assert class_names(["b", "a", "c"]) == ["a", "b", "c"]


def test_quality_check_rejects_maxima_below_threshold():
    maxima = np.array([1.0, 0.94, 0.95, 0.2])
    np.testing.assert_array_equal(quality_check(maxima, 0.95), [True, False, True, False])
    assert quality_check(maxima, None).all()


def test_loaded_images_are_downsampled_block_means_with_native_maxima(cohort_tsv):
    cohort = Cohort.from_tsv(cohort_tsv)
    stack = load_images(cohort, factor=2)
    assert stack.array.shape == (24, 1, 10, 12, 10)
    first = nib.load(cohort.table.path[0]).get_fdata()
    assert stack.array[0, 0, 1, 2, 3] == pytest.approx(first[2:4, 4:6, 6:8].mean(), abs=1e-6)
    assert stack.maxima[0] == pytest.approx(1.0)
    np.testing.assert_allclose(stack.affine[:3, :3], AFFINE[:3, :3] * 2)


def test_disk_cache_decodes_each_file_once(cohort_tsv, tmp_path, monkeypatch):
    cohort = Cohort.from_tsv(cohort_tsv)
    first = load_images(cohort, factor=2, cache_dir=tmp_path / "cache")

    def refuse(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(cohort_module, "read_image", refuse)
    second = load_images(cohort, factor=2, cache_dir=tmp_path / "cache")
    assert isinstance(second.array, np.memmap)
    np.testing.assert_array_equal(first.array, second.array)
    np.testing.assert_array_equal(first.maxima, second.maxima)


def test_disk_cache_is_invalidated_when_a_file_changes(cohort_tsv, tmp_path):
    cohort = Cohort.from_tsv(cohort_tsv)
    load_images(cohort, cache_dir=tmp_path / "cache")
    _edit(cohort_tsv, 0, np.full(SHAPE, 0.25, np.float32))
    again = load_images(Cohort.from_tsv(cohort_tsv), cache_dir=tmp_path / "cache")
    assert again.array[0].max() == pytest.approx(0.25)


def test_caps_gm_maps_are_found_by_clinica_names(tmp_path):
    caps = tmp_path / "caps"
    rows = []
    for subject, diagnosis in (("sub-01", "CN"), ("sub-02", "AD")):
        folder = caps / "subjects" / subject / "ses-M00" / "t1/spm/dartel/group-AD"
        folder.mkdir(parents=True)
        name = f"{subject}_ses-M00_T1w_segm-graymatter_space-Ixi549Space_modulated-off_probability.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), folder / name)
        rows.append({"participant_id": subject, "session_id": "ses-M00", "diagnosis": diagnosis})
    tsv = tmp_path / "participants.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    cohort = Cohort.from_tsv(tsv, caps=caps, caps_group="AD")
    assert cohort.table.path[1].endswith("sub-02_ses-M00_T1w_segm-graymatter_space-Ixi549Space"
                                         "_modulated-off_probability.nii.gz")
    with pytest.raises(CohortError, match="sub-01 ses-M00: expected one GM map .* found nothing"):
        caps_image_path(caps, "sub-01", "ses-M00", group=None)


def test_two_dimensional_images_share_the_cohort_interface(tmp_path):
    from PIL import Image

    rows = []
    for i in range(4):
        image = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64) * (i + 1) / 4
        if i % 2:
            np.save(tmp_path / f"img{i}.npy", image)
            name = f"img{i}.npy"
        else:
            Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / f"img{i}.png")
            name = f"img{i}.png"
        rows.append({"participant_id": f"sub-{i}", "session_id": "ses-M00",
                     "diagnosis": "benign" if i < 2 else "malignant", "path": name})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    cohort = Cohort.from_tsv(tmp_path / "cohort.tsv")
    assert cohort.spatial_dims == 2 and cohort.image_shape == (1, 48, 64)
    stack = load_images(cohort, factor=2)
    assert stack.array.shape == (4, 1, 24, 32)
    assert stack.maxima[3] == pytest.approx(1.0)
    assert stack.maxima[0] == pytest.approx(np.floor(0.25 * 255) / 255, abs=1e-6)  # 8-bit


def test_dicom_slices_are_read_in_modality_units():
    import pydicom
    from pydicom.data import get_testdata_file

    from voxplain.data.images import read_image

    path = Path(get_testdata_file("CT_small.dcm"))
    image, affine = read_image(path)
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_allclose(image[0], expected)
    assert affine[0, 0] == pytest.approx(float(dataset.PixelSpacing[0]))


def test_downsample_keeps_the_mean_of_an_evenly_divided_image():
    rng = np.random.default_rng(1)
    image = rng.random((2, 1, 12, 9, 6))
    small = downsample(image, 3, spatial_dims=3)
    assert small.shape == (2, 1, 4, 3, 2)
    np.testing.assert_allclose(small.mean(axis=(2, 3, 4)), image.mean(axis=(2, 3, 4)), rtol=1e-5)
