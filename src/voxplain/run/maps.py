"""The maps of a run folder, as the evaluation steps read them (layout: :mod:`voxplain.run`).

A *method* names where maps come from: ``mask`` (meaningful-perturbation masks, paper 1) or an
attribution method that wrote ``explanations/METHOD/``:

- session maps: ``masks/session/fold-K/run-R/index.tsv`` or
  ``explanations/METHOD/fold-K/run-R/index.tsv``, one row per map file;
- group maps: ``masks/group/fold-K/run-R/mask.nii.gz`` (its diagnosis in ``summary.json``) or
  ``explanations/METHOD/fold-K/run-R/group_<DIAGNOSIS>.nii.gz``;
- grid masks: ``masks/grid/l1-A_l2-B_b1-C_b2-D/fold-K/run-R/mask.nii.gz``, the setting ending
  with ``_lr-E`` when the learning rate is not the ``[mask_grid]`` one;
- another cohort's maps (the run's models applied to it): masks under
  ``masks/cohort-LABEL/{group,session}`` (``cohort=LABEL`` below), explanations under their
  own key ``explanations/METHOD..._cohort-LABEL`` (:func:`cohort_methods`).

For a mask ``m`` the quantity compared and tested is what it hides, ``1 - m``
(:func:`evidence`); an attribution map is used as it is.

Map files are NIfTI (``.nii.gz``) with their grid's affine, 2D maps too: an ``(H, W)`` map is
stored as one slice ``(H, W, 1)`` whose affine holds the image's pixel spacing
(:func:`voxplain.io.save_nifti`), so a viewer shows it at its size in mm. Run folders written
before that hold 2D maps as ``.npy`` (no grid: 1 mm pixels); :func:`read_map` reads both.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.config import MaskConfig
from voxplain.data.grid import Grid
from voxplain.data.images import read_header, read_image
from voxplain.io import read_tsv, save_map
from voxplain.run.folder import RunFolder, fold_run_files, mask_level

log = logging.getLogger("voxplain")

MASK = "mask"
SESSION_COLUMNS = ["participant_id", "session_id", "diagnosis", "fold", "run", "path", "flagged"]
GROUP_COLUMNS = ["fold", "run", "diagnosis", "path", "flagged"]
GRID_PARAMETERS = ("l1", "l2", "b1", "b2")
_GRID_SETTING = re.compile(r"^l1-(?P<l1>[^_]+)_l2-(?P<l2>[^_]+)_b1-(?P<b1>[^_]+)_b2-(?P<b2>[^_]+)"
                           r"(?:_lr-(?P<learning_rate>[^_]+))?$")


def map_kind(method: str) -> str:
    """``"mask"`` for masks, ``"attribution"`` for any other method."""
    return "mask" if method == MASK else "attribution"


def method_root(run: RunFolder, method: str) -> Path:
    """Folder of a method's maps: ``masks`` or ``explanations/METHOD``."""
    return run.masks_dir if method == MASK else run.explanation_dir(method)


def cohort_methods(run: RunFolder, method: str) -> dict[str, str]:
    """The maps of ``method`` on other cohorts: ``{label: method}`` for a mask (when
    ``masks/cohort-LABEL/`` exists), ``{label: KEY}`` for every explanation key
    ``METHOD_cohort-LABEL`` (``voxplain explain --cohort``)."""
    if method == MASK:
        return {label: MASK for label in run.external_cohorts()}
    marker = f"{method}_cohort-"
    return {key.removeprefix(marker): key for key in explanation_methods(run)
            if key.startswith(marker)}


def explanation_methods(run: RunFolder) -> list[str]:
    """Attribution methods with at least one map folder under ``explanations/``."""
    root = run.explanations_dir
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def available_methods(run: RunFolder) -> list[str]:
    """``mask`` when the folder holds masks, then every explanation method."""
    has_masks = any((run.masks_dir / level).is_dir() for level in ("group", "session", "grid"))
    return ([MASK] if has_masks else []) + explanation_methods(run)


