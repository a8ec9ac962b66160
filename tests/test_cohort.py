"""Cohort reading, checks with one-line errors naming the file, caching and quality check."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import AFFINE, SHAPE
from voxplain.data import cohort as cohort_module
from voxplain.data.cohort import (Cohort, CohortError, bids_ids, caps_image_path, class_counts,
                                  class_names, load_images, quality_check)
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


def _set(tsv: Path, column: str, values: dict[int, str]) -> None:
    table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    for row, value in values.items():
        table.loc[row, column] = value
    table.to_csv(tsv, sep="\t", index=False)


def test_participant_id_that_is_a_path_is_refused_with_its_row(cohort_tsv):
    _set(cohort_tsv, "participant_id", {1: "../../../../../victim/images/sub-002"})
    message = _one_line_error(cohort_tsv, str(cohort_tsv), "row 3",
                              "participant_id '../../../../../victim/images/sub-002'",
                              "'sub-' then letters and digits only", "bids_ids")
    assert message.startswith(str(cohort_tsv))


def test_session_id_must_be_a_bids_label(cohort_tsv):
    _set(cohort_tsv, "session_id", {4: "M00"})
    _one_line_error(cohort_tsv, "row 6", "session_id 'M00' is not a BIDS label",
                    "'ses-' then letters and digits only")


def test_bids_ids_maps_source_ids_to_labels_and_keeps_the_sources():
    table = pd.DataFrame({"participant_id": ["002_S_0295", "002_S_0295", "sub-01", "../x/sub-2"],
                          "session_id": ["bl", "m06", "ses-M00", "M 12"],
                          "diagnosis": ["AD", "AD", "CN", "CN"]})
    mapped = bids_ids(table)
    assert mapped.participant_id.tolist() == ["sub-002S0295", "sub-002S0295", "sub-01",
                                              "sub-xsub2"]
    assert mapped.session_id.tolist() == ["ses-bl", "ses-m06", "ses-M00", "ses-M12"]
    pd.testing.assert_series_equal(mapped.source_participant_id, table.participant_id,
                                   check_names=False)
    assert list(mapped.columns[:4]) == ["participant_id", "source_participant_id", "session_id",
                                        "source_session_id"]
    pd.testing.assert_frame_equal(bids_ids(mapped), mapped)  # a second mapping changes nothing


def test_bids_ids_refuses_two_source_ids_with_one_label():
    table = pd.DataFrame({"participant_id": ["A-1", "A_1"], "session_id": ["bl", "bl"]})
    with pytest.raises(CohortError, match="participant_id 'A-1' and 'A_1' both map to 'sub-A1'"):
        bids_ids(table)


def test_trailing_spaces_in_diagnoses_keep_the_control_class_first(cohort_tsv):
    table = pd.read_csv(cohort_tsv, sep="\t")
    table["diagnosis"] = table["diagnosis"] + " "
    table.to_csv(cohort_tsv, sep="\t", index=False)
    cohort = Cohort.from_tsv(cohort_tsv)
    assert class_names(cohort.table.diagnosis) == ["CN", "AD"]


def test_diagnoses_differing_only_by_case_are_refused_naming_both(cohort_tsv):
    _set(cohort_tsv, "diagnosis", {3: "ad", 7: "ad"})
    _one_line_error(cohort_tsv, str(cohort_tsv), "'AD' (10 sessions, e.g. row 4)",
                    "'ad' (2 sessions, e.g. row 5)", "differ only by case")


def test_class_counts_lists_every_class_with_its_sessions_in_class_order(cohort_tsv):
    _set(cohort_tsv, "diagnosis", {3: "MCI"})
    cohort = Cohort.from_tsv(cohort_tsv)
    assert class_counts(cohort.table) == {"CN": 12, "AD": 11, "MCI": 1}
    assert class_counts(cohort.table, ["CN", "AD", "FTD"]) == {"CN": 12, "AD": 11, "FTD": 0}


def test_literal_na_is_a_diagnosis_and_only_an_empty_cell_is_missing(cohort_tsv):
    _set(cohort_tsv, "diagnosis", {0: "NA"})
    assert class_counts(Cohort.from_tsv(cohort_tsv).table) == {"CN": 11, "AD": 12, "NA": 1}
    _set(cohort_tsv, "diagnosis", {2: ""})
    _one_line_error(cohort_tsv, "row 4: empty 'diagnosis'")


def test_directory_as_image_path_is_reported_as_a_directory(cohort_tsv):
    path = cohort_tsv.parent / "sub-03_ses-M12.nii.gz"
    path.unlink()
    path.mkdir()
    _one_line_error(cohort_tsv, "sub-03 ses-M12", "sub-03_ses-M12.nii.gz: is a directory")


def test_odd_first_image_is_named_against_the_majority_shape(cohort_tsv):
    _edit(cohort_tsv, 0, np.ones((20, 24, 18), np.float32))
    _one_line_error(cohort_tsv, "sub-00 ses-M00", "(20, 24, 18)", "differs from the cohort's "
                    "(20, 24, 20) (channels 1, 23 of 24 images)")


def test_odd_first_affine_is_named_against_the_majority(cohort_tsv):
    shifted = AFFINE.copy()
    shifted[0, 3] += 3.0
    _edit(cohort_tsv, 0, np.ones(SHAPE, np.float32), shifted)
    _one_line_error(cohort_tsv, "sub-00 ses-M00", "affine [[-6.0,0.0,0.0,93.0]",
                    "differs from the cohort's [[-6.0,0.0,0.0,90.0]", "23 of 24 images")


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


def _picture_cohort(folder: Path, other: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((128, 128), np.uint8)).save(folder / "a.png")
    rows = [{"participant_id": "sub-1", "session_id": "ses-M00", "diagnosis": "CN",
             "path": "a.png"},
            {"participant_id": "sub-2", "session_id": "ses-M00", "diagnosis": "AD",
             "path": str(other)}]
    pd.DataFrame(rows).to_csv(folder / "cohort.tsv", sep="\t", index=False)
    return folder / "cohort.tsv"


def test_pictures_mixed_with_dicom_are_refused_naming_one_of_each(tmp_path):
    from pydicom.data import get_testdata_file

    dicom = Path(get_testdata_file("CT_small.dcm"))
    _one_line_error(_picture_cohort(tmp_path, dicom), "sub-2 ses-M00", str(dicom),
                    "DICOM in modality units", str(tmp_path / "a.png"))


def test_npy_outside_the_unit_range_mixed_with_pictures_is_refused(tmp_path):
    np.save(tmp_path / "b.npy", np.full((128, 128), 255.0, np.float32))
    _one_line_error(_picture_cohort(tmp_path, tmp_path / "b.npy"), "sub-2 ses-M00", "b.npy",
                    "NPY values span [255, 255]", "outside the [0, 1]", str(tmp_path / "a.png"))


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


def _npy_cohort(folder: Path, **columns: list) -> Path:
    """Four NPY images 6x8 in a cohort TSV with extra ``columns``."""
    rows = []
    for i in range(4):
        np.save(folder / f"img{i}.npy", np.full((6, 8), i / 4, np.float32))
        rows.append({"participant_id": f"sub-{i}", "session_id": "ses-M00",
                     "diagnosis": "benign" if i < 2 else "malignant", "path": f"img{i}.npy",
                     **{column: values[i] for column, values in columns.items()}})
    pd.DataFrame(rows).to_csv(folder / "cohort.tsv", sep="\t", index=False)
    return folder / "cohort.tsv"


def test_pixel_spacing_columns_give_npy_images_their_spacing_down_to_the_training_grid(tmp_path):
    tsv = _npy_cohort(tmp_path, pixel_spacing_row=[0.75] * 4, pixel_spacing_col=[0.5] * 4)
    cohort = Cohort.from_tsv(tsv)
    np.testing.assert_allclose(cohort.affine, np.diag([0.75, 0.5, 1.0, 1.0]))
    stack = load_images(cohort, factor=2)
    np.testing.assert_allclose(stack.affine[[0, 1], [0, 1]], [1.5, 1.0])


def test_npy_images_without_spacing_columns_have_1_mm_pixels(tmp_path):
    np.testing.assert_allclose(Cohort.from_tsv(_npy_cohort(tmp_path)).affine, np.eye(4))


def test_a_row_with_another_pixel_spacing_is_named_against_the_majority(tmp_path):
    tsv = _npy_cohort(tmp_path, pixel_spacing_row=[0.75, 0.75, 0.75, 0.8],
                      pixel_spacing_col=[0.75] * 4)
    _one_line_error(tsv, "sub-3 ses-M00", "img3.npy: affine", "3 of 4 images")


@pytest.mark.parametrize(("rows", "cols", "problem"), [
    ([0.75] * 4, [0.75, 0.75, 0.75, None], "give both or neither"),
    ([0.75] * 4, [0.75, 0.75, 0.75, -1.0], "must be positive"),
])
def test_a_pixel_spacing_that_cannot_be_used_names_its_row(tmp_path, rows, cols, problem):
    tsv = _npy_cohort(tmp_path, pixel_spacing_row=rows, pixel_spacing_col=cols)
    _one_line_error(tsv, "sub-3 ses-M00", "img3.npy", problem)


def test_a_pixel_spacing_column_for_an_image_that_carries_its_own_is_refused(cohort_tsv):
    table = pd.read_csv(cohort_tsv, sep="\t")
    table.assign(pixel_spacing_row=1.5, pixel_spacing_col=1.5).to_csv(cohort_tsv, sep="\t",
                                                                      index=False)
    _one_line_error(cohort_tsv, "sub-00 ses-M00", "carries its own spacing")
