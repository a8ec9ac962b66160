"""``voxplain train``: cross-validated training of a cohort into a run folder (paper 1, 2.2).

Reads and checks the cohort (quality check of paper 1, 2.3.1), writes ``cohort.tsv``,
``qc_rejected.tsv``, ``grid.json`` and the subject-level splits, then trains every fold x run
with :func:`voxplain.train.trainer.train_fold` into ``models/fold-K/run-R``; finished models
are skipped, an interrupted one resumes from its epoch checkpoint. Each fold x run is a unit of
:mod:`voxplain.run.executor` (:class:`FoldTraining`, :func:`train_unit`): in this process or as
a Ray task (``executor``), which prepares the cohort once per worker.

Splits: k-fold (``splits/fold-K/{train,validation}.tsv``) or repeated random splits
(``--split random``: ``fold-K`` is the K-th split, with a ``test.tsv`` too). Slice models
(``--slice-axis``, paper 2): the volumes are cut into the slices of a :class:`SliceView`
(recorded in ``grid.json`` under ``slices``: axis, kept indices, resize), every slice of a
subset's sessions is a sample, and the split files stay per session (a subject's slices are
never in two subsets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import ModelConfig, TrainConfig
from voxplain.data.cohort import (Cohort, CohortError, ImageStack, class_counts, class_names,
                                  encode_labels, load_images, quality_check)
from voxplain.data.slicing import SliceView, foreground_slices, slice_axis_index
from voxplain.io import read_tsv, write_json, write_tsv
from voxplain.models.checkpoint import remove_checkpoint
from voxplain.models.device import resolve_device
from voxplain.run import RunFolder, Unit, fold_unit_name, map_fold_units
from voxplain.run.executor import ProcessShared, with_absolute_paths
from voxplain.steps.context import IDS, progress_callback
from voxplain.train.splits import Fold, baseline_sessions, random_splits, subject_folds
from voxplain.train.trainer import Dataset, slice_rows, train_fold

log = logging.getLogger("voxplain")

SPLIT_COLUMNS = IDS


@dataclass(frozen=True)
class PreparedCohort:
    """The training cohort after its checks: kept sessions, decoded images, classes, and the
    sessions rejected by the quality check."""

    cohort: Cohort
    stack: ImageStack
    classes: list[str]
    rejected: pd.DataFrame


def prepare_cohort(config: TrainConfig, run: RunFolder, progress: Progress | None) -> PreparedCohort:
    """Read, check, load and quality-check the training cohort; nothing is written to the run
    folder (but the image cache), so a cohort that fails its checks leaves no record."""
    cohort = Cohort.from_tsv(config.cohort, config.diagnosis_column, config.caps, config.caps_group,
                             config.sequences)
    stack = _load(cohort, config, run, progress, "training cohort")
    table = cohort.table.assign(image_index=np.arange(len(cohort)), max_value=stack.maxima)
    passed = quality_check(stack.maxima, _qc_threshold(config, cohort))
    rejected = table.loc[~passed, [*SPLIT_COLUMNS, "path", "max_value"]].sort_values("max_value")
    kept = Cohort(table[passed].reset_index(drop=True), cohort.source, cohort.image_shape,
                  cohort.affine)
    if kept.table.empty:
        raise CohortError(f"{config.cohort}: every session was rejected by the quality check")
    classes = config.classes or class_names(kept.table["diagnosis"])
    present = set(kept.table["diagnosis"])
    if len(present) < 2:
        raise CohortError(f"{config.cohort}: only one diagnosis ({present.pop()}) in the cohort; "
                          "a classifier needs two")
    kept.labels(classes)  # raises on diagnoses outside the classes
    counts = class_counts(kept.table, classes)
    log.info("classes (sessions): %s", ", ".join(f"{name} {n}" for name, n in counts.items()))
    return PreparedCohort(kept, stack, classes, rejected)


def write_cohort_tables(config: TrainConfig, run: RunFolder, prepared: PreparedCohort,
                        view: SliceView | None = None) -> None:
    """``cohort.tsv`` (kept sessions), ``qc_rejected.tsv`` and ``grid.json`` (the images' grid
    after downsampling: spatial shape, affine, channels; and the slices a slice model reads)."""
    write_tsv(run.qc_rejected_file, prepared.rejected)
    if len(prepared.rejected):
        log.warning("quality check: %d session(s) with maximum < %s rejected (%s)",
                    len(prepared.rejected), config.qc_threshold, run.qc_rejected_file)
    write_tsv(run.cohort_file, prepared.cohort.table.drop(columns="image_index"))
    write_json(run.grid_file, {"shape": list(prepared.stack.array.shape[2:]),
                               "channels": int(prepared.stack.array.shape[1]),
                               "affine": np.asarray(prepared.stack.affine).tolist(),
                               **({"slices": view.record()} if view else {})})


def slice_view(config: TrainConfig, stack: ImageStack, rows: pd.DataFrame) -> SliceView | None:
    """The slices a slice model reads (None without ``slice_axis``): the axis found from the
    affine, ``slice_range`` or the slices holding brain in the mean image of ``rows``."""
    if config.slice_axis == "none":
        return None
    if stack.array.ndim != 5:
        raise CohortError(f"{config.cohort}: --slice-axis cuts 3D volumes; the images are 2D")
    axis = slice_axis_index(config.slice_axis, stack.affine)
    extent = stack.array.shape[2 + axis]
    if config.slice_range is not None:
        first, last = config.slice_range
        if last >= extent:
            raise CohortError(f"{config.cohort}: slice range {first}-{last} leaves the "
                              f"{extent} {config.slice_axis} slices of the training grid")
        indices = list(range(first, last + 1))
    else:
        mean = np.zeros(stack.array.shape[2:])
        for index in rows["image_index"]:
            mean += np.asarray(stack.array[index], dtype=np.float64).mean(0)
        indices = foreground_slices(mean, axis, config.slice_min_foreground)
    view = SliceView(axis, tuple(indices), tuple(stack.array.shape[2:]),  # type: ignore[arg-type]
                     config.slice_size)
    log.info("%s slices %d-%d of %d (voxel axis %d), %s per slice", config.slice_axis,
             indices[0], indices[-1], extent, axis, "x".join(map(str, view.slice_shape)))
    return view


def splits(config: TrainConfig, table: pd.DataFrame) -> list[Fold]:
    """The subject-level folds of ``config.split``."""
    if config.split == "random":
        return random_splits(table, config.n_folds, config.split_fractions, config.split_seed)
    return subject_folds(table, config.n_folds, config.split_seed)


def _sliced(fold: Fold, view: SliceView | None) -> Fold:
    if view is None:
        return fold
    return Fold(fold.index, slice_rows(fold.train, view), slice_rows(fold.validation, view),
                None if fold.test is None else slice_rows(fold.test, view))


def _qc_threshold(config: TrainConfig, cohort: Cohort) -> float | None:
    """The paper-1 check is defined on GM probability maps, i.e. volumes, not on 2D images."""
    return config.qc_threshold if cohort.spatial_dims == 3 else None


def _load(cohort: Cohort, config: TrainConfig, run: RunFolder, progress: Progress | None,
          what: str) -> ImageStack:
    cache = run.cache_dir if config.cache == "disk" else None
    return load_images(cohort, config.downsample, cache,
                       progress_callback(progress, f"loading {what}", len(cohort)))


def run_train(config: TrainConfig, progress: Progress | None = None, *,
              folds: Sequence[int] | None = None,
              prepared: PreparedCohort | None = None) -> pd.DataFrame:
    """Train every fold x run of ``config``; return (and write) the metrics of every model.

    ``folds`` trains only those folds of the ``n_folds`` splits (all split files are written);
    ``prepared`` reuses a cohort already read by :func:`prepare_cohort` with the same settings
    (a search trains many run folders from one cohort, :mod:`voxplain.steps.search`).

    Returns one row per fold, run and evaluated subset (validation, test) with the metrics of
    :func:`~voxplain.evaluate.classification.classification_metrics`.

    A run folder of imported models (``voxplain import``: its ``[train]`` section describes
    them) is left as it is, so that replaying its ``config.toml`` never replaces their splits.
    """
    run = RunFolder(config.run)
    if any(section.startswith("import_") for section in run.read_config()):
        run.record_config("train", config)  # other settings: an error naming them
        log.info("%s: models imported by `voxplain import`: nothing to train", run.root)
        return read_tsv(run.evaluation_file("cross_validation.tsv"))
    inputs = prepare_training(config, progress, prepared)
    unknown = sorted(set(folds or ()) - {fold.index for fold in inputs.folds})
    if unknown:
        raise ValueError(f"folds {unknown} do not exist: the run has {len(inputs.folds)} splits")
    # recorded once the inputs are known to be usable: a failed command leaves no record that
    # would refuse the corrected one; a resumed run is checked before anything is rewritten
    run.record_config("train", config)
    for folder in (run.root / "models", run.root / "splits", run.evaluation_dir):
        run.remove_leftovers(folder)
    write_cohort_tables(config, run, inputs.prepared, inputs.view)
    for fold in inputs.folds:
        for subset in ("train", "validation", "test"):
            if getattr(fold, subset) is not None:
                write_tsv(run.split_file(fold.index, subset), getattr(fold, subset)[SPLIT_COLUMNS])
    shipped = with_absolute_paths(config)
    units = [Unit(fold_unit_name(fold.index, run_index),
                  FoldTraining(shipped, fold.index, run_index))
             for fold in inputs.folds if folds is None or fold.index in folds
             for run_index in range(config.runs)]
    with _PREPARED.sharing(shipped, Path(shipped.cohort), inputs):  # for the units run here
        map_fold_units(units, partial(train_unit, progress=progress if config.executor.kind
                                      == "local" else None), config.executor, "train", progress)
    summary = pd.concat([read_tsv(folder / "metrics.tsv") for _, _, folder in run.model_dirs()],
                        ignore_index=True)
    write_tsv(run.evaluation_file("cross_validation.tsv"), summary)
    return summary


@dataclass(frozen=True)
class TrainingInputs:
    """What every fold/run's training reads: the checked cohort, its splits, the images the
    models take (volumes, images or slices), the model's settings completed from the data, the
    slices read (None for whole images) and the test set of ``config.test``."""

    prepared: PreparedCohort
    folds: list[Fold]
    images: np.ndarray
    model: ModelConfig
    view: SliceView | None
    test: Dataset | None


def prepare_training(config: TrainConfig, progress: Progress | None = None,
                     prepared: PreparedCohort | None = None) -> TrainingInputs:
    """Read and check the cohort (or take ``prepared``), split it, and find what the models
    take; nothing is written to the run folder (but the image cache)."""
    run = RunFolder(config.run)
    prepared = prepared or prepare_cohort(config, run, progress)
    cohort, stack, classes = prepared.cohort, prepared.stack, prepared.classes
    if config.split == "random" and config.test is not None:
        raise CohortError(f"{config.test}: random splits hold out their own test subjects; "
                          "classify another cohort with `voxplain predict` instead")
    folds = splits(config, cohort.table)
    view = slice_view(config, stack, cohort.table)
    test = _test_dataset(config, run, cohort, classes, progress, view)
    images = stack.array if view is None else view.to_slices(stack.array).numpy()
    model_config = config.model.model_copy(update={
        "in_channels": cohort.image_shape[0], "n_classes": len(classes),
        "input_shape": list(images.shape[2:])})
    return TrainingInputs(prepared, folds, images, model_config, view, test)


@dataclass(frozen=True)
class FoldTraining:
    """One unit of training (:mod:`voxplain.run.executor`): the model of fold ``fold``, run
    ``run``. Small and picklable: a Ray worker prepares the inputs itself."""

    config: TrainConfig
    fold: int
    run: int


#: The :class:`TrainingInputs` of this process (one set at a time).
_PREPARED: ProcessShared[TrainingInputs] = ProcessShared()


def train_unit(unit: FoldTraining, progress: Progress | None = None) -> None:
    """Train ``models/fold-K/run-R`` (resuming from its checkpoint), skipped when trained;
    here or in a Ray task, which prepares the inputs once per worker."""
    config = unit.config
    folder = RunFolder(config.run).model_dir(unit.fold, unit.run)
    if (folder / "metrics.tsv").is_file():
        log.info("fold %d run %d already trained: skipped", unit.fold, unit.run)
        remove_checkpoint(folder)  # left by a kill between metrics.tsv and its removal
        return
    inputs = _PREPARED.get(config, Path(config.cohort), lambda: prepare_training(config))
    fold = next(fold for fold in inputs.folds if fold.index == unit.fold)
    classes = inputs.prepared.classes
    train_fold(config, inputs.model, classes, _sliced(fold, inputs.view), unit.run, inputs.images,
               folder, resolve_device(config.device),
               inputs.test or _fold_test(fold, inputs.view, inputs.images, classes, config),
               progress)


def _fold_test(fold: Fold, view: SliceView | None, images: np.ndarray, classes: list[str],
               config: TrainConfig) -> Dataset | None:
    """The test subjects of a random split (None for k-fold)."""
    if fold.test is None:
        return None
    table = fold.test if view is None else slice_rows(fold.test, view)
    return Dataset(table, images, encode_labels(table, classes, config.cohort))


def _test_dataset(config: TrainConfig, run: RunFolder, cohort: Cohort, classes: list[str],
                  progress: Progress | None, view: SliceView | None = None) -> Dataset | None:
    if config.test is None:
        return None
    test = Cohort.from_tsv(config.test, config.diagnosis_column, config.caps, config.caps_group,
                           config.sequences)
    if test.image_shape != cohort.image_shape or not np.allclose(test.affine, cohort.affine,
                                                                  atol=1e-4):
        raise CohortError(f"{config.test}: images have shape {test.image_shape[1:]} and affine "
                          f"differing from the training cohort's {cohort.image_shape[1:]}")
    shared = set(test.table.participant_id) & set(cohort.table.participant_id)
    if shared:
        log.warning("%s: %d test subject(s) are also in the training cohort (e.g. %s); test "
                    "metrics will be optimistic", config.test, len(shared), sorted(shared)[0])
    stack = _load(test, config, run, progress, "test cohort")
    passed = quality_check(stack.maxima, _qc_threshold(config, test))
    table = test.table.assign(image_index=np.arange(len(test)))[passed]
    table = baseline_sessions(table).reset_index(drop=True)
    if view is not None:
        return Dataset(slice_rows(table, view), view.to_slices(stack.array).numpy(),
                       encode_labels(slice_rows(table, view), classes, config.test))
    return Dataset(table, stack.array, encode_labels(table, classes, config.test))