def session_maps(run: RunFolder, method: str, cohort: str | None = None) -> pd.DataFrame:
    """Every session map of ``method``: ``participant_id, session_id, diagnosis, fold, run,
    path`` (absolute), ``flagged`` (session masks flagged as not converged by
    :func:`~voxplain.steps.masks.run_session_masks`; False where the index has no flag), in
    fold, run, subject, session order; empty when there is none.

    A diagnosis missing from an index is taken from the run's ``cohort.tsv``. ``cohort``: the
    label of another cohort whose session masks to read.
    """
    root = method_root(run, method) / (mask_level("session", cohort) if method == MASK else "")
    tables = []
    for fold, run_index, index in fold_run_files(root, "index.tsv"):
        table = read_tsv(index)
        missing = {"participant_id", "session_id"} - set(table.columns)
        if missing:
            raise ValueError(f"{index}: needs columns participant_id and session_id; "
                             f"missing {sorted(missing)}")
        if "path" not in table.columns:
            table["path"] = table.participant_id + "_" + table.session_id + ".nii.gz"
        table["path"] = [str(index.parent / path) for path in table.path]
        flagged = table["flagged"] if "flagged" in table.columns else False
        tables.append(table.assign(fold=fold, run=run_index, flagged=flagged))
    if not tables:
        return pd.DataFrame(columns=SESSION_COLUMNS)
    table = pd.concat(tables, ignore_index=True)
    if "diagnosis" not in table.columns or table.diagnosis.isna().any():
        table = _with_cohort_diagnosis(run, table.drop(columns="diagnosis", errors="ignore"))
    return table[SESSION_COLUMNS].sort_values(["fold", "run", "participant_id", "session_id"],
                                               ignore_index=True)


def converged_session_maps(run: RunFolder, method: str, include_flagged: bool = False,
                           cohort: str | None = None) -> pd.DataFrame:
    """:func:`session_maps` without the masks flagged as not converged (unless
    ``include_flagged``), with a logged message naming what is left out."""
    table = session_maps(run, method, cohort)
    flagged = table.flagged.astype(bool)
    if include_flagged or not flagged.any():
        return table
    log.warning("%s: %d session map(s) flagged as not converged left out (%s; keep them with "
                "--include-flagged)", method, int(flagged.sum()), ", ".join(
                    f"fold-{f} {p}_{s}" for f, p, s in
                    table.loc[flagged, ["fold", "participant_id", "session_id"]].itertuples(index=False)))
    return table[~flagged].reset_index(drop=True)


def group_maps(run: RunFolder, method: str, include_flagged: bool = True,
               cohort: str | None = None) -> pd.DataFrame:
    """Every group map of ``method``: ``fold, run, diagnosis, path, flagged`` (empty when none).

    ``flagged``: a group mask whose ``summary.json`` flags it (see
    :func:`voxplain.steps.masks.flag_group_masks`); left out, with a message naming it,
    unless ``include_flagged``. Explanation group maps are never flagged here. ``cohort``: the
    label of another cohort whose group masks to read (masks only)."""
    rows = []
    if method == MASK:
        for fold, run_index, path in fold_run_files(run.masks_dir / mask_level("group", cohort),
                                                    "mask.nii.gz"):
            summary = _summary(path.parent)
            rows.append((fold, run_index, summary.get("diagnosis", ""), str(path),
                         bool(summary.get("flagged", False))))
    else:
        root = method_root(run, method)
        found = {}  # not the .png previews of 2D maps; .npy: an earlier version's 2D maps
        for suffix in (".npy", ".nii.gz"):  # NIfTI wins where a resumed folder has both
            for fold, run_index, path in fold_run_files(root, f"group_*{suffix}"):
                diagnosis = path.name.removeprefix("group_").removesuffix(suffix)
                found[fold, run_index, diagnosis] = path
        rows = [(fold, run_index, diagnosis, str(path), False)
                for (fold, run_index, diagnosis), path in sorted(found.items())]
    return _without_flagged(pd.DataFrame(rows, columns=GROUP_COLUMNS), include_flagged,
                            f"{method} group maps")


