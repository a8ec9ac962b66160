"""Explanation step on a run folder: ``voxplain explain`` (per-session maps and group maps).

Every selected fold/run's model explains the sessions of its fold's validation subjects (the
baseline session of each, as in ``splits/fold-K/validation.tsv``: subjects the model never saw),
or every session of another cohort (``cohort``). Images are loaded the way training loaded them
(same downsampling, same disk cache), so maps live on the model's input grid and carry that
grid's affine.

Output, for a method key ``KEY`` (the method name, followed by the settings that change the maps
when they differ from the default — ``_layer-LAYER``, ``_OPTION-VALUE``, ``_target-T``,
``_group-all``, ``_cohort-NAME`` — so that two settings never overwrite each other;
:func:`explanation_key`)::

    explanations/KEY/explanation.json          method, layer, signed, target, cohort
    explanations/KEY/fold-K/run-R/sub-X_ses-Y.nii.gz   one map per session (2D: + .png)
    explanations/KEY/fold-K/run-R/group_<DIAGNOSIS>.nii.gz
    explanations/KEY/fold-K/run-R/index.tsv    participant_id, session_id, diagnosis, fold,
                                               run, target, predicted, predicted_probability,
                                               target_probability, correct, method, layer,
                                               layer_shape, layer_coarse, path

``layer`` is the layer a class activation map read (the default rule's choice, see
:func:`voxplain.explain.layers.choose_cam_layer`, or ``--layer``), ``layer_shape`` its output
grid (e.g. ``4x5x4``) and ``layer_coarse`` whether an axis of it has fewer than
``min_layer_size`` voxels (the map is then a few blobs stretched over the image); empty for
methods that read no layer.

Group maps (one per diagnosis) average the session maps of that diagnosis — by default only
the sessions the model classifies correctly (``group = "correct"``; ``"all"`` keeps every
session). Sign convention: for an unsigned method (``Explainer.signed`` False, e.g. Grad-CAM)
the group map is the mean of ``|map|``; for a signed method (gradients, integrated gradients,
LRP, ...) it is the signed mean, so evidence for and against the target class can cancel across
sessions.

Maps are NIfTI on the model's input grid, 2D maps too (one slice ``(H, W, 1)`` whose header
holds the images' pixel spacing, :func:`voxplain.run.maps.write_map`), each 2D map with a grey
PNG preview (:func:`preview`).

Slice models (paper 2): every kept slice of a session is explained with its own target (the
true class, the slice's own predicted class with ``target = "predicted"``, or a named class),
and the slice maps are stacked back into one map per session on the volume grid
(:meth:`voxplain.data.slicing.SliceView.to_volume`; slices that were not kept are NaN), so group
maps, localisation and the statistics of paper 2 run on volumes. The index's ``predicted`` is
the session's soft vote; ``slices.tsv`` beside it has one row per slice (``slice``, ``target``,
``predicted``, probabilities, ``correct``): paper 2's misclassified slices.

Resume: session maps already on disk are not recomputed; ``index.tsv`` is written last and marks
a fold/run as finished. A fold/run an earlier version left unfinished may hold 2D session maps as
``.npy``: they are kept and indexed as they are (:func:`map_file_name`).

Units: one per fold/run (:class:`FoldExplanation`). With ``executor.sessions_per_unit``, a first
pass of units of sessions (:class:`SessionExplanation`, ``fold K run R sessions A-B``) writes the
session maps, spreading one model's sessions over the workers; the fold/run units then find them
written (:func:`session_chunk_units` gives the rule that keeps the maps bit-identical).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.progress import Progress
from torch import nn

from voxplain.config import ExplainConfig, ExplainStepConfig
from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid
from voxplain.data.classes import resolve_target
from voxplain.explain.api import Explainer
from voxplain.explain.methods import METHODS, explainer
from voxplain.io import atomic_path, read_tsv, write_json, write_tsv
from voxplain.models.layout import for_batches
from voxplain.models.serialization import load_model, read_model_json
from voxplain.run import (FoldSkipped, RunFolder, Unit, fold_unit_name, map_fold_units,
                          session_unit_name)
from voxplain.run.executor import chunk_size, session_chunks, with_absolute_paths
from voxplain.run.folder import explanation_key as key_of
from voxplain.run.maps import read_map, write_map
from voxplain.steps.context import IDS, RunContext, release_contexts, shared_context

log = logging.getLogger("voxplain")

INDEX = "index.tsv"
#: Per-slice predictions and targets of a slice model, beside the index.
SLICES = "slices.tsv"


def explanation_key(config: ExplainStepConfig) -> str:
    """Folder name under ``explanations/`` (:func:`voxplain.run.folder.explanation_key`)."""
    return key_of(config.explain, config.cohort, reads_layer(config.explain.method),
                  config.subset, takes_baseline(config.explain.method))


def build_explainer(config: ExplainConfig, model: nn.Module,
                    cyce_folder: Path | None = None, grid: Grid | None = None,
                    baseline: torch.Tensor | None = None) -> Explainer:
    """The configured method on ``model``; options the method does not take are an error.

    ``cyce`` takes its generators from ``cyce_folder`` (the fold's ``RUN/cyce/fold-K/run-R``,
    trained by ``voxplain cyce train``) unless the ``generators`` option names a folder. The
    region methods (:mod:`voxplain.explain.regions`) take the AAL2 regions on ``grid`` when it is
    a 3D grid the atlas covers (cubes of ``block`` voxels otherwise). ``baseline``
    ``(C, *spatial)``: the baseline of a method that takes one (the mean image of
    ``baseline_class``, :func:`class_mean_image`).
    """
    options: dict[str, Any] = {**config.options, "batch_size": config.batch_size}
    if baseline is not None:
        if "baseline" in options:
            raise ValueError("give the baseline either as an option or as baseline_class, "
                             "not both")
        options["baseline"] = baseline
    if config.method == "cyce" and cyce_folder is not None:
        options.setdefault("generators", cyce_folder)
    if takes_regions(config.method) and grid is not None and len(grid.shape) == 3:
        labels = Atlas.aal2(grid).labels
        if labels.any():
            options.setdefault("regions", torch.from_numpy(labels.astype("int64")))
    if config.layer is not None:
        options["layer"] = config.layer
    if reads_layer(config.method):
        options["min_layer_size"] = config.min_layer_size
    try:
        return explainer(config.method, model, **options)
    except TypeError as error:
        raise ValueError(f"method {config.method!r} does not take the options "
                         f"{sorted(options)} ({error})") from None


def takes_regions(method: str) -> bool:
    """Whether the method attributes to regions of a label map (:mod:`voxplain.explain.regions`)."""
    factory = METHODS.get(method)
    return factory is not None and "regions" in inspect.signature(factory).parameters


def takes_baseline(method: str) -> bool:
    """Whether the method takes one baseline image (integrated gradients, occlusion, the
    region methods, the class activation maps)."""
    factory = METHODS.get(method)
    return factory is not None and "baseline" in inspect.signature(factory).parameters


def reads_layer(method: str) -> bool:
    """Whether the method reads one layer's feature maps (the class activation maps)."""
    factory = METHODS.get(method)
    return factory is not None and "min_layer_size" in inspect.signature(factory).parameters


