"""The run folder: the contract between steps (like ClinicaDL's MAPS).

::

    RUN/
      config.toml                 one [section] per step, enough to redo the run
      environment.json            Python, platform and package versions of each step
      cohort.tsv                  sessions kept after the quality check (+ max_value)
      qc_rejected.tsv             sessions rejected by the quality check (paper 1, 2.3.1)
      splits/fold-K/{train,validation}.tsv
      models/fold-K/run-R/{model.safetensors, model.json, history.tsv, metrics.tsv,
                           predictions-validation.tsv, predictions-test.tsv}
      masks/group/fold-K/run-R/{mask.nii.gz, loss.tsv, image_losses.tsv, qc_flags.tsv,
                                summary.json, first/ (the mask before QC step 2 removed images),
                                dense/ (a mask that hid most of the image, before its retry)}
      masks/session/fold-K/run-R/{sub-X_ses-Y.nii.gz, index.tsv}
      masks/grid/l1-A_l2-B_b1-C_b2-D[_lr-E]/fold-K/run-R/...   (same files as masks/group)
      masks/cohort-LABEL/{group,session}/...   the run's models on another cohort (--cohort)
      explanations/KEY/fold-K/run-R/{sub-X_ses-Y.nii.gz, group_<DIAGNOSIS>.nii.gz, index.tsv}
      cyce/fold-K/run-R/{generators.safetensors, generators.json, loss.tsv, transfer.tsv}
      evaluation/{cross_validation.tsv, classification.tsv, localisation.tsv, robustness/,
                  randomisation/, cohort-LABEL/{classification.tsv, confusion.tsv}}
      stats/METHOD/   report/index.html   predictions/NAME.tsv
      search/{study.db, trials.tsv, best_train.toml, trial-NNN/}   (a run folder per trial)
      randomisation/data/   a run folder: the models trained again on permuted diagnoses

Every step reads what earlier steps wrote, skips work already done and writes atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pandas as pd
    from rich.progress import Progress

import numpy as np
from pydantic import BaseModel, ValidationError

from voxplain.config import (DEFAULT_MIN_LAYER_SIZE, ExecutorConfig, ExplainConfig, TrainConfig,
                             config_values, is_field, read_toml, to_toml)
from voxplain.data.grid import Grid, downsample_affine, downsampled_shape
from voxplain.data.slicing import SliceView
from voxplain.io import leftover_files, read_tsv, visible, write_json, write_text
from voxplain.run.executor import NoUnitProcessed, Unit, UnitSkipped, map_units

log = logging.getLogger("voxplain")
T = TypeVar("T")
R = TypeVar("R")

RECORDED_PACKAGES = ("voxplain", "torch", "numpy", "scipy", "pandas", "scikit-learn", "nibabel",
                     "nilearn", "captum", "torchmetrics", "safetensors", "pydantic", "monai",
                     "torchio")
#: Settings that may change between a run and its resumption without changing its results
#: (``executor``: where the units run; ``run`` is the run folder's own path, which changes when
#: the folder is moved or copied).
RESUMABLE_FIELDS = frozenset({"device", "executor", "folds", "max_sessions", "run"})


class RunFolderError(ValueError):
    """A run folder that does not match the step asked of it."""


class FoldSkipped(RunFolderError, UnitSkipped):
    """One fold/run cannot serve a step (no trained model, no correctly classified patient):
    the step names it in a warning and goes on with the other folds."""


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run folder; creating the object touches nothing on disk."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def cohort_file(self) -> Path:
        return self.root / "cohort.tsv"

    @property
    def qc_rejected_file(self) -> Path:
        return self.root / "qc_rejected.tsv"

    @property
    def grid_file(self) -> Path:
        """``grid.json``: the grid the models take (spatial shape, channels, affine)."""
        return self.root / "grid.json"

    def training_grid(self) -> tuple[Grid, int]:
        """The grid the models were trained on (after downsampling) and their channels.

        From ``grid.json``; for a run folder written before it existed, from the first image of
        ``cohort.tsv`` and the downsampling factor of ``[train]``.
        """
        if self.grid_file.is_file():
            record = json.loads(self.grid_file.read_text())
            return Grid(tuple(record["shape"]), np.asarray(record["affine"])), record["channels"]
        from voxplain.data.images import read_header  # older run folders only

        train = self.train_config()
        first = read_tsv(self.cohort_file).path.iloc[0]
        shape, affine = read_header(Path(first))
        factor = train.downsample
        spatial = downsampled_shape(shape[1:], factor) if factor > 1 else tuple(shape[1:])
        affine = downsample_affine(affine, factor, len(spatial)) if factor > 1 else affine
        return Grid(tuple(spatial), np.asarray(affine)), shape[0]

    def slice_view(self) -> SliceView | None:
        """The slices a slice model reads (``grid.json``'s ``slices``), None for image models."""
        if not self.grid_file.is_file():
            return None
        record = json.loads(self.grid_file.read_text()).get("slices")
        return None if record is None else SliceView.from_record(record)

    def refuse_slice_models(self, what: str) -> None:
        """Refuse a step that needs models of whole images on a run of slice models."""
        if self.slice_view() is not None:
            raise RunFolderError(f"{self.root}: {what} needs models of whole images; this run's "
                                 "models classify 2D slices of volumes (--slice-axis)")

    def check_training_grid(self, source: str | os.PathLike[str], image_shape: tuple[int, ...],
                            affine: np.ndarray) -> None:
        """Refuse images ``(C, *spatial)`` with ``affine`` (after the run's downsampling) that are
        not on the grid the models were trained on: another shape, other channels, or another
        affine (a flipped axis, a shift, another voxel size: the models would read anatomy at
        the wrong place without any error)."""
        grid, channels = self.training_grid()
        channels_now, spatial = image_shape[0], tuple(image_shape[1:])
        if spatial != tuple(grid.shape) or channels_now != channels:
            raise RunFolderError(f"{source}: images are {spatial} (channels {channels_now}) on "
                                 f"the models' grid; the models of {self.root} take "
                                 f"{tuple(grid.shape)} (channels {channels})")
        if not np.allclose(affine, grid.affine, atol=1e-3):
            raise RunFolderError(
                f"{source}: the images' affine {_compact(affine)} differs from the training "
                f"grid's {_compact(grid.affine)} (flipped, shifted or resampled images are not "
                "in the space the models learned); resample them to the training grid")

    @property
    def search_dir(self) -> Path:
        """``search/``: paper 1's random search (:mod:`voxplain.steps.search`)."""
        return self.root / "search"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def masks_dir(self) -> Path:
        """``masks/``: group, session and grid masks."""
        return self.root / "masks"

    @property
    def explanations_dir(self) -> Path:
        """``explanations/``: one folder per explanation key."""
        return self.root / "explanations"

    @property
    def evaluation_dir(self) -> Path:
        """``evaluation/``: cross-validation, classification, localisation, robustness."""
        return self.root / "evaluation"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def evaluation_file(self, name: str) -> Path:
        """``evaluation/NAME`` (e.g. ``classification.tsv``, ``robustness/summary.tsv``)."""
        return self.evaluation_dir / name

    def stats_dir(self, method: str) -> Path:
        """``stats/METHOD``: heatmap statistics of one method's maps."""
        return self.root / "stats" / method

    def predictions_file(self, cohort: str | os.PathLike[str]) -> Path:
        """``predictions/LABEL.tsv`` with :func:`cohort_label`: two cohorts both called
        ``cohort.tsv`` never write to the same file (and the same cohort always does)."""
        return self.root / "predictions" / f"{cohort_label(cohort)}.tsv"

    def mask_dir(self, level: str, fold: int, run: int) -> Path:
        """``masks/LEVEL/fold-K/run-R`` (LEVEL: group, session, grid/SETTING, or
        cohort-LABEL/group|session: :func:`mask_level`)."""
        return self.masks_dir / level / fold_run(fold, run)

    def external_cohorts(self) -> list[str]:
        """Labels (:func:`cohort_label`) of the other cohorts this folder holds masks of
        (``masks/cohort-LABEL/``), sorted."""
        return sorted(path.name.removeprefix(COHORT_PREFIX)
                      for path in self.masks_dir.glob(f"{COHORT_PREFIX}*/") if path.is_dir())

    def explanation_dir(self, key: str, fold: int | None = None, run: int | None = None) -> Path:
        """``explanations/KEY`` or ``explanations/KEY/fold-K/run-R``."""
        folder = self.explanations_dir / key
        return folder if fold is None else folder / fold_run(fold, run)

    def cyce_dir(self, fold: int, run: int) -> Path:
        """``cyce/fold-K/run-R``: the CyCE generators trained against that model."""
        return self.root / "cyce" / fold_run(fold, run)

    def split_file(self, fold: int, subset: str) -> Path:
        """``splits/fold-K/SUBSET.tsv`` with SUBSET in train, validation."""
        return self.root / "splits" / f"fold-{fold}" / f"{subset}.tsv"

    def read_split(self, fold: int, subset: str) -> "pd.DataFrame":
        """``splits/fold-K/SUBSET.tsv`` (ids as text)."""
        return read_tsv(self.split_file(fold, subset))

    def model_dir(self, fold: int, run: int) -> Path:
        """``models/fold-K/run-R``."""
        return self.root / "models" / fold_run(fold, run)

    def model_dirs(self) -> list[tuple[int, int, Path]]:
        """``(fold, run, folder)`` of every finished model, in fold then run order."""
        return [(fold, run, path.parent) for fold, run, path
                in fold_run_files(self.root / "models", "model.safetensors")
                if (path.parent / "metrics.tsv").is_file()]

    def selected_models(self, folds: list[int] | None) -> list[tuple[int, int, Path]]:
        """``(fold, run, folder)`` of the trained models of ``folds`` (default: every fold of
        ``splits/``). A selected fold/run without a finished model (its training failed or was
        killed) is named in a warning and left out; none at all is an error."""
        found = [(f, r, d) for f, r, d in self.model_dirs() if folds is None or f in folds]
        known = sorted({int(p.name.removeprefix("fold-")) for p in self.root.glob("splits/fold-*")
                        if p.name.removeprefix("fold-").isdigit()})
        wanted = known if folds is None else list(folds)
        missing = [fold for fold in wanted if fold not in {f for f, _, _ in found}]
        if not found:
            raise RunFolderError(f"{self.root}: no trained model for folds "
                                 f"{wanted if folds is not None else 'any'}")
        for fold in missing:
            log.warning("fold %d: no trained model in %s: skipped", fold, self.root / "models")
        return found

    def train_config(self) -> TrainConfig:
        """The ``[train]`` settings; an error when the folder holds no trained run."""
        section = self.read_config().get("train")
        if section is None or not self.model_dirs():
            raise RunFolderError(f"{self.root}: no trained model (run `voxplain train` first)")
        return TrainConfig.model_validate(section)

    def read_config(self) -> dict[str, Any]:
        """All sections of ``config.toml`` (empty when the run folder is new)."""
        return read_toml(self.config_file) if self.config_file.is_file() else {}

    def record_config(self, section: str, config: BaseModel, replace: bool = False) -> None:
        """Store ``config`` as ``[section]`` of config.toml, or check it matches a stored one.

        Resuming a step with other settings would mix two experiments in one folder, so a
        difference (other than the fields that do not change results: the config class's
        ``resumable`` set, default :data:`RESUMABLE_FIELDS`) is an error that names the fields.
        A step that rewrites all its outputs each time (the evaluations) passes ``replace``:
        its section then holds the settings of its latest run. The read-modify-write runs under
        the run folder's lock, so concurrent steps on one run folder never lose each other's
        sections.
        """
        resumable = getattr(type(config), "resumable", RESUMABLE_FIELDS)
        new = config_values(config)
        with self.lock():
            sections = self.read_config()
            if section in sections and replace:
                if sections[section] == new:
                    return
            elif section in sections:
                old = _with_defaults(type(config), sections[section])
                changed = _differences(old, _with_defaults(type(config), new), resumable)
                if changed:
                    raise RunFolderError(f"{self.config_file}: this run folder was made with "
                                         f"other [{section}] settings ({', '.join(changed)}); "
                                         "use another folder")
                return
            sections[section] = new
            for leftover in leftover_files(self.root, recursive=False):  # ours: under the lock
                leftover.unlink(missing_ok=True)
            # the environment first: a kill between the two leaves a section unrecorded, and
            # the next run of the step records both
            self._record_environment(section)
            write_text(self.config_file, to_toml(sections))

    def _record_environment(self, section: str) -> None:
        path = self.root / "environment.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record[section] = environment()
        write_json(path, record)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the run folder's shared records (``config.toml``,
        ``environment.json``, ``summary.json`` flags): an advisory ``flock`` on ``RUN/.lock``,
        held by one step at a time across processes (and threads), released on exit or death."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def inside(self, path: str | os.PathLike[str]) -> Path:
        """``path``, checked to lie inside the run folder (after resolving ``..`` and links);
        a writer must never leave it, whatever an identifier or a label holds."""
        path = Path(path)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise RunFolderError(f"{path}: refusing to write outside the run folder {self.root}")
        return path

    def remove_leftovers(self, folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Delete the temporary files a killed step left under ``folder`` (default: the whole
        run folder): :func:`voxplain.io.atomic_path`'s ``.NAME.XXXXXXXX.ext`` files. Returns
        what was removed."""
        removed = []
        for path in leftover_files(Path(folder) if folder is not None else self.root):
            path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted step (e.g. %s)",
                     len(removed), removed[0])
        return removed


def fold_run(fold: int, run: int) -> str:
    """``fold-K/run-R``: the folder of one model's outputs below any step's folder."""
    return f"fold-{fold}/run-{run}"


_FOLD_RUN = re.compile(r"fold-(\d+)/run-(\d+)")


def parse_fold_run(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(fold, run)`` of a ``.../fold-K/run-R`` folder (or of a file inside one).

    Raises:
        RunFolderError: the path holds no ``fold-K/run-R``.
    """
    found = _FOLD_RUN.findall(Path(folder).as_posix())
    if not found:
        raise RunFolderError(f"{folder}: expected a fold-K/run-R folder")
    fold, run = found[-1]
    return int(fold), int(run)


def fold_run_files(base: str | os.PathLike[str], name: str) -> list[tuple[int, int, Path]]:
    """``(fold, run, path)`` of every ``BASE/fold-K/run-R/NAME`` (NAME may be a glob pattern),
    in fold, run, name order; temporary files of killed steps are left out."""
    found = []
    for path in visible(Path(base).glob(f"fold-*/run-*/{name}")):
        relative = path.relative_to(base).parent.as_posix()
        if _FOLD_RUN.fullmatch(relative):
            found.append((*parse_fold_run(relative), path))
    return sorted(found)


def explanation_key(explain: ExplainConfig, cohort: str | os.PathLike[str] | None = None,
                    reads_layer: bool = False, subset: str = "validation",
                    takes_baseline: bool = False) -> str:
    """Folder name under ``explanations/``: the method, then every setting that changes the
    maps and differs from the default (layer, method options, baseline class, target, group,
    cohort, subset), so that two settings never overwrite each other, e.g.
    ``grad_cam_layer-features.1.0.0``, ``integrated_gradients_n_steps-32_target-predicted``.
    ``reads_layer``: the method reads one layer (a class activation map), so ``min_layer_size``
    changes its maps; ``takes_baseline``: the method takes a baseline, so ``baseline_class``
    changes its maps."""
    key = explain.method
    if explain.layer is not None:
        key += f"_layer-{explain.layer}"
    elif explain.min_layer_size != DEFAULT_MIN_LAYER_SIZE and reads_layer:
        key += f"_min_layer_size-{explain.min_layer_size}"
    key += "".join(f"_{name}-{value}" for name, value in sorted(explain.options.items()))
    if explain.baseline_class is not None and takes_baseline:
        key += f"_baseline_class-{explain.baseline_class}"
    if explain.target != "true":
        key += f"_target-{explain.target}"
    if explain.group != "correct":
        key += f"_group-{explain.group}"
    if cohort is not None:
        key += f"_cohort-{cohort_label(cohort)}"
    elif subset != "validation":
        key += f"_subset-{subset}"
    return key


#: Prefix of the folders holding what a run's models give on another cohort.
COHORT_PREFIX = "cohort-"


def mask_level(level: str, label: str | None = None) -> str:
    """``LEVEL`` (group, session) of the run's own cohort, or ``cohort-LABEL/LEVEL`` for the
    masks of another cohort (``label``: its :func:`cohort_label`)."""
    return level if label is None else f"{COHORT_PREFIX}{label}/{level}"


def cohort_label(cohort: str | os.PathLike[str]) -> str:
    """A file-name label of a cohort TSV that two cohorts never share: its folder, its name and
    8 hex digits of its absolute path (``site-a-cohort-1f3e9a2b``); every generated cohort is
    called ``cohort.tsv``, so the name alone would collide."""
    path = Path(cohort).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    label = f"{path.parent.name}-{path.name.removesuffix('.tsv')}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def _compact(affine: np.ndarray) -> str:
    return str(np.round(np.asarray(affine)[:3], 2).tolist()).replace(" ", "")


def _differences(old: dict[str, Any], new: dict[str, Any], resumable: frozenset[str],
                 prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs, nested sections key by key."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in resumable:
            continue
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _differences(before, after, resumable, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def each_fold(units: Iterable[tuple[int, int, T]], work: Callable[[int, int, T], R],
              step: str) -> list[R]:
    """``work(fold, run, unit)`` for every unit, in this process; a unit that raises
    :class:`FoldSkipped` is named in a warning and the others go on. Raises
    :class:`RunFolderError` when no unit could be processed (the message gives every reason).
    Units that may run elsewhere go through :func:`map_fold_units`."""
    named = (Unit(fold_unit_name(fold, run), (fold, run, unit)) for fold, run, unit in units)
    return map_fold_units(named, lambda argument: work(*argument), ExecutorConfig(), step)


def map_fold_units(units: Iterable[Unit[T]], work: Callable[[T], R], executor: ExecutorConfig,
                   step: str, progress: Progress | None = None) -> list[R]:
    """:func:`~voxplain.run.executor.map_units` of a step over folds: when every unit is
    skipped, a :class:`RunFolderError` that gives every reason."""
    try:
        return map_units(units, work, executor, step, progress)
    except NoUnitProcessed as error:
        raise RunFolderError(f"{step}: no fold could be processed "
                             f"({'; '.join(error.reasons)})") from None


def fold_unit_name(fold: int, run: int) -> str:
    """``fold K run R``: how messages name a fold/run's unit."""
    return f"fold {fold} run {run}"


def session_unit_name(fold: int, run: int, start: int, stop: int) -> str:
    """``fold K run R sessions A-B``: the unit of the sessions at positions ``A`` to ``B``
    (0-based, both included; ``stop`` = B + 1) of a fold/run's sessions."""
    return f"{fold_unit_name(fold, run)} sessions {start}-{stop - 1}"


def _with_defaults(schema: type[BaseModel], recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded section as this version of voxplain reads it, to compare with a new one:
    settings it lacks (added by a later version) at their defaults, settings renamed since
    under their new names, settings removed since (or moved to another step's section, such as
    the localisation scoring of ``[explain_*]``) left out -- they no longer change this step's
    results -- so that a folder made by an earlier version resumes. A setting whose default
    changed what the step computes is read as the earlier version computed it (a section's
    ``absent_in_records``, e.g. a mask without ``smoothness`` was isotropic), so that such a
    folder resumes only with that setting given. As recorded when it does not validate (the
    comparison then names the difference)."""
    known = {key: value for key, value in recorded.items() if is_field(schema, key)}
    try:
        return config_values(schema.model_validate(_absent_as_recorded(schema, known)))
    except ValidationError:
        return recorded


def _absent_as_recorded(schema: type[BaseModel], recorded: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` with the settings it lacks from ``schema.absent_in_records`` (and from that
    of every nested section it holds) at the value an earlier version used."""
    values = {**getattr(schema, "absent_in_records", {}), **recorded}
    for name, field in schema.model_fields.items():
        nested = field.annotation
        if (isinstance(values.get(name), dict) and isinstance(nested, type)
                and issubclass(nested, BaseModel)):
            values[name] = _absent_as_recorded(nested, values[name])
    return values


def environment() -> dict[str, Any]:
    """Python, platform and versions of the packages that shape results."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions}