def _summary(folder: Path) -> dict:
    """A group mask's ``summary.json`` (empty when it has none)."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _without_flagged(table: pd.DataFrame, include_flagged: bool, what: str) -> pd.DataFrame:
    flagged = table.flagged.astype(bool)
    if include_flagged or not flagged.any():
        return table
    log.warning("%s: %d flagged mask(s) left out (%s; keep them with --include-flagged)", what,
                int(flagged.sum()), ", ".join(table.path[flagged]))
    return table[~flagged].reset_index(drop=True)


def grid_masks(run: RunFolder, include_flagged: bool = True) -> pd.DataFrame:
    """Group masks of the hyperparameter grid: ``l1, l2, b1, b2, learning_rate, fold, run,
    path, flagged`` (flagged masks left out unless ``include_flagged``, as in
    :func:`group_maps`). A setting without ``_lr-E`` used the ``[mask_grid]`` learning rate."""
    recorded = run.read_config().get("mask_grid", {}).get("mask", {})
    default_rate = recorded.get("learning_rate", MaskConfig.model_fields["learning_rate"].default)
    rows = []
    found = [(folder.name, *entry) for folder in sorted((run.masks_dir / "grid").glob("*/"))
             for entry in fold_run_files(folder, "mask.nii.gz")]
    for setting, fold, run_index, path in found:
        match = _GRID_SETTING.match(setting)
        if match is None:
            raise ValueError(f"{path}: grid setting {setting!r} is not l1-A_l2-B_b1-C_b2-D "
                             "(optionally _lr-E)")
        values = {k: float(v) for k, v in match.groupdict(str(default_rate)).items()}
        rows.append({**values, "fold": fold,
                     "run": run_index, "path": str(path),
                     "flagged": bool(_summary(path.parent).get("flagged", False))})
    return _without_flagged(pd.DataFrame(rows, columns=[*GRID_PARAMETERS, "learning_rate", "fold",
                                                        "run", "path", "flagged"]),
                            include_flagged, "grid masks")


def read_map(path: str | Path) -> np.ndarray:
    """A map file as a float32 array, ``(X, Y, Z)`` for a volume, ``(H, W)`` for an image
    (:func:`read_map_on_grid`)."""
    return read_map_on_grid(path)[0]


def read_map_on_grid(path: str | Path) -> tuple[np.ndarray, Grid]:
    """A map file as a ``(*spatial)`` float32 array and its grid (shape and affine).

    NIfTI: a volume, or a 2D map ``(H, W)`` stored as ``(H, W, 1)`` (its grid is 2D, with the
    pixel spacing of the header); NPY (2D maps of earlier versions): ``(H, W)`` on 1 mm pixels.
    NaN values are kept: a map may have voxels without a value (a T-map's untested voxels).
    """
    array, affine = read_image(Path(path), finite=False)
    if array.shape[0] != 1:
        raise ValueError(f"{path}: a map has one channel, got shape {array.shape}")
    return array[0], Grid(tuple(array.shape[1:]), affine)


def map_grid(path: str | Path) -> Grid:
    """The grid (shape and affine) of a map file, from its header (no voxel data decoded)."""
    shape, affine = read_header(Path(path))
    if shape[0] != 1:
        raise ValueError(f"{path}: a map has one channel, got shape {shape}")
    return Grid(tuple(shape[1:]), affine)


def write_map(stem: str | Path, values: np.ndarray, grid: Grid) -> Path:
    """Write a map on ``grid`` (atomically) as ``STEM.nii.gz`` with the grid's affine: a volume
    ``(X, Y, Z)``, or an image ``(H, W)`` as one slice ``(H, W, 1)`` whose header holds the pixel
    spacing (:func:`voxplain.io.save_map`). Returns the path written.

    Raises:
        ValueError: ``values`` is not shaped like the grid.
    """
    if tuple(np.shape(values)) != tuple(grid.shape):
        raise ValueError(f"{stem}: map of shape {np.shape(values)} on a grid of shape "
                         f"{tuple(grid.shape)}")
    return save_map(stem, values, grid.affine)


def evidence(values: np.ndarray, method: str) -> np.ndarray:
    """What a map shows: ``1 - m`` for a mask ``m``, the map itself for an attribution."""
    return 1.0 - values if method == MASK else values


def _with_cohort_diagnosis(run: RunFolder, table: pd.DataFrame) -> pd.DataFrame:
    if not run.cohort_file.is_file():
        raise ValueError(f"{run.root}: an index lacks diagnoses and there is no cohort.tsv")
    cohort = read_tsv(run.cohort_file)[["participant_id", "session_id", "diagnosis"]]
    merged = table.merge(cohort, on=["participant_id", "session_id"], how="left")
    unknown = merged[merged.diagnosis.isna()]
    if not unknown.empty:
        first = unknown.iloc[0]
        raise ValueError(f"{run.cohort_file}: no diagnosis for {first.participant_id} "
                         f"{first.session_id} ({len(unknown)} session(s) in all)")
    return merged