def run_explain(config: ExplainStepConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Explain every selected model of ``config.run``; returns the concatenated index tables.

    Raises:
        ValueError: an unknown method (the message lists the available ones), a layer the model
            does not have (the valid ones are listed), a run folder without trained models, a
            target class that is not a class of the model.
    """
    run = RunFolder(config.run)
    models = run.selected_models(config.folds)
    # fail before any loading or writing: unknown method, layer, option or target class
    first_fold, first_run, first_model = models[0]
    method = build_explainer(config.explain, load_model(first_model, "cpu")[0],
                             run.cyce_dir(first_fold, first_run))
    if config.explain.target not in ("true", "predicted"):
        for _, _, folder in models:
            resolve_target(config.explain.target, read_model_json(folder)["classes"])
    if config.explain.baseline_class is not None and takes_baseline(config.explain.method):
        _check_baseline_class(run, config.explain.baseline_class, models)
    key = explanation_key(config)
    try:
        # the cohort is checked before recording
        context = shared_context(config.run, config.device, config.cohort, progress)
        _record(run, config, key, bool(method.signed))
        shipped = with_absolute_paths(config)
        here = progress if config.executor.kind == "local" else None
        if config.executor.sessions_per_unit is not None:
            # first the session maps, spread over units of sessions; the fold units below then
            # find them written and add predictions, group maps and index
            chunks = session_chunk_units(context, shipped, key, models)
            map_fold_units(chunks, partial(explain_sessions_unit, progress=here),
                           config.executor, f"explain {key} (sessions)", progress)
        units = [Unit(fold_unit_name(fold, run_index),
                      FoldExplanation(shipped, key, fold, run_index))
                 for fold, run_index, _ in models]
        work = partial(explain_unit, progress=here)
        indexes = map_fold_units(units, work, config.executor, f"explain {key}", progress)
    finally:
        release_contexts()
    return pd.concat(indexes, ignore_index=True)


def _record(run: RunFolder, config: ExplainStepConfig, key: str, signed: bool) -> None:
    """Record the step's settings and ``explanation.json``."""
    # batch size and evaluation do not change the maps, nor does a baseline class those of a
    # method without a baseline: left out of the recorded settings so that a resumed step may
    # change them (None entries are not recorded)
    unused = {} if takes_baseline(config.explain.method) else {"baseline_class": None}
    recorded = config.model_copy(update={
        "explain": config.explain.model_copy(update={"batch_size": None, **unused})})
    run.record_config(explain_section(key), recorded)
    write_json(run.explanation_dir(key) / "explanation.json", {
        "method": config.explain.method, "layer": config.explain.layer,
        "signed": signed, "target": config.explain.target,
        "group": config.explain.group,
        "baseline_class": config.explain.baseline_class
        if takes_baseline(config.explain.method) else None,
        "cohort": None if config.cohort is None else str(config.cohort)})


@dataclass(frozen=True)
class FoldExplanation:
    """One unit of ``voxplain explain`` (:mod:`voxplain.run.executor`): the maps of one
    fold/run's model under explanation key ``key``. Small and picklable: a Ray worker reloads
    the run's context (once per worker) and the model itself."""

    config: ExplainStepConfig
    key: str
    fold: int
    run: int


def explain_unit(unit: FoldExplanation, progress: Progress | None = None) -> pd.DataFrame:
    """The maps, group maps and index of one fold/run (:func:`explain_model`), or its index
    when already written; here or in a Ray task."""
    config = unit.config
    context = shared_context(config.run, config.device, config.cohort)
    fitted = context.model(unit.fold, unit.run)
    return explain_model(context, config, unit.key, unit.fold, unit.run, fitted.model,
                         fitted.classes, progress)


def explain_section(key: str) -> str:
    """The ``config.toml`` section of one explanation key: ``explain_KEY`` (characters other
    than letters, digits, ``_`` and ``-`` become ``-``)."""
    return "explain_" + "".join(c if c.isalnum() or c in "_-" else "-" for c in key)


def sessions_to_explain(context: RunContext, config: ExplainStepConfig,
                        fold: int) -> pd.DataFrame:
    """Rows of the cohort table (with ``image_index``): the fold's validation (or test)
    sessions, or the whole given cohort."""
    if config.cohort is not None:
        return context.table.reset_index(names="image_index")
    if not context.run.split_file(fold, config.subset).is_file():
        raise FoldSkipped(f"no {config.subset} subjects (splits/fold-{fold}/{config.subset}.tsv; "
                          "test subjects come from --split random)")
    return context.rows(context.run.read_split(fold, config.subset))


def explain_model(context: RunContext, config: ExplainStepConfig, key: str, fold: int,
                  run_index: int, model: nn.Module, classes: list[str],
                  progress: Progress | None = None) -> pd.DataFrame:
    """Maps, group maps and index of one fold/run (skipped when its index exists)."""
    folder = context.run.explanation_dir(key, fold, run_index)
    context.run.remove_leftovers(folder)
    if (folder / INDEX).is_file():
        log.info("%s fold %d run %d already explained: skipped", key, fold, run_index)
        return read_tsv(folder / INDEX)
    rows = sessions_to_explain(context, config, fold)
    if rows.empty:
        raise FoldSkipped("no session to explain")
    index, slices = _predictions(context, config.explain, model, rows, classes)
    index.insert(3, "fold", fold)
    index.insert(4, "run", run_index)
    method, input_shape = _method(context, config, model, fold, run_index, rows)
    index["method"] = config.explain.method
    index["layer"], index["layer_shape"], index["layer_coarse"] = _layer(
        method, input_shape, f"{key} fold {fold} run {run_index}")
    index["path"] = map_paths(folder, rows)
    write_session_maps(context, config.explain, method, folder, rows, list(index.path),
                       (index if slices is None else slices).target_index.to_numpy(),
                       f"{key} fold {fold} run {run_index}", progress)
    _group_maps(context.run, folder, index, bool(method.signed), config.explain.group,
                context.grid)
    if slices is not None:
        slices.insert(3, "fold", fold)
        slices.insert(4, "run", run_index)
        write_tsv(folder / SLICES, slices.drop(columns="target_index"))
    write_tsv(folder / INDEX, index.drop(columns="target_index"))
    return index.drop(columns="target_index")


def _method(context: RunContext, config: ExplainStepConfig, model: nn.Module, fold: int,
            run_index: int, rows: pd.DataFrame) -> tuple[Explainer, tuple[int, ...]]:
    """The configured explainer on ``model`` (converted in place to the layout of batches of
    ``explain.batch_size``) and the shape ``(C, *spatial)`` of one model input of ``rows``."""
    input_shape = tuple(context.model_inputs(rows.iloc[:1]).shape[1:])
    model = for_batches(model, len(input_shape) - 1, config.explain.batch_size, context.device)
    baseline = None
    if config.explain.baseline_class is not None and takes_baseline(config.explain.method):
        baseline = class_mean_image(config.run, config.device, fold,
                                    config.explain.baseline_class).to(context.device)
    method = build_explainer(config.explain, model, context.run.cyce_dir(fold, run_index),
                             context.grid if context.slices is None else None,  # whole images
                             baseline)
    return method, input_shape


def _check_baseline_class(run: RunFolder, name: str,
                          models: list[tuple[int, int, Path]]) -> None:
    """Refuse, before anything is written, a baseline class that is not a class of every model,
    and a slice model (its inputs are slices, not the images a class's mean is taken of)."""
    if run.slice_view() is not None:
        raise ValueError(f"{run.root}: baseline_class needs a model that reads whole images; "
                         "this run's models read slices")
    for _, _, folder in models:
        classes = read_model_json(folder)["classes"]
        if name not in classes:
            raise ValueError(f"{folder}: baseline_class {name!r} is not a class of the model "
                             f"({', '.join(map(str, classes))})")


def class_mean_image(run: Path, device: str, fold: int, name: str,
                     chunk: int = 32) -> torch.Tensor:
    """Mean image ``(C, *spatial)`` (float32, CPU) of the fold's training sessions of class
    ``name``, on the models' input grid: the baseline ``baseline_class`` asks for. Read from
    the run's own cohort, also when another cohort is explained, a few images at a time.

    Raises:
        FoldSkipped: the fold has no training session of that class.
    """
    context = shared_context(run, device)
    rows = context.split_rows(fold, "train")
    rows = rows[rows.diagnosis.astype(str) == name]
    if rows.empty:
        raise FoldSkipped(f"no training session of {name!r} for the baseline class")
    total = np.zeros(context.images.shape[1:], dtype=np.float64)
    for start in range(0, len(rows), chunk):
        total += context.images_of(rows.iloc[start:start + chunk]).sum(0, dtype=np.float64)
    return torch.from_numpy((total / len(rows)).astype(np.float32))


def map_paths(folder: Path, rows: pd.DataFrame) -> list[str]:
    """The map file of each session of ``rows`` in ``folder`` (:func:`map_file_name`)."""
    return [map_file_name(folder, f"{p}_{s}")
            for p, s in zip(rows.participant_id, rows.session_id)]


def session_batch(context: RunContext, config: ExplainConfig) -> int:
    """Sessions per call to the explainer: ``batch_size`` images, i.e. ``batch_size`` sessions
    of an image model and ``batch_size // n_slices`` sessions of a slice model (at least 1)."""
    per_slice = 1 if context.slices is None else context.slices.n_slices
    return max(1, config.batch_size // per_slice)


def write_session_maps(context: RunContext, config: ExplainConfig, method: Explainer,
                       folder: Path, rows: pd.DataFrame, paths: list[str], targets: np.ndarray,
                       name: str, progress: Progress | None = None) -> int:
    """The maps of the sessions of ``rows`` whose file (``paths``, in ``folder``) is missing,
    written atomically; returns how many. The missing sessions are explained in order,
    :func:`session_batch` of them per call; ``targets``: the class index of each session (of
    each of its slices, session-major, for a slice model). Both a fold/run's unit
    (:func:`explain_model`) and a unit of some of its sessions (:func:`explain_sessions_unit`)
    write their maps here."""
    missing = np.flatnonzero([not (folder / path).is_file() for path in paths])
    task = (progress.add_task(name, total=len(rows), completed=len(rows) - len(missing))
            if progress else None)
    per_slice = 1 if context.slices is None else context.slices.n_slices
    step = session_batch(context, config)
    for start in range(0, len(missing), step):
        chunk = missing[start:start + step]
        wanted = (chunk[:, None] * per_slice + np.arange(per_slice)).ravel()
        maps = method.explain(context.model_inputs(rows.iloc[chunk]),
                              torch.as_tensor(targets[wanted]))[:, 0]
        maps = (maps.cpu().numpy() if context.slices is None else
                context.slices.to_volume(maps))
        for row, values in zip(chunk, maps):
            _save(context.run.inside(folder / paths[row]), values, context.grid)
        if progress is not None and task is not None:
            progress.advance(task, len(chunk))
    return len(missing)


@dataclass(frozen=True)
class SessionExplanation:
    """One unit of ``voxplain explain`` with ``executor.sessions_per_unit``: the maps of the
    sessions at positions ``start`` to ``stop - 1`` of those one fold/run explains
    (:func:`sessions_to_explain`)."""

    config: ExplainStepConfig
    key: str
    fold: int
    run: int
    start: int
    stop: int


def session_chunk_units(context: RunContext, config: ExplainStepConfig, key: str,
                        models: list[tuple[int, int, Path]]) -> list[Unit[SessionExplanation]]:
    """The units of sessions of every fold/run not yet explained (no ``index.tsv``).

    Rule: a fold/run's sessions to explain, in their order, are cut into runs of
    ``executor.sessions_per_unit`` sessions rounded up to a multiple of :func:`session_batch`
    (the last run shorter), so that every boundary between units is a boundary between two
    of the explainer's batches of the fold/run's own unit: the batches, hence the maps, are
    those of a step without units of sessions (when none of the maps was written before)."""
    size = chunk_size(config.executor.sessions_per_unit, session_batch(context, config.explain),
                      f"explain {key}")
    units = []
    for fold, run_index, _ in models:
        if (context.run.explanation_dir(key, fold, run_index) / INDEX).is_file():
            continue
        try:
            rows = sessions_to_explain(context, config, fold)
        except FoldSkipped:
            continue  # named by the fold/run's own unit
        units += [Unit(session_unit_name(fold, run_index, start, stop),
                       SessionExplanation(config, key, fold, run_index, start, stop))
                  for start, stop in session_chunks(len(rows), size)]
    return units


def explain_sessions_unit(unit: SessionExplanation, progress: Progress | None = None) -> int:
    """The missing maps of one unit of sessions (:class:`SessionExplanation`), here or in a Ray
    task; returns how many it wrote. The targets are those of the fold/run's unit: for
    ``target = "predicted"``, the predictions of the unit's own sessions."""
    config = unit.config
    context = shared_context(config.run, config.device, config.cohort)
    folder = context.run.explanation_dir(unit.key, unit.fold, unit.run)
    name = f"{unit.key} {session_unit_name(unit.fold, unit.run, unit.start, unit.stop)}"
    rows = sessions_to_explain(context, config, unit.fold).iloc[unit.start:unit.stop]
    paths = map_paths(folder, rows)
    if (folder / INDEX).is_file() or all((folder / path).is_file() for path in paths):
        log.info("%s already explained: skipped", name)
        return 0
    fitted = context.model(unit.fold, unit.run)
    index, slices = _predictions(context, config.explain, fitted.model, rows, fitted.classes)
    method, _ = _method(context, config, fitted.model, unit.fold, unit.run, rows)
    written = write_session_maps(context, config.explain, method, folder, rows, paths,
                                 (index if slices is None else slices).target_index.to_numpy(),
                                 name, progress)
    log.info("%s: %d map(s) written", name, written)
    return written


def map_file_name(folder: Path, stem: str) -> str:
    """``STEM.nii.gz``, or ``STEM.npy`` where an earlier version wrote that 2D map in ``folder``
    (a resumed fold/run keeps its maps)."""
    earlier = f"{stem}.npy"
    return earlier if (folder / earlier).is_file() else f"{stem}.nii.gz"


def _layer(method: Explainer, image_shape: tuple[int, ...], where: str) -> tuple[str, str, bool]:
    """Name, output grid (``4x5x4``) and coarseness of the layer ``method`` reads for images
    ``(C, *spatial)``; empty for a method that reads no layer. A coarse layer is a warning."""
    if not hasattr(method, "resolve_layer"):
        return "", "", False
    choice = method.resolve_layer(tuple(image_shape[1:]), image_shape[0])
    shape = "x".join(map(str, choice.shape))
    if choice.coarse:
        log.warning("%s: layer %s is %s voxels, coarser than %d along an axis: its maps are a "
                    "few blobs stretched over the image", where, choice.name, shape,
                    method.min_layer_size)
    return choice.name, shape, bool(choice.coarse)


def _predictions(context: RunContext, config: ExplainConfig, model: nn.Module,
                 rows: pd.DataFrame, classes: list[str]
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per session: ids, diagnosis, predicted class (a slice model's soft vote) and
    probabilities, and the class to explain; for a slice model the same per slice (with
    ``slice``), else None."""
    probabilities, slice_rows, slice_probabilities = context.predict(model, rows,
                                                                     config.batch_size)
    table = _targets(config, rows, probabilities, classes)
    if slice_rows is None or slice_probabilities is None:
        return table, None
    return table, _targets(config, slice_rows, slice_probabilities, classes)


def _targets(config: ExplainConfig, rows: pd.DataFrame, probabilities: np.ndarray,
             classes: list[str]) -> pd.DataFrame:
    predicted = probabilities.argmax(1)
    targets = np.array([resolve_target(config.target, classes, row.diagnosis, int(p),
                                       f"{row.participant_id} {row.session_id}")
                        for row, p in zip(rows.itertuples(), predicted)], dtype=np.int64)
    table = rows[IDS + (["slice"] if "slice" in rows else [])].reset_index(drop=True)
    table["target"] = [classes[t] for t in targets]
    table["target_index"] = targets
    table["predicted"] = [classes[p] for p in predicted]
    table["predicted_probability"] = probabilities[np.arange(len(rows)), predicted]
    table["target_probability"] = probabilities[np.arange(len(rows)), targets]
    table["correct"] = table.predicted == table.diagnosis
    return table


def _save(path: Path, values: np.ndarray, grid: Grid) -> None:
    """One map on ``grid`` (:func:`voxplain.run.maps.write_map`), with a PNG preview in 2D."""
    stem = str(path).removesuffix(".nii.gz").removesuffix(".npy")
    if values.ndim == 2:
        preview(Path(f"{stem}.png"), values)
    write_map(stem, values, grid)


def preview(path: Path, values: np.ndarray) -> None:
    """Grey-level PNG of a 2D map: 0 is black for non-negative maps, mid-grey for signed ones
    (scaled by the largest magnitude)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    scale = np.abs(values).max() or 1.0
    unit = values / scale if values.min() >= 0 else (values / scale + 1) / 2
    with atomic_path(path) as temporary:
        Image.fromarray(np.round(255 * unit).astype(np.uint8)).save(temporary, format="PNG")


def group_map(maps: list[np.ndarray], signed: bool) -> np.ndarray:
    """Mean of session maps: signed mean for a signed method, mean of ``|map|`` otherwise."""
    stack = np.stack(maps).astype(np.float64)
    return (stack if signed else np.abs(stack)).mean(0)


def _group_maps(run: RunFolder, folder: Path, index: pd.DataFrame, signed: bool, group: str,
                grid: Grid) -> None:
    """``group_<DIAGNOSIS>`` for every diagnosis with at least one session to average."""
    kept = index[index.correct] if group == "correct" else index
    for diagnosis in sorted(index.diagnosis.unique()):
        paths = kept.path[kept.diagnosis == diagnosis]
        if paths.empty:
            log.warning("%s: no correctly classified %s session: no group map", folder, diagnosis)
            continue
        values = group_map([read_map(folder / path) for path in paths], signed)
        _save(run.inside(folder / f"group_{diagnosis}"), values.astype(np.float32), grid)
