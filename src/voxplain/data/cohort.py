"""A cohort: one row per session (participant, session, diagnosis, image path), checked.

Sources: a ``cohort.tsv`` (``participant_id``, ``session_id``, a diagnosis column, ``path``
absolute or relative to the TSV; optional ``age``, ``sex``, ...) or a Clinica CAPS folder plus a
TSV without ``path``. Identifiers are BIDS labels (``sub-`` or ``ses-`` then letters and digits),
because they become file names; :func:`bids_ids` maps other source ids. Diagnoses are read
literally (``NA`` is a label, only an empty cell is missing) and stripped of surrounding
whitespace; two spellings of one label (``AD``/``ad``) are refused. Every image is checked before
any work starts: readable, right dimensionality, the same shape and affine as the majority of the
cohort, one intensity unit per 2D cohort; values are checked (finite) when decoded. The quality
check of paper 1 (section 2.3.1) rejects GM maps whose maximum is below 0.95.

Pixel spacing. NIfTI and DICOM images carry their own; NPY and PNG/JPEG images hold none, so
their spacing is 1 mm unless the TSV gives it in the optional columns ``pixel_spacing_row`` and
``pixel_spacing_col`` (mm, DICOM's ``PixelSpacing`` order: between rows, between columns;
:data:`PIXEL_SPACING_COLUMNS`), as lesion cohorts on CT backgrounds do. The spacing enters the
cohort's affine, hence the training grid and every map's NIfTI header.

Several sequences per session (paper 2: T1, T2 and FLAIR). With ``sequences`` (names of TSV
columns, each holding one image per session, paths as in ``path``), the images of a session are
stacked as channels in that order; every sequence must be on the cohort's grid (same shape and
affine), otherwise the error names the file. ``path`` then holds the first sequence.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voxplain.data.grid import downsample, downsample_affine
from voxplain.data.images import (
    ImageError,
    image_kind,
    npy_value_range,
    pixel_spacing_affine,
    read_header,
    read_image,
)
from voxplain.io import atomic_path, read_tsv

ID_COLUMNS = ("participant_id", "session_id")

#: BIDS label prefix of each identifier column; the rest of the label is letters and digits.
ID_PREFIXES = {"participant_id": "sub-", "session_id": "ses-"}

#: Largest difference (mm) between two affines of one grid.
AFFINE_TOLERANCE = 1e-4

#: Optional columns of a cohort TSV: pixel spacing (mm) of 2D images whose files hold none (NPY,
#: PNG/JPEG), between rows and between columns (the order of DICOM's ``PixelSpacing``).
PIXEL_SPACING_COLUMNS = ("pixel_spacing_row", "pixel_spacing_col")
#: Image kinds (:func:`voxplain.data.images.image_kind`) that hold no pixel spacing of their own.
SPACELESS_KINDS = ("npy", "picture")

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
        image_shape: ``(C, *spatial)`` of every image (all sequences' channels together).
        affine: voxel-to-world affine (mm) shared by every image.
        sequences: TSV columns whose images are the channels, in order (empty: ``path``).
    """

    table: pd.DataFrame
    source: Path
    image_shape: tuple[int, ...]
    affine: np.ndarray
    sequences: tuple[str, ...] = ()

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
        sequences: Sequence[str] | None = None,
    ) -> Cohort:
        """Read and check a cohort TSV (paths in a ``path`` column, or found in ``caps``, or in
        the ``sequences`` columns, stacked as channels)."""
        tsv = Path(tsv)
        sequences = tuple(sequences or ())
        table = read_cohort_table(tsv, diagnosis_column, caps, caps_group, sequences)
        check_intensity_units(table)
        image_shape, affine = check_images(table)
        for column in sequences[1:]:
            image_shape = _same_grid(table, column, sequences[0], image_shape, affine)
        return cls(table, tsv, image_shape, affine, sequences)

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


def class_counts(table: pd.DataFrame, classes: Sequence[str] | None = None) -> dict[str, int]:
    """Sessions per class, in class order (``classes``, or :func:`class_names` of the table).

    A class of ``classes`` without sessions counts 0; print this before training to see a typo
    that became a class of its own, or a class that is missing.
    """
    counts = table["diagnosis"].value_counts()
    order = class_names(table["diagnosis"]) if classes is None else classes
    return {name: int(counts.get(name, 0)) for name in order}


