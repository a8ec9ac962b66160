"""The maps of a run folder, as the evaluation steps read them (layout: :mod:`voxplain.run`).

A *method* names where maps come from: ``mask`` (meaningful-perturbation masks, paper 1) or an
attribution method that wrote ``explanations/METHOD/``:

- session maps: ``masks/session/fold-K/run-R/index.tsv`` or
  ``explanations/METHOD/fold-K/run-R/index.tsv``, one row per map file;
- group maps: ``masks/group/fold-K/run-R/mask.nii.gz`` (its diagnosis in ``summary.json``) or
  ``explanations/METHOD/fold-K/run-R/group_<DIAGNOSIS>.nii.gz``;
- grid masks: ``masks/grid/l1-A_l2-B_b1-C_b2-D/fold-K/run-R/mask.nii.gz``.

For a mask ``m`` the quantity compared and tested is what it hides, ``1 - m``
(:func:`evidence`); an attribution map is used as it is.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.data.grid import Grid
from voxplain.data.images import read_image
from voxplain.io import read_tsv
from voxplain.run import RunFolder

log = logging.getLogger("voxplain")

MASK = "mask"
SESSION_COLUMNS = ["participant_id", "session_id", "diagnosis", "fold", "run", "path", "flagged"]
GROUP_COLUMNS = ["fold", "run", "diagnosis", "path", "flagged"]
GRID_PARAMETERS = ("l1", "l2", "b1", "b2")
_GRID_SETTING = re.compile(r"^l1-(?P<l1>[^_]+)_l2-(?P<l2>[^_]+)_b1-(?P<b1>[^_]+)_b2-(?P<b2>[^_]+)$")
_FOLD_RUN = re.compile(r"^fold-(\d+)/run-(\d+)$")


def map_kind(method: str) -> str:
    """``"mask"`` for masks, ``"attribution"`` for any other method."""
    return "mask" if method == MASK else "attribution"


def method_root(run: RunFolder, method: str) -> Path:
    """Folder of a method's maps: ``masks`` or ``explanations/METHOD``."""
    return run.root / "masks" if method == MASK else run.root / "explanations" / method


def explanation_methods(run: RunFolder) -> list[str]:
    """Attribution methods with at least one map folder under ``explanations/``."""
    root = run.root / "explanations"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def available_methods(run: RunFolder) -> list[str]:
    """``mask`` when the folder holds masks, then every explanation method."""
    has_masks = any((run.root / "masks" / level).is_dir() for level in ("group", "session", "grid"))
    return ([MASK] if has_masks else []) + explanation_methods(run)


def session_maps(run: RunFolder, method: str) -> pd.DataFrame:
    """Every session map of ``method``: ``participant_id, session_id, diagnosis, fold, run,
    path`` (absolute), ``flagged`` (session masks flagged as not converged by
    :func:`~voxplain.explain.mask_steps.session_masks`; False where the index has no flag), in
    fold, run, subject, session order; empty when there is none.

    A diagnosis missing from an index is taken from the run's ``cohort.tsv``.
    """
    root = method_root(run, method) / ("session" if method == MASK else "")
    tables = []
    for index in sorted(root.glob("fold-*/run-*/index.tsv")):
        fold, run_index = _fold_run(index.parent, root)
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


def converged_session_maps(run: RunFolder, method: str, include_flagged: bool = False) -> pd.DataFrame:
    """:func:`session_maps` without the masks flagged as not converged (unless
    ``include_flagged``), with a logged message naming what is left out."""
    table = session_maps(run, method)
    flagged = table.flagged.astype(bool)
    if include_flagged or not flagged.any():
        return table
    log.warning("%s: %d session map(s) flagged as not converged left out (%s; keep them with "
                "--include-flagged)", method, int(flagged.sum()), ", ".join(
                    f"fold-{f} {p}_{s}" for f, p, s in
                    table.loc[flagged, ["fold", "participant_id", "session_id"]].itertuples(index=False)))
    return table[~flagged].reset_index(drop=True)


def group_maps(run: RunFolder, method: str, include_flagged: bool = True) -> pd.DataFrame:
    """Every group map of ``method``: ``fold, run, diagnosis, path, flagged`` (empty when none).

    ``flagged``: a group mask whose ``summary.json`` flags it (see
    :func:`voxplain.explain.mask_steps.flag_group_masks`); left out, with a message naming it,
    unless ``include_flagged``. Explanation group maps are never flagged here."""
    rows = []
    if method == MASK:
        root = run.root / "masks" / "group"
        for path in sorted(root.glob("fold-*/run-*/mask.nii.gz")):
            fold, run_index = _fold_run(path.parent, root)
            summary = _summary(path.parent)
            rows.append((fold, run_index, summary.get("diagnosis", ""), str(path),
                         bool(summary.get("flagged", False))))
    else:
        root = method_root(run, method)
        paths = [*root.glob("fold-*/run-*/group_*.nii.gz"), *root.glob("fold-*/run-*/group_*.npy")]
        for path in sorted(paths):  # not the .png previews of 2D maps
            fold, run_index = _fold_run(path.parent, root)
            diagnosis = path.name.removeprefix("group_").split(".")[0]
            rows.append((fold, run_index, diagnosis, str(path), False))
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
    """Group masks of the hyperparameter grid: ``l1, l2, b1, b2, fold, run, path, flagged``
    (flagged masks left out unless ``include_flagged``, as in :func:`group_maps`)."""
    root = run.root / "masks" / "grid"
    rows = []
    for path in sorted(root.glob("*/fold-*/run-*/mask.nii.gz")):
        setting = path.parent.parent.parent.name
        match = _GRID_SETTING.match(setting)
        if match is None:
            raise ValueError(f"{path}: grid setting {setting!r} is not l1-A_l2-B_b1-C_b2-D")
        fold, run_index = _fold_run(path.parent, root / setting)
        rows.append({**{k: float(v) for k, v in match.groupdict().items()}, "fold": fold,
                     "run": run_index, "path": str(path),
                     "flagged": bool(_summary(path.parent).get("flagged", False))})
    return _without_flagged(pd.DataFrame(rows, columns=[*GRID_PARAMETERS, "fold", "run", "path",
                                                        "flagged"]),
                            include_flagged, "grid masks")


def read_map(path: str | Path) -> np.ndarray:
    """A map file (NIfTI volume or NPY image) as a ``(*spatial)`` float32 array."""
    array, _ = read_image(Path(path))
    if array.shape[0] != 1:
        raise ValueError(f"{path}: a map has one channel, got shape {array.shape}")
    return array[0]


def map_grid(path: str | Path) -> Grid:
    """The grid (shape and affine) of a map file."""
    array, affine = read_image(Path(path))
    return Grid(tuple(array.shape[1:]), affine)


def evidence(values: np.ndarray, method: str) -> np.ndarray:
    """What a map shows: ``1 - m`` for a mask ``m``, the map itself for an attribution."""
    return 1.0 - values if method == MASK else values


def _fold_run(folder: Path, root: Path) -> tuple[int, int]:
    match = _FOLD_RUN.match(folder.relative_to(root).as_posix())
    if match is None:
        raise ValueError(f"{folder}: expected a fold-K/run-R folder")
    return int(match.group(1)), int(match.group(2))


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
