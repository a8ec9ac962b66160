"""A cohort: one row per session (participant, session, diagnosis, image path), checked.

Sources: a ``cohort.tsv`` (``participant_id``, ``session_id``, a diagnosis column, ``path``
absolute or relative to the TSV; optional ``age``, ``sex``, ...) or a Clinica CAPS folder plus a
TSV without ``path``. Every image is checked before any work starts: readable, right
dimensionality, the same shape and affine as the cohort's first image; values are checked (finite)
when decoded. The quality check of paper 1 (section 2.3.1) rejects GM maps whose maximum is below
0.95.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.data.grid import downsample, downsample_affine
from voxplain.data.images import ImageError, read_header, read_image
from voxplain.io import atomic_path, read_tsv

ID_COLUMNS = ("participant_id", "session_id")

#: Diagnoses that name a control group; put first in the class order (class index 0).
CONTROL_LABELS = ("CN", "HC", "control", "controls", "benign", "negative")

CAPS_GM_PATTERNS = {
    "segmentation": "t1/spm/segmentation/normalized_space/"
                    "{p}_{s}_T1w_segm-graymatter_space-Ixi549Space_modulated-off_probability.nii*",
    "dartel": "t1/spm/dartel/group-{g}/"
              "{p}_{s}_T1w_segm-graymatter_space-Ixi549Space_modulated-off_probability.nii*",
}

Progress = Callable[[int, int], None]


class CohortError(ValueError):
    """A cohort that cannot be used; the message names the file (and row) and the problem."""


@dataclass(frozen=True)
class Cohort:
    """Checked sessions of one grid.

    Attributes:
        table: one row per session with ``participant_id``, ``session_id``, ``diagnosis``,
            absolute ``path`` and any extra columns of the TSV.
        source: the TSV the cohort was read from.
        image_shape: ``(C, *spatial)`` of every image.
        affine: voxel-to-world affine (mm) shared by every image.
    """

    table: pd.DataFrame
    source: Path
    image_shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.image_shape) - 1

    def __len__(self) -> int:
        return len(self.table)

    @classmethod
    def from_tsv(
        cls,
        tsv: str | Path,
        diagnosis_column: str = "diagnosis",
        caps: str | Path | None = None,
        caps_group: str | None = None,
    ) -> Cohort:
        """Read and check a cohort TSV (paths in a ``path`` column, or found in ``caps``)."""
        tsv = Path(tsv)
        table = read_cohort_table(tsv, diagnosis_column, caps, caps_group)
        image_shape, affine = check_images(table)
        return cls(table, tsv, image_shape, affine)

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """Class index of every session; an error lists diagnoses that are not in ``classes``."""
        return encode_labels(self.table, classes, self.source)


def encode_labels(table: pd.DataFrame, classes: Sequence[str], source: Path) -> np.ndarray:
    """``(N,)`` int64 class index of each row's diagnosis; unknown diagnoses are an error."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(table["diagnosis"]) - set(index))
    if unknown:
        raise CohortError(f"{source}: diagnoses {unknown} are not among the classes {list(classes)}")
    return table["diagnosis"].map(index).to_numpy(dtype=np.int64)


def class_names(diagnoses: Sequence[str]) -> list[str]:
    """Class order from the diagnoses present: sorted, a control label (CN, ...) first."""
    names = sorted(set(diagnoses))
    controls = [name for name in names if name in CONTROL_LABELS]
    return controls + [name for name in names if name not in controls]


