"""Atomic writes: a file is either complete or absent, never half written.

Every file of a run folder goes through :func:`atomic_path` (temp file in the same folder, then
``os.replace``), so a killed run leaves nothing that a resumed run would mistake for finished.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)  # keep ".nii.gz" so writers pick the right format
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=suffix,
                                         dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates the file readable by its owner only; give it the mode of a file
        # created the ordinary way so that colleagues and web servers can read run folders
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


#: Names :func:`atomic_path` gives its temporary files: ``.STEM.XXXXXXXX.SUFFIXES`` (mkstemp's
#: 8 random characters).
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.[^.]+)*$")


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path` (left by a killed writer);
    readers skip them."""
    return bool(TEMPORARY_NAME.match(Path(path).name))


def leftover_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The temporary files of :func:`atomic_path` under ``folder`` (recursively, or only in
    ``folder`` itself)."""
    if not folder.is_dir():
        return []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    return sorted(path for path in found if path.is_file() and is_temporary(path))


def visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without the temporary files of interrupted writers, sorted."""
    return sorted(path for path in paths if not is_temporary(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write a JSON file atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_tsv(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """Write a tab-separated table atomically, without the pandas index."""
    with atomic_path(path) as temporary:
        table.to_csv(temporary, sep="\t", index=False)


def read_tsv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a tab-separated table; identifiers stay strings (``sub-001`` is not a number)."""
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str, "session_id": str})


def nifti_affine(affine: np.ndarray) -> np.ndarray:
    """A voxel-to-world affine as NIfTI stores it, ``(4, 4)``.

    A 2D image's affine may come as ``(3, 3)`` (rows, columns, homogeneous): its in-plane
    block and offset are kept and the third axis becomes the unit normal (1 mm), the affine a
    2D map is written with. A ``(4, 4)`` affine is returned as it is.

    Raises:
        ValueError: ``affine`` is neither ``(3, 3)`` nor ``(4, 4)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    if affine.shape != (3, 3):
        raise ValueError(f"an affine is (4, 4), or (3, 3) for a 2D image; got {affine.shape}")
    full = np.eye(4)
    full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
    return full


def save_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray) -> None:
    """Save a 3D ``(X, Y, Z)`` or 2D ``(H, W)`` array as NIfTI with the given affine (float32
    unless integer), atomically.

    A 2D array is stored as one slice, ``(H, W, 1)``: nibabel reads a 2D NIfTI, but nilearn's
    3D functions and plotting (``check_niimg_3d``) refuse it, and ITK-SNAP opens both, so one
    slice is the layout every viewer takes. ``affine`` (``(4, 4)``, or ``(3, 3)`` in 2D,
    :func:`nifti_affine`) carries the pixel spacing on its first two axes.
    """
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: NIfTI maps are 2D (H, W) or 3D (X, Y, Z), got shape "
                         f"{array.shape}")
    data = array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32)
    image = nib.Nifti1Image(data[..., np.newaxis] if data.ndim == 2 else data,
                            nifti_affine(affine))
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        nib.save(image, temporary)


def save_map(stem: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray) -> Path:
    """Save a spatial map, 3D ``(X, Y, Z)`` or 2D ``(H, W)``, as ``STEM.nii.gz`` with ``affine``
    (:func:`save_nifti`: a 2D map is one slice). Returns the path written."""
    path = Path(f"{stem}.nii.gz")
    save_nifti(path, np.asarray(array), affine)
    return path
