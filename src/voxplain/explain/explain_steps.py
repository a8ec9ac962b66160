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
    explanations/KEY/fold-K/run-R/sub-X_ses-Y.nii.gz   one map per session (2D: .npy + .png)
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

Resume: session maps already on disk are not recomputed; ``index.tsv`` is written last and marks
a fold/run as finished.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.progress import Progress
from torch import nn

from voxplain.config import DEFAULT_MIN_LAYER_SIZE, ExplainConfig, ExplainStepConfig
from voxplain.data.cohort import Cohort, load_images
from voxplain.data.grid import Grid
from voxplain.explain.api import METHODS, Explainer, explainer
from voxplain.explain.mask_steps import IDS, MaskContext, fold_models
from voxplain.io import atomic_path, save_map, write_json, write_tsv
from voxplain.models.layout import for_batches
from voxplain.models.serialization import load_model, read_model_json
from voxplain.run import FoldSkipped, RunFolder, cohort_label, each_fold
from voxplain.train.trainer import Dataset, predict_proba, resolve_device

log = logging.getLogger("voxplain")

INDEX = "index.tsv"


def explanation_key(config: ExplainStepConfig) -> str:
    """Folder name under ``explanations/``: the method, then every setting that changes the
    maps and differs from the default (layer, method options, target, group, cohort), e.g.
    ``grad_cam_layer-features.1.0.0``, ``integrated_gradients_n_steps-32_target-predicted``."""
    explain = config.explain
    key = explain.method
    if explain.layer is not None:
        key += f"_layer-{explain.layer}"
    elif explain.min_layer_size != DEFAULT_MIN_LAYER_SIZE and reads_layer(explain.method):
        key += f"_min_layer_size-{explain.min_layer_size}"
    key += "".join(f"_{name}-{value}" for name, value in sorted(explain.options.items()))
    if explain.target != "true":
        key += f"_target-{explain.target}"
    if explain.group != "correct":
        key += f"_group-{explain.group}"
    if config.cohort is not None:
        key += f"_cohort-{cohort_label(config.cohort)}"
    return key


def explanation_dir(run: RunFolder, key: str, fold: int | None = None,
                    run_index: int | None = None) -> Path:
    """``explanations/KEY`` or ``explanations/KEY/fold-K/run-R``."""
    folder = run.root / "explanations" / key
    return folder if fold is None else folder / f"fold-{fold}" / f"run-{run_index}"


def build_explainer(config: ExplainConfig, model: nn.Module,
                    cyce_folder: Path | None = None) -> Explainer:
    """The configured method on ``model``; options the method does not take are an error.

    ``cyce`` takes its generators from ``cyce_folder`` (the fold's ``RUN/cyce/fold-K/run-R``,
    trained by ``voxplain cyce train``) unless the ``generators`` option names a folder.
    """
    options: dict[str, Any] = {**config.options, "batch_size": config.batch_size}
    if config.method == "cyce" and cyce_folder is not None:
        options.setdefault("generators", cyce_folder)
    if config.layer is not None:
        options["layer"] = config.layer
    if reads_layer(config.method):
        options["min_layer_size"] = config.min_layer_size
    try:
        return explainer(config.method, model, **options)
    except TypeError as error:
        raise ValueError(f"method {config.method!r} does not take the options "
                         f"{sorted(options)} ({error})") from None


def reads_layer(method: str) -> bool:
    """Whether the method reads one layer's feature maps (the class activation maps)."""
    import voxplain.explain.methods  # noqa: F401  (fills METHODS)

    factory = METHODS.get(method)
    return factory is not None and "min_layer_size" in inspect.signature(factory).parameters