def read_cohort_table(
    tsv: Path, diagnosis_column: str = "diagnosis", caps: str | Path | None = None,
    caps_group: str | None = None,
) -> pd.DataFrame:
    """Read a cohort TSV and resolve image paths; errors name the TSV, the column and the row."""
    if not tsv.is_file():
        raise CohortError(f"{tsv}: cohort TSV not found")
    try:
        table = read_tsv(tsv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CohortError(f"{tsv}: not a readable tab-separated table ({error})") from None
    required = [*ID_COLUMNS, diagnosis_column] + ([] if caps else ["path"])
    missing = [column for column in required if column not in table.columns]
    if diagnosis_column in missing and diagnosis_column != "diagnosis":
        raise CohortError(f"{tsv}: diagnosis column '{diagnosis_column}' not found; columns are "
                          f"{list(table.columns)}")
    if missing:
        raise CohortError(f"{tsv}: missing required columns {missing}; columns are "
                          f"{list(table.columns)}")
    if table.empty:
        raise CohortError(f"{tsv}: the table has no sessions")
    table = table.rename(columns={diagnosis_column: "diagnosis"})
    table["diagnosis"] = table["diagnosis"].astype(str)
    _check_identifiers(tsv, table)
    if caps:
        table["path"] = [str(caps_image_path(Path(caps), p, s, caps_group))
                         for p, s in zip(table["participant_id"], table["session_id"])]
    else:
        table["path"] = [str(_resolve(tsv, path, row)) for row, path in enumerate(table["path"])]
    return table.reset_index(drop=True)


def _check_identifiers(tsv: Path, table: pd.DataFrame) -> None:
    for column in (*ID_COLUMNS, "diagnosis"):
        empty = table.index[table[column].isna() | (table[column].astype(str).str.strip() == "")]
        if len(empty):
            raise CohortError(f"{tsv}: row {int(empty[0]) + 2}: empty '{column}'")
    duplicated = table.duplicated(list(ID_COLUMNS))
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise CohortError(f"{tsv}: session {row.participant_id} {row.session_id} is listed twice")


def _resolve(tsv: Path, path: object, row: int) -> Path:
    if not isinstance(path, str) or not path.strip():
        raise CohortError(f"{tsv}: row {row + 2}: empty 'path'")
    resolved = Path(path)
    return resolved if resolved.is_absolute() else (tsv.parent / resolved).resolve()


def caps_image_path(caps: Path, participant: str, session: str, group: str | None) -> Path:
    """The t1-volume GM probability map of a session in a Clinica CAPS folder."""
    kind = "dartel" if group else "segmentation"
    pattern = CAPS_GM_PATTERNS[kind].format(p=participant, s=session, g=group)
    folder = caps / "subjects" / participant / session
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        found = "nothing" if not matches else f"{len(matches)} files"
        raise CohortError(f"{caps}: {participant} {session}: expected one GM map "
                          f"{folder / pattern}, found {found}")
    return matches[0]


def check_images(table: pd.DataFrame) -> tuple[tuple[int, ...], np.ndarray]:
    """Check every image header against the first; return the shared ``(C, *spatial)`` and affine."""
    reference_shape: tuple[int, ...] | None = None
    reference_affine = np.eye(4)
    for row in table.itertuples():
        where = f"{row.participant_id} {row.session_id}"
        try:
            shape, affine = read_header(Path(row.path))
        except ImageError as error:
            raise CohortError(f"{where}: {error}") from None
        if reference_shape is None:
            reference_shape, reference_affine = shape, affine
        elif shape != reference_shape:
            raise CohortError(f"{where}: {row.path}: shape {shape[1:]} (channels {shape[0]}) "
                              f"differs from the cohort's {reference_shape[1:]} "
                              f"(channels {reference_shape[0]})")
        elif not np.allclose(affine, reference_affine, atol=1e-4):
            raise CohortError(f"{where}: {row.path}: affine {_compact(affine)} differs from the "
                              f"cohort's {_compact(reference_affine)} (first image "
                              f"{table.path.iloc[0]})")
    assert reference_shape is not None  # the table is never empty here
    return reference_shape, reference_affine


def _compact(affine: np.ndarray) -> str:
    return str(np.round(affine[:3], 3).tolist()).replace(" ", "")


@dataclass(frozen=True)
class ImageStack:
    """Decoded images of a cohort, on the (possibly downsampled) training grid.

    Attributes:
        array: ``(N, C, *spatial)`` float32, in memory or memory-mapped from the disk cache.
        maxima: ``(N,)`` maximum of each image at its native resolution (for quality checks).
        affine: voxel-to-world affine of ``array``'s grid.
    """

    array: np.ndarray
    maxima: np.ndarray
    affine: np.ndarray


def load_images(
    cohort: Cohort, factor: int = 1, cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ImageStack:
    """Decode every image once, downsample it by ``factor`` (block average), keep it.

    With ``cache_dir`` the stack is written once to ``cache_dir/images-KEY.npy`` (KEY hashes the
    paths, file sizes, modification times and factor) and memory-mapped afterwards, so later
    epochs and later commands never decode gzip NIfTI again.
    """
    spatial_dims = cohort.spatial_dims
    affine = downsample_affine(cohort.affine, factor, spatial_dims) if factor > 1 else cohort.affine
    if cache_dir is not None:
        cached = _cache_file(cohort, factor, cache_dir)
        if cached.is_file() and cached.with_suffix(".maxima.npy").is_file():
            return ImageStack(np.load(cached, mmap_mode="r"),
                              np.load(cached.with_suffix(".maxima.npy")), affine)
    first = downsample(np.zeros(cohort.image_shape, np.float32), factor, spatial_dims)
    maxima = np.empty(len(cohort), np.float32)

    def fill(array: np.ndarray) -> None:
        for i, row in enumerate(cohort.table.itertuples()):
            try:
                image, _ = read_image(Path(row.path))
            except ImageError as error:
                raise CohortError(f"{row.participant_id} {row.session_id}: {error}") from None
            maxima[i] = image.max()
            array[i] = downsample(image, factor, spatial_dims)
            if progress:
                progress(i + 1, len(cohort))

    shape = (len(cohort), *first.shape)
    if cache_dir is None:
        array = np.empty(shape, np.float32)
        fill(array)
        return ImageStack(array, maxima, affine)
    with atomic_path(cached) as temporary:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
        fill(array)
        array.flush()
        del array
    np.save(cached.with_suffix(".maxima.npy"), maxima)
    return ImageStack(np.load(cached, mmap_mode="r"), maxima, affine)


def _cache_file(cohort: Cohort, factor: int, cache_dir: Path) -> Path:
    digest = hashlib.sha1(f"factor={factor}".encode())
    for path in cohort.table["path"]:
        stat = Path(path).stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return cache_dir / f"images-{digest.hexdigest()[:16]}.npy"


def quality_check(maxima: np.ndarray, threshold: float | None) -> np.ndarray:
    """``(N,)`` bool: True for images whose maximum reaches ``threshold`` (paper 1, 2.3.1).

    A GM probability map whose maximum is below 0.95 is a failed segmentation; None disables
    the check (e.g. for images that are not probability maps).
    """
    if threshold is None:
        return np.ones(len(maxima), dtype=bool)
    return np.asarray(maxima) >= threshold
