"""Read one image from disk as ``(C, *spatial)`` float32 plus its voxel-to-world affine.

Volumes are NIfTI (``.nii``, ``.nii.gz``), 3D, one channel. 2D images are NIfTI of shape
``(H, W)`` or ``(H, W, 1)`` (one slice: how 2D maps are written, :func:`voxplain.io.save_nifti`),
NPY (``(H, W)`` or ``(C, H, W)`` of real numbers, as stored), PNG/JPEG (grey or RGB, scaled to
[0, 1]: 8-bit by 255, 16-bit by 65535; palette pictures through their palette) or DICOM (pydicom;
rescaled to the modality's units, e.g. Hounsfield units for CT). Every error names the file and
the problem.

The affine is always ``(4, 4)``; a 2D image's pixel spacing sits on its first two axes. NIfTI and
DICOM (``PixelSpacing``) carry their spacing; NPY and pictures hold none and get 1 mm
(:func:`pixel_spacing_affine`), unless a cohort TSV gives it
(:data:`voxplain.data.cohort.PIXEL_SPACING_COLUMNS`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    import PIL.Image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPY_SUFFIXES = (".npy",)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")

#: PIL modes of 16-bit grey pictures (Pillow < 10.1 reads 16-bit PNGs as "I", later as "I;16").
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")
#: PIL modes of grey pictures (an alpha channel is dropped, as for RGBA).
GREY_MODES = ("1", "L", "LA", "La")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


def image_kind(path: Path) -> str:
    """``"nifti"``, ``"npy"``, ``"picture"`` or ``"dicom"`` from the file name."""
    name = path.name.lower()
    for kind, suffixes in (("nifti", NIFTI_SUFFIXES), ("npy", NPY_SUFFIXES),
                           ("picture", PICTURE_SUFFIXES), ("dicom", DICOM_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    raise ImageError(
        f"{path}: unsupported image format (expected NIfTI .nii/.nii.gz, .npy, .png/.jpg or .dcm)"
    )


def read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(C, *spatial)`` shape and affine of an image, without decoding NIfTI voxel data."""
    path = Path(path)
    if image_kind(path) != "nifti":
        array, affine = read_image(path)
        return array.shape, affine
    image, spatial = _open_nifti(path)
    return (1, *spatial), image.affine