def explain_run(config: ExplainStepConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Explain every selected model of ``config.run``; returns the concatenated index tables.

    Raises:
        ValueError: an unknown method (the message lists the available ones), a layer the model
            does not have (the valid ones are listed), a run folder without trained models, a
            target class that is not a class of the model.
    """
    run = RunFolder(config.run)
    train = run.train_config()
    models = run.selected_models(config.folds)
    # fail before any loading or writing: unknown method, layer, option or target class
    first_fold, first_run, first_model = models[0]
    method = build_explainer(config.explain, load_model(first_model, "cpu")[0],
                             run.cyce_dir(first_fold, first_run))
    if config.explain.target not in ("true", "predicted"):
        for _, _, folder in models:
            class_index(config.explain.target, read_model_json(folder)["classes"])
    key = explanation_key(config)
    context = _context(run, train, config, progress)  # the cohort is checked before recording
    # batch size and evaluation do not change the maps: left out of the recorded settings so
    # that a resumed step may change them (None entries are not recorded)
    recorded = config.model_copy(update={
        "evaluate_against": None,
        "explain": config.explain.model_copy(update={"batch_size": None})})
    run.record_config(f"explain_{re.sub(r'[^A-Za-z0-9_-]', '-', key)}", recorded)
    write_json(explanation_dir(run, key) / "explanation.json", {
        "method": config.explain.method, "layer": config.explain.layer,
        "signed": bool(method.signed), "target": config.explain.target,
        "group": config.explain.group,
        "cohort": None if config.cohort is None else str(config.cohort)})
    indexes = each_fold(fold_models(context, config.folds), lambda fold, run_index, fitted:
                        explain_model(context, config, key, fold, run_index, fitted.model,
                                      fitted.classes, progress), f"explain {key}")
    return pd.concat(indexes, ignore_index=True)


def _context(run: RunFolder, train: Any, config: ExplainStepConfig,
             progress: Progress | None) -> MaskContext:
    """Images of the run's cohort (or of ``config.cohort``) on the training grid."""
    source = run.cohort_file if config.cohort is None else config.cohort
    cohort = Cohort.from_tsv(source)
    task = progress.add_task("loading cohort", total=len(cohort)) if progress else None
    stack = load_images(cohort, train.downsample,
                        run.cache_dir if train.cache == "disk" else None,
                        (lambda done, total: progress.update(task, completed=done))
                        if progress else None)
    run.check_training_grid(source, stack.array.shape[1:], stack.affine)
    spatial = list(stack.array.shape[2:])
    return MaskContext(run, train, cohort.table, stack.array,
                       Grid(tuple(spatial), stack.affine), resolve_device(config.device))


def sessions_to_explain(context: MaskContext, config: ExplainStepConfig,
                        fold: int) -> pd.DataFrame:
    """Rows of the cohort table (with ``image_index``): the fold's validation sessions, or the
    whole given cohort."""
    table = context.table.reset_index(names="image_index")
    if config.cohort is not None:
        return table
    validation = pd.read_csv(context.run.split_file(fold, "validation"), sep="\t", dtype=str)
    return table.merge(validation[IDS[:2]], on=IDS[:2]).reset_index(drop=True)


def class_index(target: int | str, classes: list[str]) -> int:
    """A class given by index or by name, checked against ``classes``."""
    if isinstance(target, int):
        if not 0 <= target < len(classes):
            raise ValueError(f"target class {target} is not an index of the classes {classes}")
        return target
    if target not in classes:
        raise ValueError(f"target {target!r} is neither true, predicted, nor a class of the "
                         f"model {classes}")
    return classes.index(target)


def session_target(target: int | str, classes: list[str], diagnosis: str, predicted: int,
                   where: str) -> int:
    """Class index explained for one session: its diagnosis (``true``), the model's
    prediction (``predicted``), or a fixed class."""
    if target == "predicted":
        return predicted
    if target == "true":
        if diagnosis not in classes:
            raise ValueError(f"{where}: diagnosis {diagnosis!r} is not a class of the model "
                             f"{classes}; explain it with --target predicted or a class")
        return classes.index(diagnosis)
    return class_index(target, classes)


def explain_model(context: MaskContext, config: ExplainStepConfig, key: str, fold: int,
                  run_index: int, model: nn.Module, classes: list[str],
                  progress: Progress | None = None) -> pd.DataFrame:
    """Maps, group maps and index of one fold/run (skipped when its index exists)."""
    folder = explanation_dir(context.run, key, fold, run_index)
    context.run.remove_leftovers(folder)
    if (folder / INDEX).is_file():
        log.info("%s fold %d run %d already explained: skipped", key, fold, run_index)
        return pd.read_csv(folder / INDEX, sep="\t", dtype={"participant_id": str,
                                                             "session_id": str})
    rows = sessions_to_explain(context, config, fold)
    if rows.empty:
        raise FoldSkipped("no session to explain")
    index = _predictions(context, config.explain, model, rows, classes)
    index.insert(3, "fold", fold)
    index.insert(4, "run", run_index)
    spatial_dims = context.images.ndim - 2
    model = for_batches(model, spatial_dims, config.explain.batch_size, context.device)
    method = build_explainer(config.explain, model, context.run.cyce_dir(fold, run_index))
    index["method"] = config.explain.method
    index["layer"], index["layer_shape"], index["layer_coarse"] = _layer(
        method, context.images.shape[1:], f"{key} fold {fold} run {run_index}")
    index["path"] = [f"{p}_{s}{'.nii.gz' if spatial_dims == 3 else '.npy'}"
                     for p, s in zip(rows.participant_id, rows.session_id)]
    missing = np.flatnonzero([not (folder / path).is_file() for path in index.path])
    task = (progress.add_task(f"{key} fold {fold} run {run_index}", total=len(rows),
                              completed=len(rows) - len(missing)) if progress else None)
    step = config.explain.batch_size
    for start in range(0, len(missing), step):
        chunk = missing[start:start + step]
        x = torch.from_numpy(np.ascontiguousarray(
            context.images[rows.image_index.to_numpy()[chunk]]))
        maps = method.explain(x, torch.as_tensor(index.target_index.to_numpy()[chunk]))
        for row, values in zip(chunk, maps[:, 0].cpu().numpy()):
            _save(context.run.inside(folder / index.path[row]), values, context.grid.affine)
        if progress is not None and task is not None:
            progress.advance(task, len(chunk))
    _group_maps(context.run, folder, index, bool(method.signed), config.explain.group,
                context.grid.affine)
    write_tsv(folder / INDEX, index.drop(columns="target_index"))
    return index.drop(columns="target_index")


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


def _predictions(context: MaskContext, config: ExplainConfig, model: nn.Module,
                 rows: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Ids, diagnosis, predicted class and probabilities, and the class to explain per row."""
    data = Dataset(rows, context.images, np.zeros(len(rows), dtype=np.int64))
    probabilities, _ = predict_proba(model, data, config.batch_size, context.device)
    predicted = probabilities.argmax(1)
    targets = np.array([session_target(config.target, classes, row.diagnosis, int(p),
                                       f"{row.participant_id} {row.session_id}")
                        for row, p in zip(rows.itertuples(), predicted)], dtype=np.int64)
    table = rows[IDS].copy()
    table["target"] = [classes[t] for t in targets]
    table["target_index"] = targets
    table["predicted"] = [classes[p] for p in predicted]
    table["predicted_probability"] = probabilities[np.arange(len(rows)), predicted]
    table["target_probability"] = probabilities[np.arange(len(rows)), targets]
    table["correct"] = table.predicted == table.diagnosis
    return table


def _save(path: Path, values: np.ndarray, affine: np.ndarray) -> None:
    """One map: NIfTI with the grid's affine (3D), or NPY plus a PNG preview (2D)."""
    stem = str(path).removesuffix(".nii.gz").removesuffix(".npy")
    if values.ndim == 2:
        preview(Path(f"{stem}.png"), values)
    save_map(stem, values, affine)


def preview(path: Path, values: np.ndarray) -> None:
    """Grey-level PNG of a 2D map: 0 is black for non-negative maps, mid-grey for signed ones
    (scaled by the largest magnitude)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    scale = np.abs(values).max() or 1.0
    unit = values / scale if values.min() >= 0 else (values / scale + 1) / 2
    with atomic_path(path) as temporary:
        Image.fromarray(np.round(255 * unit).astype(np.uint8)).save(temporary, format="PNG")


def read_map(path: Path) -> np.ndarray:
    """A map written by this step (NIfTI or NPY) as float64."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float64)
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def group_map(maps: list[np.ndarray], signed: bool) -> np.ndarray:
    """Mean of session maps: signed mean for a signed method, mean of ``|map|`` otherwise."""
    stack = np.stack(maps)
    return (stack if signed else np.abs(stack)).mean(0)


def _group_maps(run: RunFolder, folder: Path, index: pd.DataFrame, signed: bool, group: str,
                affine: np.ndarray) -> None:
    """``group_<DIAGNOSIS>`` for every diagnosis with at least one session to average."""
    kept = index[index.correct] if group == "correct" else index
    for diagnosis in sorted(index.diagnosis.unique()):
        paths = kept.path[kept.diagnosis == diagnosis]
        if paths.empty:
            log.warning("%s: no correctly classified %s session: no group map", folder, diagnosis)
            continue
        values = group_map([read_map(folder / path) for path in paths], signed)
        _save(run.inside(folder / f"group_{diagnosis}"), values.astype(np.float32), affine)
