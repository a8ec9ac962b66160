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
                                summary.json}
      masks/session/fold-K/run-R/{sub-X_ses-Y.nii.gz, index.tsv}
      masks/grid/l1-A_l2-B_b1-C_b2-D/fold-K/run-R/...   (same files as masks/group)
      explanations/KEY/fold-K/run-R/{sub-X_ses-Y.nii.gz, group_<DIAGNOSIS>.nii.gz, index.tsv}
      cyce/fold-K/run-R/{generators.safetensors, generators.json, loss.tsv, transfer.tsv}
      evaluation/{cross_validation.tsv, classification.tsv, localisation.tsv, robustness/}
      stats/METHOD/   report/index.html   predictions/NAME.tsv

Every step reads what earlier steps wrote, skips work already done and writes atomically.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from voxplain.config import TrainConfig, config_values, read_toml, to_toml
from voxplain.io import write_json, write_text

log = logging.getLogger("voxplain")
T = TypeVar("T")
R = TypeVar("R")

RECORDED_PACKAGES = ("voxplain", "torch", "numpy", "scipy", "pandas", "scikit-learn", "nibabel",
                     "nilearn", "captum", "torchmetrics", "safetensors", "pydantic")
#: Settings that may change between a run and its resumption without changing its results
#: (``run`` is the run folder's own path, which changes when the folder is moved or copied).
RESUMABLE_FIELDS = frozenset({"device", "folds", "max_sessions", "run"})


class RunFolderError(ValueError):
    """A run folder that does not match the step asked of it."""


class FoldSkipped(RunFolderError):
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
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def mask_dir(self, level: str, fold: int, run: int) -> Path:
        """``masks/LEVEL/fold-K/run-R`` (LEVEL: group, session, or grid/SETTING)."""
        return self.root / "masks" / level / f"fold-{fold}" / f"run-{run}"

    def cyce_dir(self, fold: int, run: int) -> Path:
        """``cyce/fold-K/run-R``: the CyCE generators trained against that model."""
        return self.root / "cyce" / f"fold-{fold}" / f"run-{run}"

    def split_file(self, fold: int, subset: str) -> Path:
        """``splits/fold-K/SUBSET.tsv`` with SUBSET in train, validation."""
        return self.root / "splits" / f"fold-{fold}" / f"{subset}.tsv"

    def model_dir(self, fold: int, run: int) -> Path:
        """``models/fold-K/run-R``."""
        return self.root / "models" / f"fold-{fold}" / f"run-{run}"

    def model_dirs(self) -> list[tuple[int, int, Path]]:
        """``(fold, run, folder)`` of every finished model, in fold then run order."""
        found = []
        for weights in self.root.glob("models/fold-*/run-*/model.safetensors"):
            folder = weights.parent
            if (folder / "metrics.tsv").is_file():
                fold = int(folder.parent.name.removeprefix("fold-"))
                found.append((fold, int(folder.name.removeprefix("run-")), folder))
        return sorted(found)

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

    def record_config(self, section: str, config: BaseModel) -> None:
        """Store ``config`` as ``[section]`` of config.toml, or check it matches a stored one.

        Resuming a step with other settings would mix two experiments in one folder, so a
        difference (other than :data:`RESUMABLE_FIELDS`) is an error that names the fields.
        """
        sections = self.read_config()
        new = config_values(config)
        if section in sections:
            old = _with_defaults(type(config), sections[section], new)
            changed = sorted(key for key in set(old) | set(new)
                             if key not in RESUMABLE_FIELDS and old.get(key) != new.get(key))
            if changed:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
                raise RunFolderError(f"{self.config_file}: this run folder was made with other "
                                     f"[{section}] settings ({details}); use another folder")
            return
        sections[section] = new
        write_text(self.config_file, to_toml(sections))
        self._record_environment(section)

    def _record_environment(self, section: str) -> None:
        path = self.root / "environment.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record[section] = environment()
        write_json(path, record)


def each_fold(units: Iterable[tuple[int, int, T]], work: Callable[[int, int, T], R],
              step: str) -> list[R]:
    """``work(fold, run, unit)`` for every unit; a unit that raises :class:`FoldSkipped` is named
    in a warning and the others go on. Raises :class:`RunFolderError` when no unit could be
    processed (the message gives every reason)."""
    results, reasons = [], []
    for fold, run, unit in units:
        try:
            results.append(work(fold, run, unit))
        except FoldSkipped as reason:
            log.warning("%s: fold %d run %d skipped: %s", step, fold, run, reason)
            reasons.append(f"fold {fold} run {run}: {reason}")
    if reasons and not results:
        raise RunFolderError(f"{step}: no fold could be processed ({'; '.join(reasons)})")
    return results


def _with_defaults(schema: type[BaseModel], recorded: dict[str, Any],
                   new: dict[str, Any]) -> dict[str, Any]:
    """A recorded section completed with the settings it lacks but ``new`` has (added by a later
    version of voxplain) at their defaults, so that a folder made before a setting existed
    resumes; as recorded when it no longer validates (the comparison then names the
    difference)."""
    try:
        defaults = config_values(schema.model_validate(recorded))
    except ValidationError:
        return recorded
    return _completed(recorded, defaults, new)


def _completed(recorded: dict[str, Any], defaults: dict[str, Any],
               new: dict[str, Any]) -> dict[str, Any]:
    completed = dict(recorded)
    for key, value in new.items():
        if key not in recorded and key in defaults:
            completed[key] = defaults[key]
        elif isinstance(value, dict) and isinstance(recorded.get(key), dict):
            completed[key] = _completed(recorded[key], defaults.get(key, {}), value)
    return completed


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