def read_image(path: Path, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image.

    ``finite``: NaN or Inf values are an error (an input image); False for a map, where NaN
    marks voxels without a value (e.g. the untested voxels of a T-map).

    Returns:
        ``(array, affine)``: ``array`` is ``(C, *spatial)`` float32 (``C = 1`` for volumes),
        ``affine`` the 4x4 voxel-to-world matrix in mm (pixel spacing for 2D images).

    Raises:
        ImageError: missing, empty or unreadable file, wrong dimensionality, NaN or Inf values.
    """
    path = Path(path)
    reader = {"nifti": _read_nifti, "npy": _read_npy, "picture": _read_picture,
              "dicom": _read_dicom}[image_kind(path)]
    array, affine = reader(path)
    if finite and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ImageError(f"{path}: {bad} voxels are NaN or Inf")
    return array, affine


def _check_file(path: Path) -> None:
    """A readable, non-empty regular file; otherwise say what the path is instead."""
    try:
        status = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageError(f"{path}: symbolic link to a missing file "
                             f"({os.readlink(path)})") from None
        raise ImageError(f"{path}: file not found") from None
    except OSError as error:  # ELOOP, EACCES on a parent folder, ENOTDIR, ...
        problem = "is a symbolic link loop" if error.errno == errno.ELOOP else "cannot be reached"
        raise ImageError(f"{path}: {problem} ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(status.st_mode):
        raise ImageError(f"{path}: is not a regular file")
    if status.st_size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        path.open("rb").close()
    except OSError as error:
        raise ImageError(f"{path}: file cannot be read ({error.strerror})") from None


def _open_nifti(path: Path) -> tuple[nib.Nifti1Image, tuple[int, ...]]:
    """The NIfTI image (header read, voxel data not decoded) and its spatial shape: trailing
    axes of one voxel after the second are dropped, so ``(X, Y, Z, 1)`` is a volume and
    ``(H, W, 1)`` a 2D image."""
    _check_file(path)
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for corrupt or foreign files
        raise ImageError(f"{path}: not a readable NIfTI file ({error})") from None
    shape = tuple(int(size) for size in image.shape)
    spatial = shape
    while len(spatial) > 2 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) not in (2, 3):
        raise ImageError(f"{path}: expected a 3D volume (or a 2D image, (H, W) or (H, W, 1)), "
                         f"got {len(shape)}D with shape {shape}")
    return image, spatial


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image, spatial = _open_nifti(path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(spatial)
    except Exception as error:  # truncated gzip streams surface as EOFError, zlib.error, ...
        raise ImageError(f"{path}: voxel data cannot be read ({error})") from None
    return data[np.newaxis], image.affine


def _read_npy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _load_npy(path)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise ImageError(f"{path}: expected a 2D image (H, W) or (C, H, W), got shape {data.shape}")
    return data.astype(np.float32), pixel_spacing_affine()


def npy_value_range(path: Path) -> tuple[float, float]:
    """Minimum and maximum of an NPY image, memory-mapped rather than copied."""
    data = _load_npy(Path(path), mmap_mode="r")
    if data.size == 0:
        raise ImageError(f"{path}: the array is empty")
    return float(np.nanmin(data)), float(np.nanmax(data))


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    _check_file(path)
    try:
        data = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as error:
        raise ImageError(f"{path}: not a plain numeric NPY array ({error})") from None
    if data.dtype.kind == "c":
        raise ImageError(f"{path}: complex values ({data.dtype}); save the magnitude or the real "
                         "part explicitly, an image holds real numbers")
    if data.dtype.kind not in "biuf":
        raise ImageError(f"{path}: values of type {data.dtype} are not numbers; an image holds "
                         "real numbers")
    return data


def _read_picture(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    _check_file(path)
    try:
        with Image.open(path) as picture:
            data = _picture_intensities(picture)
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"{path}: not a readable picture ({error})") from None
    return data, pixel_spacing_affine()


def _picture_intensities(picture: PIL.Image.Image) -> np.ndarray:
    """``(C, H, W)`` float32 in [0, 1] of a PIL picture: grey (``C = 1``) or RGB (``C = 3``).

    16-bit pictures are divided by 65535, all others by 255 after conversion to grey or RGB;
    palette pictures (mode ``P``) are converted through their palette, never read as indices.
    """
    if picture.mode in SIXTEEN_BIT_MODES:
        return np.asarray(picture, dtype=np.float32)[np.newaxis] / 65535
    picture = picture.convert("L" if _is_grey(picture) else "RGB")
    data = np.asarray(picture, dtype=np.float32) / 255
    return data[np.newaxis] if data.ndim == 2 else np.moveaxis(data, -1, 0)


def _is_grey(picture: PIL.Image.Image) -> bool:
    if picture.mode == "P":
        palette = np.asarray(picture.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)
        used = palette[np.unique(np.asarray(picture))]
        return bool((used == used[:, :1]).all())
    return picture.mode in GREY_MODES


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    _check_file(path)
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # pydicom raises InvalidDicomError, AttributeError, ...
        raise ImageError(f"{path}: not a readable DICOM image ({error})") from None
    if pixels.ndim != 2:
        raise ImageError(f"{path}: expected a single 2D DICOM frame, got shape {pixels.shape}")
    slope = float(getattr(dataset, "RescaleSlope", 1.0))
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
    row_mm, col_mm = (float(s) for s in getattr(dataset, "PixelSpacing", [1.0, 1.0]))
    try:
        affine = pixel_spacing_affine(row_mm, col_mm)
    except ImageError as error:
        raise ImageError(f"{path}: PixelSpacing: {error}") from None
    return (pixels * slope + intercept)[np.newaxis], affine


def pixel_spacing_affine(row_mm: float = 1.0, col_mm: float = 1.0) -> np.ndarray:
    """The ``(4, 4)`` affine of a 2D image ``(H, W)`` with DICOM's ``PixelSpacing`` order:
    ``row_mm`` between rows (along axis 0), ``col_mm`` between columns (along axis 1); the
    third axis is the unit normal of the plane.

    Raises:
        ImageError: a spacing that is not a positive finite number.
    """
    spacing = (row_mm, col_mm)
    if not all(np.isfinite(size) and size > 0 for size in spacing):
        raise ImageError(f"pixel spacing {spacing} mm: both must be positive numbers")
    return np.diag([float(row_mm), float(col_mm), 1.0, 1.0])