def bids_ids(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose ``participant_id``/``session_id`` are BIDS labels.

    Each source id loses a leading ``sub-``/``ses-`` and every character that is not a letter or
    a digit, then gets the prefix back: ``002_S_0295`` -> ``sub-002S0295``, ``M06`` -> ``ses-M06``,
    ``sub-01`` stays ``sub-01``. The source ids are kept in ``source_participant_id`` and
    ``source_session_id`` (unless those columns exist already, from an earlier mapping).

    Raises:
        CohortError: a source id with no letter or digit, or two source ids that map to one label.
    """
    mapped = table.copy()
    for column, prefix in ID_PREFIXES.items():
        labels = _bids_labels(table[column].astype(str), column, prefix)
        source = f"source_{column}"
        if source not in mapped.columns:
            mapped.insert(mapped.columns.get_loc(column) + 1, source, table[column])
        mapped[column] = labels
    return mapped


def _bids_labels(ids: pd.Series, column: str, prefix: str) -> pd.Series:
    sources: dict[str, str] = {}
    for source in ids.unique():
        label = prefix + re.sub(r"[^A-Za-z0-9]", "", source.removeprefix(prefix))
        if label == prefix:
            raise CohortError(f"{column} {source!r} has no letter or digit to make a BIDS label of")
        if sources.setdefault(label, source) != source:
            raise CohortError(f"{column} {sources[label]!r} and {source!r} both map to {label!r}; "
                              "rename one of them in the source table")
    labels = {source: label for label, source in sources.items()}
    return ids.map(labels)


def read_cohort_table(
    tsv: Path, diagnosis_column: str = "diagnosis", caps: str | Path | None = None,
    caps_group: str | None = None, sequences: Sequence[str] = (),
) -> pd.DataFrame:
    """Read a cohort TSV and resolve image paths (``path``, or each of the ``sequences``
    columns, the first copied to ``path``); errors name the TSV, the column and the row."""
    if not tsv.is_file():
        raise CohortError(f"{tsv}: cohort TSV not found")
    try:
        table = read_tsv(tsv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CohortError(f"{tsv}: not a readable tab-separated table ({error})") from None
    if sequences and caps:
        raise CohortError(f"{tsv}: sequences are read from TSV columns, not from a CAPS folder")
    if len(set(sequences)) != len(sequences):
        raise CohortError(f"{tsv}: sequence columns named twice: {list(sequences)}")
    images = list(sequences) or ([] if caps else ["path"])
    required = [*ID_COLUMNS, diagnosis_column, *images]
    missing = [column for column in required if column not in table.columns]
    if diagnosis_column in missing and diagnosis_column != "diagnosis":
        raise CohortError(f"{tsv}: diagnosis column '{diagnosis_column}' not found; columns are "
                          f"{list(table.columns)}")
    if missing:
        raise CohortError(f"{tsv}: missing required columns {missing}; columns are "
                          f"{list(table.columns)}")
    if table.empty:
        raise CohortError(f"{tsv}: the table has no sessions")
    literal = [*ID_COLUMNS, diagnosis_column, *images]
    table[literal] = _read_literal_columns(tsv, literal)
    table = table.rename(columns={diagnosis_column: "diagnosis"})
    _check_filled(tsv, table)
    table["diagnosis"] = table["diagnosis"].str.strip()
    _check_bids_labels(tsv, table)
    _check_unique_sessions(tsv, table)
    _check_diagnosis_spelling(tsv, table)
    if caps:
        table["path"] = [str(caps_image_path(Path(caps), p, s, caps_group))
                         for p, s in zip(table["participant_id"], table["session_id"])]
    else:
        for column in images:
            table[column] = [str(_resolve(tsv, path, row, column))
                             for row, path in enumerate(table[column])]
        if sequences:
            table["path"] = table[sequences[0]]
    return table.reset_index(drop=True)


def _read_literal_columns(tsv: Path, columns: list[str]) -> pd.DataFrame:
    """``columns`` as written: only an empty cell is missing (``NA``, ``null`` are text)."""
    return pd.read_csv(tsv, sep="\t", usecols=columns, dtype=str, keep_default_na=False,
                       na_values=[""])[columns]


def _check_filled(tsv: Path, table: pd.DataFrame) -> None:
    for column in (*ID_COLUMNS, "diagnosis"):
        empty = table.index[table[column].isna() | (table[column].str.strip() == "")]
        if len(empty):
            raise CohortError(f"{tsv}: row {int(empty[0]) + 2}: empty '{column}'")


def _check_bids_labels(tsv: Path, table: pd.DataFrame) -> None:
    """Identifiers become file names, so ``../x`` or ``a/b`` must never get through."""
    for column, prefix in ID_PREFIXES.items():
        bad = table.index[~table[column].str.fullmatch(f"{prefix}[A-Za-z0-9]+")]
        if len(bad):
            value = table.at[bad[0], column]
            raise CohortError(f"{tsv}: row {int(bad[0]) + 2}: {column} {value!r} is not a BIDS "
                              f"label: '{prefix}' then letters and digits only (e.g. {prefix}01); "
                              "map source ids with voxplain.data.cohort.bids_ids")


def _check_unique_sessions(tsv: Path, table: pd.DataFrame) -> None:
    duplicated = table.duplicated(list(ID_COLUMNS))
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise CohortError(f"{tsv}: session {row.participant_id} {row.session_id} is listed twice")


def _check_diagnosis_spelling(tsv: Path, table: pd.DataFrame) -> None:
    """Two labels that differ only by case or whitespace are one class misspelled, not two."""
    spelling = table["diagnosis"].str.replace(r"\s+", "", regex=True).str.casefold()
    for _, group in table.groupby(spelling, sort=False)["diagnosis"]:
        labels = group.unique()
        if len(labels) > 1:
            first, second = (_label_summary(group, label) for label in labels[:2])
            raise CohortError(f"{tsv}: diagnoses {first} and {second} differ only by case or "
                              "whitespace; write one class one way")


def _label_summary(diagnoses: pd.Series, label: str) -> str:
    rows = diagnoses.index[diagnoses == label]
    return f"{label!r} ({len(rows)} sessions, e.g. row {int(rows[0]) + 2})"


def _resolve(tsv: Path, path: object, row: int, column: str = "path") -> Path:
    if not isinstance(path, str) or not path.strip():
        raise CohortError(f"{tsv}: row {row + 2}: empty '{column}'")
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
    """Check every image header against the cohort's majority; return its ``(C, *spatial)`` and
    affine.

    The most common shape (then, among those images, the most common affine) is the cohort's, so
    the error names the odd image even when it comes first.
    """
    headers = [_header(row) for row in table.itertuples()]
    shapes = Counter(shape for shape, _ in headers)
    shape, shared = shapes.most_common(1)[0]
    for row, (other, _) in zip(table.itertuples(), headers):
        if other != shape:
            raise CohortError(f"{row.participant_id} {row.session_id}: {row.path}: shape "
                              f"{other[1:]} (channels {other[0]}) differs from the cohort's "
                              f"{shape[1:]} (channels {shape[0]}, {shared} of {len(table)} images)")
    affine, shared = _majority_affine([affine for _, affine in headers])
    for row, (_, other) in zip(table.itertuples(), headers):
        if not np.allclose(other, affine, atol=AFFINE_TOLERANCE):
            raise CohortError(f"{row.participant_id} {row.session_id}: {row.path}: affine "
                              f"{_compact(other)} differs from the cohort's {_compact(affine)} "
                              f"({shared} of {len(table)} images)")
    return shape, affine


def _same_grid(table: pd.DataFrame, column: str, first: str, image_shape: tuple[int, ...],
               affine: np.ndarray) -> tuple[int, ...]:
    """The cohort's ``(C, *spatial)`` with ``column``'s channels added, once every image of
    ``column`` is on the grid of the first sequence (the error names the file)."""
    channels = None
    for row in table.itertuples():
        path = getattr(row, column)
        with _session_named(row):
            shape, other = read_header(Path(path))
        if shape[1:] != image_shape[1:] or not np.allclose(other, affine, atol=AFFINE_TOLERANCE):
            raise CohortError(f"{row.participant_id} {row.session_id}: {path}: sequence "
                              f"{column!r} has shape {shape[1:]} and affine {_compact(other)}, "
                              f"not the grid of {first!r} ({image_shape[1:]}, "
                              f"{_compact(affine)}); co-register the sequences")
        if channels is not None and shape[0] != channels:
            raise CohortError(f"{row.participant_id} {row.session_id}: {path}: {shape[0]} "
                              f"channels, other {column!r} images have {channels}")
        channels = shape[0]
    return (image_shape[0] + (channels or 0), *image_shape[1:])


def session_image(row: Any, sequences: Sequence[str] = ()) -> np.ndarray:
    """The image ``(C, *spatial)`` of a cohort row: ``path``, or its ``sequences`` stacked as
    channels in order."""
    with _session_named(row):
        if not sequences:
            return read_image(Path(row.path))[0]
        return np.concatenate([read_image(Path(getattr(row, column)))[0]
                               for column in sequences])


def _header(row: Any) -> tuple[tuple[int, ...], np.ndarray]:
    """``(C, *spatial)`` and affine of a row's image, with the TSV's pixel spacing if any."""
    with _session_named(row):
        shape, affine = read_header(Path(row.path))
        spacing = [getattr(row, column, np.nan) for column in PIXEL_SPACING_COLUMNS]
        if all(pd.isna(size) for size in spacing):
            return shape, affine
        given = ", ".join(f"{c} {v}" for c, v in zip(PIXEL_SPACING_COLUMNS, spacing))
        if image_kind(Path(row.path)) not in SPACELESS_KINDS:
            raise ImageError(f"{row.path}: {given}, but this image carries its own spacing; "
                             "leave the cells empty")
        if any(pd.isna(size) for size in spacing):
            raise ImageError(f"{row.path}: {given}; give both or neither")
        try:
            return shape, pixel_spacing_affine(*(float(size) for size in spacing))
        except (ImageError, ValueError) as error:
            raise ImageError(f"{row.path}: {error}") from None


@contextmanager
def _session_named(row: Any) -> Iterator[None]:
    """An image error of ``row`` becomes a cohort error that starts with the session."""
    try:
        yield
    except ImageError as error:
        raise CohortError(f"{row.participant_id} {row.session_id}: {error}") from None


def _majority_affine(affines: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """The affine shared (within tolerance) by most images, and how many share it."""
    groups: list[list] = []  # [first affine of the group, number of images]
    for affine in affines:
        for group in groups:
            if np.allclose(affine, group[0], atol=AFFINE_TOLERANCE):
                group[1] += 1
                break
        else:
            groups.append([affine, 1])
    affine, shared = max(groups, key=lambda group: group[1])
    return affine, shared


def check_intensity_units(table: pd.DataFrame) -> None:
    """Refuse a 2D cohort whose images come in different intensity units.

    PNG/JPEG pictures are scaled to [0, 1], DICOM images are in the modality's units (e.g. HU),
    NPY images are as stored. Pictures cannot be mixed with DICOM, nor with NPY images whose
    values leave [0, 1]; DICOM with NPY is allowed (NPY may be stored in modality units).
    """
    kinds = [_kind(row) for row in table.itertuples()]
    first: dict[str, Any] = {}
    for row, kind in zip(table.itertuples(), kinds):
        first.setdefault(kind, row)
    if "picture" not in first:
        return
    picture = f"{first['picture'].path} (PNG/JPEG, scaled to [0, 1])"
    if "dicom" in first:
        row = first["dicom"]
        raise CohortError(f"{row.participant_id} {row.session_id}: {row.path}: DICOM in modality "
                          f"units (e.g. HU) in a cohort with pictures such as {picture}; use one "
                          "kind of image")
    for row, kind in zip(table.itertuples(), kinds):
        if kind == "npy":
            _check_unit_range(row, picture)


def _kind(row: Any) -> str:
    with _session_named(row):
        return image_kind(Path(row.path))


def _check_unit_range(row: Any, picture: str) -> None:
    with _session_named(row):
        low, high = npy_value_range(Path(row.path))
    if low < 0 or high > 1:
        raise CohortError(f"{row.participant_id} {row.session_id}: {row.path}: NPY values span "
                          f"[{low:g}, {high:g}], outside the [0, 1] of pictures such as "
                          f"{picture}; rescale the NPY images to [0, 1] or use one kind of image")


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
            image = session_image(row, cohort.sequences)
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
    if cohort.sequences:
        digest.update(f"sequences={','.join(cohort.sequences)}".encode())
    for column in cohort.sequences or ("path",):
        for path in cohort.table[column]:
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
