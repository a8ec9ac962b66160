"""Mask steps on a run folder: ``voxplain mask group|session|grid`` (paper 1, 2.3).

Each fold/run's model masks images it classifies correctly, of one diagnosis (default: the
patient class, e.g. AD) towards the loss of that class's probability:

- group: the fold's training sessions train the mask, its validation sessions stop it; the
  images that make its loss jump (quality check step 2) are removed and the mask optimised again
  without them (``qc_step2 = "remove"``, the first mask kept in ``first/``) or only flagged;
- session: every session of the fold's validation subjects (never seen in training), one mask
  each, optimised as batches;
- grid: group masks for every combination of l1, l2, b1, b2 and learning rate.

Group and session masks also run on another cohort on the training grid (``cohort``: an
external test cohort, paper 1's AIBL): the run's models mask that cohort's correctly classified
sessions; a group mask is trained on all of them and stopped on the fold's own validation
patients (paper 1, 2.3.3), with patience 25 and at most 300 epochs unless given. They are
written under ``masks/cohort-LABEL/{group,session}`` (:func:`voxplain.run.mask_level`) and
compared with the run's own by ``voxplain evaluate robustness`` (across datasets).

Outputs follow :mod:`voxplain.run`; finished fold/runs are skipped, a group mask interrupted
mid-way resumes from its epoch checkpoint. Each fold/run (of each grid setting) is a unit of
:mod:`voxplain.run.executor` (:class:`FoldMasks`): it runs in this process or as a Ray task
(``executor``), through the same function, which loads the run's context once per process.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from functools import partial
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from voxplain.config import (GroupMaskConfig, GroupMaskStepConfig, MaskConfig, MaskGridConfig,
                             MaskStepConfig, SessionMaskStepConfig)
from voxplain.data.atlas import Atlas
from voxplain.data.classes import patient_class, resolve_target
from voxplain.data.cohort import encode_labels
from voxplain.data.regions import top_regions
from voxplain.explain.masks import (GroupMask, Reference, make_reference, optimise_group_mask,
                                    optimise_session_masks, outliers, qc_flags, robust_z)
from voxplain.explain.perturbation import perturb, target_probability
from voxplain.io import read_tsv, write_json, write_tsv
from voxplain.models.checkpoint import remove_state
from voxplain.models.serialization import read_model_json
from voxplain.run import (FoldSkipped, RunFolder, Unit, cohort_label, fold_run_files,
                          fold_unit_name, map_fold_units, mask_level, session_unit_name)
from voxplain.run.executor import chunk_size, session_chunks, with_absolute_paths
from voxplain.run.maps import write_map
from voxplain.steps.context import (IDS, FoldModel, RunContext, release_contexts,
                                    shared_context)
from voxplain.train.trainer import Dataset, predict_proba

#: A mask step's settings (group, session or grid).
MaskStepT = TypeVar("MaskStepT", GroupMaskStepConfig, SessionMaskStepConfig, MaskGridConfig)
R = TypeVar("R")

log = logging.getLogger("voxplain")


def step_section(name: str, config: MaskStepConfig) -> str:
    """``[name]`` of the run's own cohort, ``[name_cohort-LABEL]`` for another cohort's masks."""
    cohort = getattr(config, "cohort", None)
    return name if cohort is None else f"{name}_cohort-{cohort_label(cohort)}"


def external_context(context: RunContext, config: MaskStepConfig,
                     progress: Progress | None = None) -> RunContext | None:
    """The cohort ``config.cohort`` on the training grid (None when the step masks the run's
    own images)."""
    cohort = getattr(config, "cohort", None)
    if cohort is None:
        return None
    return shared_context(context.run.root, config.device, Path(cohort), progress)


def _mask_step(config: GroupMaskStepConfig | SessionMaskStepConfig, name: str, level: str,
               progress: Progress | None) -> tuple[RunContext, str, list]:
    """What a group or session mask step starts with: the run's cohort loaded (and the settings
    recorded as ``[name]`` or ``[name_cohort-LABEL]``), the step's level (``LEVEL`` or
    ``cohort-LABEL/LEVEL``) and its units, one per fold/run."""
    context = read_context(config, step_section(name, config), progress)
    external = external_context(context, config, progress)
    level = mask_level(level, None if external is None else cohort_label(external.source))
    return context, level, _fold_units(context, config, config.mask, level)


def read_context(config: MaskStepConfig, section: str,
                 progress: Progress | None = None) -> RunContext:
    """Check ``config`` against the run folder, record it as ``[section]``, load the cohort."""
    run = RunFolder(config.run)
    run.train_config()  # a clear error before anything else when no model was trained
    run.refuse_slice_models(f"[{section}] (paper 1's masks)")
    for _, _, folder in run.model_dirs():
        classes = read_model_json(folder)["classes"]
        target_class(config.mask, classes, masked_class(config, classes))
    run.record_config(section, config)
    return shared_context(run.root, config.device, progress=progress)


def masked_class(config: MaskStepConfig, classes: list[str]) -> str:
    """The diagnosis whose images are masked: given, or the patient class
    (:func:`~voxplain.data.classes.patient_class`)."""
    return patient_class(classes, config.diagnosis)


def target_class(config: MaskConfig, classes: list[str], diagnosis: str) -> int:
    """Index of the class whose probability ``f`` the mask minimises (default: the true one;
    the masked images are classified correctly, so ``predicted`` is the true class too)."""
    target = "true" if config.target == "predicted" else config.target
    return resolve_target(target, classes, diagnosis)


def correctly_classified(context: RunContext, model: nn.Module, sessions: pd.DataFrame,
                         classes: list[str], diagnosis: str) -> pd.DataFrame:
    """Rows of ``sessions`` with ``diagnosis`` that ``model`` classifies as ``diagnosis``."""
    rows = context.rows(sessions)
    rows = rows[rows.diagnosis == diagnosis].reset_index(drop=True)
    if rows.empty:
        return rows
    data = Dataset(rows, context.images, encode_labels(rows, classes, context.source))
    probabilities, _ = predict_proba(model, data, context.train.batch_size, context.device)
    return rows[probabilities.argmax(1) == classes.index(diagnosis)].reset_index(drop=True)


def reference_for(context: RunContext, config: MaskConfig, classes: list[str],
                  train_sessions: pd.DataFrame) -> Reference:
    """``mu``: constant, blurred input, or the mean training image of ``mean_class``."""
    mean_image = None
    if config.perturbation == "mean":
        name = config.mean_class or classes[0]
        rows = context.rows(train_sessions)
        index = rows.loc[rows.diagnosis == name, "image_index"].to_numpy()
        if not len(index):
            raise ValueError(f"no training image of '{name}' for the mean perturbation")
        mean_image = torch.from_numpy(context.images[np.sort(index)].mean(0, keepdims=True))
    return make_reference(config, context.grid.voxel_size, mean_image)


def run_group_masks(config: GroupMaskStepConfig, progress: Progress | None = None) -> pd.DataFrame:
    """One group mask per selected fold/run; returns a summary row per fold/run.

    Each fold/run writes ``masks/group/fold-K/run-R/``: ``mask.nii.gz`` (thresholded),
    ``loss.tsv`` (per epoch), ``image_losses.tsv``, ``qc_flags.tsv`` (quality check step 2:
    ``flagged`` and ``removed`` images) and ``summary.json`` (validation probability of the
    masked class without/with the mask, top-5 AAL2 regions, ``removed`` images). When step 2
    removes images (``mask.qc_step2 = "remove"``), the mask optimised with them is kept in
    ``first/`` (``mask.nii.gz``, ``loss.tsv``, ``image_losses.tsv``, ``qc_flags.tsv``) and the
    files above are those of the mask optimised again without them. A mask that hides more
    than ``mask.dense_fraction`` of the image is optimised again at a tenth of the learning rate
    (``mask.dense_retry``): the dense one is kept in ``dense/`` (``mask.nii.gz``, ``loss.tsv``,
    ``image_losses.tsv``) and ``summary.json``'s ``dense_retry`` gives both learning rates, the
    dense mask's fraction and epochs (null without a retry).

    With ``config.cohort`` the masks are those of that cohort, in ``masks/cohort-LABEL/group``;
    their ``summary.json`` names the cohort (``cohort``) and gives the masked class's mean
    probability on its masked images too (``cohort_probability_before/after``).
    """
    config = as_recorded(config, step_section("mask_group", config))
    try:
        context, level, units = _mask_step(config, "mask_group", "group", progress)
        summaries = pd.DataFrame(map_fold_units(units, _work(group_mask_unit, config, progress),
                                                config.executor, f"{level} masks", progress))
    finally:
        release_contexts()
    flags = flag_group_masks(context.run, config.mask)
    return summaries.drop(columns=["flagged", "flag_reasons"], errors="ignore").merge(
        flags.loc[flags.level == level, ["fold", "run", "flagged", "flag_reasons"]],
        how="left")


def as_recorded(config: MaskStepT, section: str) -> MaskStepT:
    """``config`` with the mask settings a ``[section]`` recorded before they existed was made
    with (``absent_in_records`` of its mask config: ``smoothness = "isotropic"``, and for group
    masks ``qc_step2 = "flag"``), where ``config`` does not give them: such a run folder's
    unfinished folds are computed as its finished ones were. A value given explicitly that
    differs is refused as another setting (:meth:`RunFolder.record_config`)."""
    recorded = RunFolder(config.run).read_config().get(section, {}).get("mask")
    if recorded is None:
        return config
    earlier = {key: value for key, value in type(config.mask).absent_in_records.items()
               if key not in recorded and key not in config.mask.model_fields_set}
    if not earlier:
        return config
    log.info("[%s] was recorded before %s existed: its masks keep %s", section,
             ", ".join(earlier), ", ".join(f"{k} = {v}" for k, v in earlier.items()))
    return config.model_copy(update={"mask": config.mask.model_copy(update=earlier)})


def flag_group_masks(run: RunFolder, config: GroupMaskConfig) -> pd.DataFrame:
    """Flag the group masks of the run folder (``masks/group`` and ``masks/grid``) that cannot
    be trusted, and record the verdict in each ``summary.json`` (``flagged``, ``flag_reasons``).

    A mask is flagged when
    - it hides more than ``dense_fraction`` of the image (no localised explanation), or
    - it masks far more of the image than the run's other group masks: its masked fraction has
      a robust z-score above ``qc_z`` among them and exceeds their median by at least
      ``outlier_fraction`` (the dense plateau Adam can stop on: salt-and-pepper over the whole
      brain instead of a few regions), or
    - it does not halve the mean validation probability of the masked class (it does not hide
      what the model uses).

    Returns one row per mask: ``level``, ``fold``, ``run``, ``masked_fraction``,
    ``robust_z``, ``flagged``, ``flag_reasons``. Flagged masks are left out of the robustness
    comparisons unless asked for and marked in the report.

    The masks of another cohort (``masks/cohort-LABEL/group``) are compared among themselves,
    not with the run's own.
    """
    with run.lock():  # rewrites the summaries of every level: one step at a time
        own = [path for _, _, path in fold_run_files(run.masks_dir / "group", "summary.json")]
        own += [path for setting in sorted(run.masks_dir.glob("grid/*/"))
                for _, _, path in fold_run_files(setting, "summary.json")]
        pools = [own] + [[path for _, _, path in fold_run_files(
            run.masks_dir / mask_level("group", label), "summary.json")]
            for label in run.external_cohorts()]
        frames = [_flag_group_masks(run, config, paths) for paths in pools]
        return pd.concat([frame for frame in frames if len(frame)] or frames[:1],
                         ignore_index=True)


def _flag_group_masks(run: RunFolder, config: GroupMaskConfig, paths: list[Path]) -> pd.DataFrame:
    records = [json.loads(path.read_text()) for path in paths]
    if not records:
        return pd.DataFrame(columns=["level", "fold", "run", "masked_fraction", "robust_z",
                                     "flagged", "flag_reasons"])
    fractions = np.array([record["masked_fraction"] for record in records])
    z, dense = outliers(fractions, config.qc_z, config.outlier_fraction)
    median = float(np.median(fractions))
    rows = []
    for path, record, score, is_dense in zip(paths, records, z, dense):
        flags = []
        if record["masked_fraction"] > config.dense_fraction:
            flags.append(f"hides {record['masked_fraction']:.2f} of the image (more than "
                         f"{config.dense_fraction:g}): not a localised explanation")
        elif is_dense and len(records) >= 3:
            flags.append(f"masks {record['masked_fraction']:.2f} of the image, the run's group "
                         f"masks a median of {median:.3f} (robust z {score:.0f})")
        before, after = record["probability_before"], record["probability_after"]
        if np.isfinite(before) and np.isfinite(after) and after > before / 2:
            flags.append(f"validation probability of {record['diagnosis']} {before:.2f} -> "
                         f"{after:.2f}: not halved")
        level = path.parent.parent.parent.relative_to(run.masks_dir).as_posix()
        if record.get("flag_reasons") != flags or record.get("flagged") != bool(flags):
            write_json(path, {**record, "flagged": bool(flags), "flag_reasons": flags})
            if flags:
                log.warning("%s mask fold %d run %d flagged: %s", level, record["fold"],
                            record["run"], "; ".join(flags))
        rows.append({"level": level, "fold": record["fold"], "run": record["run"],
                     "masked_fraction": record["masked_fraction"], "robust_z": float(score),
                     "flagged": bool(flags), "flag_reasons": flags})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class FoldMasks:
    """One unit of a mask step (:mod:`voxplain.run.executor`): the masks of one fold/run with
    one setting, written under ``masks/LEVEL/fold-K/run-R``. Small and picklable: a Ray worker
    reloads the run's context itself. ``labels``: values added to a group mask's summary (the
    grid's hyperparameters)."""

    config: MaskStepConfig
    mask: MaskConfig
    level: str
    fold: int
    run: int
    labels: tuple[tuple[str, float], ...] = ()


def _fold_units(context: RunContext, config: MaskStepConfig, mask: MaskConfig, level: str,
                prefix: str = "", labels: tuple[tuple[str, float], ...] = ()
                ) -> list[Unit[FoldMasks]]:
    """A unit per selected fold/run with a trained model."""
    shipped = with_absolute_paths(config)
    return [Unit(prefix + fold_unit_name(fold, run_index),
                 FoldMasks(shipped, mask, level, fold, run_index, labels))
            for fold, run_index, _ in context.run.selected_models(config.folds)]


def _work(unit_function: Callable[..., R], config: MaskStepConfig,
          progress: Progress | None) -> Callable[[FoldMasks], R]:
    """``unit_function`` with the progress display, which only units run here can move."""
    return partial(unit_function, progress=progress if config.executor.kind == "local" else None)


def unit_contexts(config: MaskStepConfig) -> tuple[RunContext, RunContext | None]:
    """The run's context and, with ``config.cohort``, the other cohort's, loaded once per
    process (:func:`~voxplain.steps.context.shared_context`)."""
    context = shared_context(config.run, config.device)
    cohort = getattr(config, "cohort", None)
    return context, None if cohort is None else shared_context(config.run, config.device,
                                                               Path(cohort))


def group_mask_unit(unit: FoldMasks, progress: Progress | None = None) -> pd.Series:
    """The group mask of one fold/run (:func:`_group_mask`), or its summary when it is already
    written; here or in a Ray task."""
    context, external = unit_contexts(unit.config)
    folder = context.run.mask_dir(unit.level, unit.fold, unit.run)
    context.run.remove_leftovers(folder)
    if (folder / "summary.json").is_file():
        remove_state(folder)  # left by a kill between summary.json and its removal
        log.info("%s mask fold %d run %d already computed: skipped", unit.level, unit.fold,
                 unit.run)
        summary = pd.Series(json.loads((folder / "summary.json").read_text()))
    else:
        fitted = context.model(unit.fold, unit.run)
        summary = _group_mask(context, unit.config, unit.mask, unit.fold, unit.run, fitted.model,
                              fitted.classes, folder, progress, external)
    return pd.concat([summary, pd.Series(dict(unit.labels))]) if unit.labels else summary


#: Subfolder of a group mask's folder holding its first pass when quality check step 2 removed
#: images (its ``qc_flags.tsv``, written last, marks that pass done).
FIRST_PASS = "first"
#: Subfolder of a group mask's folder holding a mask that hid more than ``dense_fraction`` of
#: the image, optimised again at a tenth of the learning rate (``dense_retry``).
DENSE = "dense"


def _hidden(result: GroupMask) -> float:
    """Fraction of the image a (thresholded) group mask hides."""
    return float((result.mask < 1).float().mean())


def _group_mask(context: RunContext, config: MaskStepConfig, mask: GroupMaskConfig, fold: int,
                run_index: int, model: nn.Module, classes: list[str], folder: Path,
                progress: Progress | None, external: RunContext | None = None) -> pd.Series:
    """One fold/run's group mask, in one pass, or two when quality check step 2 removes images
    (paper 1, 2.3.1: "one image was removed after training a group mask"). The first pass of a
    ``remove`` run checkpoints in ``first/``, so a second pass interrupted in ``folder``
    resumes without redoing it. With ``external``, the mask is trained on that cohort's
    correctly classified sessions of the masked diagnosis (all of them) and stopped on the
    fold's validation patients."""
    diagnosis = masked_class(config, classes)
    splits = {name: context.run.read_split(fold, name) for name in ("train", "validation")}
    source = context if external is None else external
    train = correctly_classified(source, model, splits["train"] if external is None
                                 else external.table, classes, diagnosis)
    validation = correctly_classified(context, model, splits["validation"], classes, diagnosis)
    if train.empty:
        raise FoldSkipped(f"no correctly classified {diagnosis} "
                          + ("training session" if external is None
                             else f"session of {external.source}") + " to optimise a group mask on")
    target = target_class(mask, classes, diagnosis)
    reference = reference_for(context, mask, classes, splits["train"])
    first = folder / FIRST_PASS

    def optimise(images: pd.DataFrame, checkpoint: Path, name: str,
                 settings: GroupMaskConfig = mask):
        task = (progress.add_task(f"{name} fold {fold} run {run_index}", total=mask.max_epochs)
                if progress else None)
        return optimise_group_mask(
            model, source.images_of(images), np.full(len(images), target),
            context.images_of(validation), np.full(len(validation), target), reference, settings,
            context.device, checkpoint=checkpoint, progress=(
                lambda done, total: progress.update(task, completed=done)) if progress else None)

    if (first / "qc_flags.tsv").is_file():  # the first pass removed images: resume the second
        flags = read_tsv(first / "qc_flags.tsv")
        result = None
    else:
        result = optimise(train, first if mask.qc_step2 == "remove" else folder, "group mask")
        flags = qc_flags(result.image_losses, mask.qc_z, mask.qc_min_excess).merge(
            train[IDS].reset_index(names="image")).drop(columns="image")
        if flags.flagged.any():
            log.warning("fold %d run %d: %d image(s) flagged by the group-mask quality check "
                        "(step 2): %s", fold, run_index, int(flags.flagged.sum()),
                        ", ".join(_session_names(flags[flags.flagged])))
        if mask.qc_step2 == "remove" and flags.flagged.any():
            _write_pass(first, result, train, context)
            write_tsv(first / "qc_flags.tsv", flags)  # last: the first pass is done
            result = None
        remove_state(first)
        if first.is_dir() and not any(first.iterdir()):
            first.rmdir()  # held only the checkpoint of a pass that removed nothing
    flags["removed"] = flags.flagged.astype(bool) & (result is None)
    if result is None:
        removed = flags[flags.removed]
        train = train[~_session_names(train).isin(_session_names(removed))].reset_index(drop=True)
        if train.empty:
            raise FoldSkipped("quality check step 2 removed every training session")
        log.warning("fold %d run %d: group mask optimised again without %s (first pass kept in "
                    "%s)", fold, run_index, ", ".join(_session_names(removed)), first)
        result = optimise(train, folder, "group mask without flagged images")
    retry = None
    if mask.dense_retry and _hidden(result) > mask.dense_fraction:
        # paper 1, fig. 4: lr 0.01 where 0.1 did not converge; the dense mask kept in dense/,
        # whose checkpoint is the retry's (a kill resumes the retry, the dense pass is redone
        # from its own checkpoint or, when that was removed, again from the start: seeded)
        dense = folder / DENSE
        slower = mask.model_copy(update={"learning_rate": mask.learning_rate / 10})
        log.warning("fold %d run %d: the group mask hides %.2f of the image (more than %g): "
                    "optimised again at learning rate %g (the dense mask kept in %s)", fold,
                    run_index, _hidden(result), mask.dense_fraction, slower.learning_rate, dense)
        _write_pass(dense, result, train, context)
        retry = {"dense_learning_rate": mask.learning_rate,
                 "dense_masked_fraction": _hidden(result),
                 "dense_epochs": len(result.history), "learning_rate": slower.learning_rate}
        result = optimise(train, dense, "group mask at a tenth of the learning rate", slower)
        remove_state(dense)
    mask_array = result.mask[0, 0].cpu().numpy()
    _write_pass(folder, result, train, context)
    write_tsv(folder / "qc_flags.tsv", flags)
    summary = {"fold": fold, "run": run_index, "diagnosis": diagnosis, "n_train": len(train),
               "n_validation": len(validation), "best_epoch": result.best_epoch,
               "epochs": len(result.history), **_masked_probability(
                   model, context, validation, target, result.mask, reference),
               "masked_fraction": float((mask_array < 1).mean()),
               "top_regions": _top_regions(context, 1 - mask_array),
               "removed": _session_names(flags[flags.removed]).tolist(), "dense_retry": retry}
    if external is not None:
        summary["cohort"] = str(external.source)
        summary.update({f"cohort_{key}": value for key, value in _masked_probability(
            model, external, train, target, result.mask, reference).items()})
    write_json(folder / "summary.json", summary)
    remove_state(folder)  # summary.json marks the mask done: its checkpoint is no longer needed
    log.info("%s mask fold %d run %d: validation probability of %s %.3f -> %.3f; top regions %s",
             folder.parent.parent.name, fold, run_index, diagnosis, summary["probability_before"],
             summary["probability_after"], ", ".join(summary["top_regions"]))
    return pd.Series(summary)


def _write_pass(folder: Path, result: GroupMask, train: pd.DataFrame, context: RunContext) -> None:
    """``mask.nii.gz``, ``loss.tsv`` and ``image_losses.tsv`` of one optimisation pass."""
    write_map(folder / "mask", result.mask[0, 0].cpu().numpy(), context.grid)
    write_tsv(folder / "loss.tsv", result.history)
    write_tsv(folder / "image_losses.tsv",
              result.image_losses.merge(train[IDS].reset_index(names="image"), on="image"))


def _session_names(rows: pd.DataFrame) -> pd.Series:
    """``sub-X_ses-Y`` of each row."""
    return rows.participant_id.astype(str) + "_" + rows.session_id.astype(str)


@torch.no_grad()
def _masked_probability(model: nn.Module, context: RunContext, rows: pd.DataFrame, target: int,
                        mask: torch.Tensor, reference: Reference) -> dict[str, float]:
    """Mean probability of ``target`` on ``rows`` without and with ``mask``."""
    if rows.empty:
        return {"probability_before": float("nan"), "probability_after": float("nan")}
    x = torch.from_numpy(context.images_of(rows)).to(context.device)
    y = torch.full((len(rows),), target, device=context.device)
    before = target_probability(model, x, y).mean().item()
    after = target_probability(model, perturb(x, mask, reference(x)), y).mean().item()
    return {"probability_before": before, "probability_after": after}


def _top_regions(context: RunContext, density: np.ndarray, k: int = 5) -> list[str]:
    """The ``k`` AAL2 regions most hidden by a 3D mask (none for 2D images)."""
    if density.ndim != 3:
        return []
    return top_regions(density, Atlas.aal2(context.grid), k)


def run_session_masks(config: SessionMaskStepConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Session masks of the correctly classified sessions of each fold's validation subjects.

    Writes ``masks/session/fold-K/run-R/SESSION.nii.gz`` (thresholded) and an ``index.tsv``
    (loss, iterations, probability of the masked class without/with the mask, ``robust_z`` of
    the lowest loss among the fold/run's masks and ``flagged`` = above ``qc_z``); returns the
    concatenated index. With ``config.cohort``: every correctly classified session of the
    masked diagnosis in that cohort, under ``masks/cohort-LABEL/session``.

    With ``executor.sessions_per_unit``, a first pass spreads each unfinished fold/run's
    sessions over units of sessions (:func:`session_mask_chunks`), each writing its masks and
    a ``chunk-A-B.tsv`` (written last: a unit whose table exists is skipped on resumption);
    the fold/run's unit then writes ``index.tsv`` from these tables (the robust z over all of
    the fold/run's masks) and removes them. The masks and the index are those of one unit
    per fold/run.

    The flag catches masks that stopped on the dense plateau Adam can reach in its first steps
    (lr 0.1 moves every voxel by about 0.1 at once): such a mask can hold the masked-class
    probability near 0 for more than ``patience`` iterations with most voxels below 0.95 and a
    loss several times that of the other masks, and early stopping then keeps it. On the demo
    (32 sessions, folds 0-1) one mask did so: lowest loss 0.026 against 0.004-0.006 for the
    others (robust z about 50), 99 % of voxels below 0.95; run on, it leaves the plateau after
    about 450 iterations at loss 0.0055.
    """
    config = as_recorded(config, step_section("mask_session", config))
    try:
        context, _, units = _mask_step(config, "mask_session", "session", progress)
        if config.executor.sessions_per_unit is not None:
            chunks, units = session_mask_chunks(context, config, units)
            map_fold_units(chunks, _work(session_chunk_unit, config, progress),
                           config.executor, "session masks (sessions)", progress)
        return pd.concat(map_fold_units(units, _work(session_mask_unit, config, progress),
                                        config.executor, "session masks", progress),
                         ignore_index=True)
    finally:
        release_contexts()


#: The index of a fold/run's session masks (written last: it marks the fold/run done).
SESSION_INDEX = "index.tsv"


@dataclass(frozen=True)
class SessionMaskChunk:
    """A unit of ``voxplain mask session`` with ``executor.sessions_per_unit``: the masks of
    the sessions at positions ``start`` to ``stop - 1`` of those a fold/run masks
    (:func:`_session_rows`) and their table :func:`chunk_table`."""

    masks: FoldMasks
    start: int
    stop: int


@dataclass(frozen=True)
class ChunkedSessionMasks:
    """A fold/run's unit of ``voxplain mask session`` whose masks units of sessions computed:
    it writes ``index.tsv`` from the tables of ``chunks`` (``(start, stop)`` each)."""

    masks: FoldMasks
    chunks: tuple[tuple[int, int], ...]


def chunk_table(folder: Path, start: int, stop: int) -> Path:
    """``chunk-A-B.tsv``: the table of the masks of the sessions at positions A to B (both
    included) of a fold/run's, written last by their unit."""
    return folder / f"chunk-{start}-{stop - 1}.tsv"


def session_mask_chunks(context: RunContext, config: SessionMaskStepConfig,
                        units: list[Unit[FoldMasks]]
                        ) -> tuple[list[Unit[SessionMaskChunk]], list[Unit]]:
    """The units of sessions of every unfinished fold/run, and the fold/run units that follow
    them (:class:`ChunkedSessionMasks` where units of sessions compute the masks, the unit as
    it is for a fold/run already done or without a session to mask, which it names).

    Each fold/run's sessions (:func:`_session_rows`, classified here once per model) are cut
    into runs of ``executor.sessions_per_unit`` rounded up to a multiple of
    ``mask.batch_size`` (:func:`~voxplain.run.executor.chunk_size`); a last run of a single
    session joins the one before it when ``mask.batch_size`` > 1. Masks are optimised in
    batches of ``batch_size`` consecutive sessions, each batch on its own (its own Adam, its own
    early stopping), by a model whose memory layout depends only on whether the unit holds
    more than one session: with these boundaries every unit's batches, layout and masks are
    those of one unit per fold/run, bit for bit."""
    batch = config.mask.batch_size
    size = chunk_size(config.executor.sessions_per_unit, batch, "session masks")
    chunks, folds = [], []
    for unit in units:
        masks = unit.argument
        context_here, external = unit_contexts(masks.config)
        folder = context_here.run.mask_dir(masks.level, masks.fold, masks.run)
        if (folder / SESSION_INDEX).is_file():
            folds.append(unit)
            continue
        try:
            rows, _, _ = _session_rows(context_here, masks.config, masks.fold,
                                       context_here.model(masks.fold, masks.run), external)
        except FoldSkipped:
            folds.append(unit)
            continue
        bounds = session_chunks(len(rows), size)
        if batch > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds = bounds[:-2] + [(bounds[-2][0], bounds[-1][1])]
        chunks += [Unit(session_unit_name(masks.fold, masks.run, start, stop),
                        SessionMaskChunk(masks, start, stop)) for start, stop in bounds]
        folds.append(Unit(unit.name, ChunkedSessionMasks(masks, tuple(bounds))))
    return chunks, folds


def session_chunk_unit(chunk: SessionMaskChunk, progress: Progress | None = None) -> int:
    """The masks of one unit of sessions and their table (:func:`chunk_table`), unless the
    table or the fold/run's index is already written; here or in a Ray task. Returns how many
    masks it optimised."""
    unit = chunk.masks
    context, external = unit_contexts(unit.config)
    folder = context.run.mask_dir(unit.level, unit.fold, unit.run)
    name = session_unit_name(unit.fold, unit.run, chunk.start, chunk.stop)
    if (folder / SESSION_INDEX).is_file() or chunk_table(folder, chunk.start,
                                                         chunk.stop).is_file():
        log.info("session masks %s already computed: skipped", name)
        return 0
    _session_mask_chunk(context, unit, chunk.start, chunk.stop, folder, progress, external)
    return chunk.stop - chunk.start


def _session_mask_chunk(context: RunContext, unit: FoldMasks, start: int, stop: int,
                        folder: Path, progress: Progress | None,
                        external: RunContext | None) -> None:
    """Optimise and write the masks of the sessions ``start`` to ``stop - 1``, then their
    table."""
    fitted = context.model(unit.fold, unit.run)
    rows, source, diagnosis = _session_rows(context, unit.config, unit.fold, fitted, external)
    if len(rows) < stop:
        raise RuntimeError(f"session masks fold {unit.fold} run {unit.run}: {len(rows)} "
                           f"sessions to mask, where the step planned at least {stop}")
    table = _mask_sessions(context, unit.config, unit.fold, unit.run, fitted,
                           rows.iloc[start:stop], source, diagnosis, folder, progress,
                           session_unit_name(unit.fold, unit.run, start, stop))
    write_tsv(chunk_table(folder, start, stop), table)


def session_mask_unit(unit: FoldMasks | ChunkedSessionMasks,
                      progress: Progress | None = None) -> pd.DataFrame:
    """The session masks of one fold/run (:func:`_session_masks`), or their index when already
    written; with units of sessions (:class:`ChunkedSessionMasks`), the index of their tables
    (a table still missing is computed here first). Here or in a Ray task."""
    chunks: tuple[tuple[int, int], ...] = ()
    if isinstance(unit, ChunkedSessionMasks):
        unit, chunks = unit.masks, unit.chunks
    context, external = unit_contexts(unit.config)
    folder = context.run.mask_dir(unit.level, unit.fold, unit.run)
    context.run.remove_leftovers(folder)
    if (folder / SESSION_INDEX).is_file():
        _remove_chunk_tables(folder)  # left by a kill between the index and their removal
        log.info("session masks fold %d run %d already computed: skipped", unit.fold, unit.run)
        return read_tsv(folder / SESSION_INDEX)
    if not chunks:  # (tables of an earlier step with units of sessions are not read)
        index = _session_masks(context, unit.config, unit.fold, unit.run,
                               context.model(unit.fold, unit.run), folder, progress, external)
        _remove_chunk_tables(folder)
        return index
    for start, stop in chunks:
        if not chunk_table(folder, start, stop).is_file():
            _session_mask_chunk(context, unit, start, stop, folder, progress, external)
    # read back, also the tables written just now: the index holds the values as written
    index = pd.concat([read_tsv(chunk_table(folder, start, stop)) for start, stop in chunks],
                      ignore_index=True)
    index = _write_session_index(folder, index, unit.config, unit.fold, unit.run)
    _remove_chunk_tables(folder)
    return index


def _remove_chunk_tables(folder: Path) -> None:
    for path in folder.glob("chunk-*-*.tsv"):
        path.unlink(missing_ok=True)


def _session_rows(context: RunContext, config: SessionMaskStepConfig, fold: int,
                  fitted: FoldModel, external: RunContext | None = None
                  ) -> tuple[pd.DataFrame, RunContext, str]:
    """The sessions one fold/run masks -- of the fold's validation subjects, or every session
    of ``external``'s cohort, of the masked diagnosis, classified correctly by the model, the
    first ``max_sessions`` --, the context holding their images and the masked diagnosis.

    Raises:
        FoldSkipped: no session to mask.
    """
    diagnosis = masked_class(config, fitted.classes)
    if external is None:
        source = context
        subjects = context.run.read_split(fold, "validation")
        sessions = context.table[context.table.participant_id.isin(subjects.participant_id)]
    else:
        source, sessions = external, external.table
    rows = correctly_classified(source, fitted.model, sessions, fitted.classes, diagnosis)
    rows = rows.iloc[:config.max_sessions]
    if rows.empty:
        raise FoldSkipped(f"no correctly classified {diagnosis} "
                          + ("validation session" if external is None
                             else f"session of {external.source}") + " to mask")
    return rows, source, diagnosis


def _mask_sessions(context: RunContext, config: SessionMaskStepConfig, fold: int,
                   run_index: int, fitted: FoldModel, rows: pd.DataFrame, source: RunContext,
                   diagnosis: str, folder: Path, progress: Progress | None,
                   name: str) -> pd.DataFrame:
    """Optimise and write the masks of ``rows`` (images in ``source``); their table: ids,
    fold, run, path, loss, iterations, probability_before, probability_after."""
    model, classes = fitted.model, fitted.classes
    splits_train = context.run.read_split(fold, "train")
    reference = reference_for(context, config.mask, classes, splits_train)
    images = torch.from_numpy(source.images_of(rows)).to(context.device)
    targets = torch.full((len(rows),), target_class(config.mask, classes, diagnosis),
                         device=context.device)
    task = (progress.add_task(f"session masks {name}", total=len(rows)) if progress else None)
    result = optimise_session_masks(model, images, targets, reference, config.mask, (
        lambda done, total: progress.update(task, completed=done)) if progress else None)
    paths = []
    for row, mask in zip(rows.itertuples(), result.masks):
        stem = context.run.inside(folder / f"{row.participant_id}_{row.session_id}")
        paths.append(write_map(stem, mask[0].cpu().numpy(), context.grid).name)
    return rows[IDS].assign(fold=fold, run=run_index, path=paths, loss=result.loss,
                            iterations=result.iterations,
                            probability_before=result.probability_before,
                            probability_after=result.probability_after)


def _write_session_index(folder: Path, index: pd.DataFrame, config: SessionMaskStepConfig,
                         fold: int, run_index: int) -> pd.DataFrame:
    """``index.tsv`` of a fold/run's masks: their table with the robust z of the lowest loss
    among them all and ``flagged`` (above ``qc_z``)."""
    z = robust_z(index.loss.to_numpy())
    index = index.assign(robust_z=z, flagged=z > config.mask.qc_z)
    write_tsv(folder / SESSION_INDEX, index)
    if index.flagged.any():
        log.warning("fold %d run %d: %d session mask(s) flagged as not converged (lowest "
                    "loss an outlier among this model's masks: %s); see %s", fold, run_index,
                    int(index.flagged.sum()), ", ".join(
                        index.participant_id[index.flagged] + "_"
                        + index.session_id[index.flagged]), folder / SESSION_INDEX)
    return index


def _session_masks(context: RunContext, config: SessionMaskStepConfig, fold: int,
                   run_index: int, fitted: FoldModel, folder: Path,
                   progress: Progress | None, external: RunContext | None = None) -> pd.DataFrame:
    """The session masks of one fold/run and their index: of the fold's validation subjects,
    or of every session of ``external``'s cohort."""
    rows, source, diagnosis = _session_rows(context, config, fold, fitted, external)
    index = _mask_sessions(context, config, fold, run_index, fitted, rows, source, diagnosis,
                           folder, progress, f"fold {fold} run {run_index}")
    return _write_session_index(folder, index, config, fold, run_index)


def grid_setting(l1: float, l2: float, b1: float, b2: float,
                 learning_rate: float | None = None) -> str:
    """Folder name of one grid point, e.g. ``l1-0.0001_l2-0.01_b1-0.1_b2-1``, ending with
    ``_lr-0.01`` when the learning rate is not the ``[mask]`` one (``learning_rate`` given), so
    that the folders of grids without a learning-rate dimension keep their names."""
    name = f"l1-{l1:g}_l2-{l2:g}_b1-{b1:g}_b2-{b2:g}"
    return name if learning_rate is None else f"{name}_lr-{learning_rate:g}"


#: The dimensions of the mask grid: fields of :class:`~voxplain.config.MaskGridConfig` holding
#: the values of the ``[mask]`` setting of the same name.
GRID_DIMENSIONS = ("l1", "l2", "b1", "b2", "learning_rate")


def grid_settings(config: MaskGridConfig) -> list[tuple[float, float, float, float, float]]:
    """The (l1, l2, b1, b2, learning rate) of the grid: every combination (``design =
    "full"``), or each hyperparameter over its values with the others at ``config.mask``'s
    (``"one-at-a-time"``, the layout of paper 1's tables 2-3), in order and without repeats.
    Without ``learning_rate`` values the grid uses the ``[mask]`` learning rate."""
    values = {name: getattr(config, name) for name in GRID_DIMENSIONS}
    values["learning_rate"] = values["learning_rate"] or [config.mask.learning_rate]
    if config.design == "full":
        return list(itertools.product(*values.values()))
    centre = {name: getattr(config.mask, name) for name in values}
    settings = [tuple({**centre, name: value}.values())
                for name, options in values.items() for value in options]
    return list(dict.fromkeys(settings))


def run_mask_grid(config: MaskGridConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Group masks for every (l1, l2, b1, b2, learning rate) of the grid, under
    ``masks/grid/SETTING`` (:func:`grid_setting`)."""
    config = as_recorded(config, "mask_grid")

    def setting(l1: float, l2: float, b1: float, b2: float, learning_rate: float) -> str:
        own = None if learning_rate == config.mask.learning_rate else learning_rate
        return grid_setting(l1, l2, b1, b2, own)

    try:
        context = read_context(config, "mask_grid", progress)
        units = [unit for values in grid_settings(config) for unit in _fold_units(
            context, config, config.mask.model_copy(update={  # the grid keeps its own rates
                **dict(zip(GRID_DIMENSIONS, values)), "dense_retry": False}),
            f"grid/{setting(*values)}", f"{setting(*values)} ",
            tuple(zip(GRID_DIMENSIONS, values)))]
        summaries = map_fold_units(units, _work(group_mask_unit, config, progress),
                                   config.executor, "grid masks", progress)
    finally:
        release_contexts()
    table = pd.DataFrame(summaries).reset_index(drop=True).drop(
        columns=["flagged", "flag_reasons"], errors="ignore")
    flags = flag_group_masks(context.run, config.mask)
    flags = flags[flags.level.str.startswith("grid/")].assign(
        setting=lambda frame: frame.level.str.removeprefix("grid/"))
    table["setting"] = [setting(*row) for row in table[list(GRID_DIMENSIONS)].to_numpy()]
    table = table.merge(flags[["setting", "fold", "run", "flagged", "flag_reasons"]], how="left")
    write_tsv(context.run.masks_dir / "grid" / "summary.tsv", table)
    return table
