"""Per-session probabilities of every model of a run folder on a cohort (``voxplain predict``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import PredictConfig
from voxplain.data.cohort import Cohort, CohortError, encode_labels, load_images
from voxplain.evaluate.classification import classification_metrics
from voxplain.io import write_tsv
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder, cohort_label
from voxplain.train.trainer import Dataset, predict_proba, prediction_table, resolve_device

log = logging.getLogger("voxplain")


def predict_cohort(config: PredictConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Classify every session of ``config.cohort`` with every trained model of ``config.run``.

    Returns (and writes to ``config.out``, default :func:`predictions_file`) one row per
    session and model: ids, diagnosis, ``fold``, ``run``, ``proba_CLASS``, ``predicted``. When
    the cohort's diagnoses are all known classes, metrics per model are logged.

    Raises:
        RunFolderError: the cohort's images, after the run's downsampling, are not on the grid
            the models were trained on (shape, channels or affine).
    """
    run = RunFolder(config.run)
    train = run.train_config()
    models = run.model_dirs()
    cohort = Cohort.from_tsv(config.cohort, train.diagnosis_column, config.caps, train.caps_group)
    task = progress.add_task("loading cohort", total=len(cohort)) if progress else None
    stack = load_images(cohort, train.downsample, progress=(
        lambda done, total: progress.update(task, completed=done)) if progress else None)
    run.check_training_grid(config.cohort, stack.array.shape[1:], stack.affine)
    device = resolve_device(config.device)
    data = Dataset(cohort.table.assign(image_index=np.arange(len(cohort))), stack.array,
                   np.zeros(len(cohort), dtype=np.int64))
    tables = []
    for fold, run_index, folder in models:
        model, description = load_model(folder, device)
        expected = description["model"]["input_shape"]
        if list(stack.array.shape[2:]) != expected:
            raise CohortError(f"{config.cohort}: images are {tuple(stack.array.shape[2:])} after "
                              f"downsampling by {train.downsample}; the model expects "
                              f"{tuple(expected)}")
        classes = description["classes"]
        probabilities, _ = predict_proba(model, data, config.batch_size, device)
        table = prediction_table(data, probabilities, classes)
        table.insert(3, "fold", fold)
        table.insert(4, "run", run_index)
        tables.append(table)
        if set(cohort.table["diagnosis"]) <= set(classes):
            scores = classification_metrics(encode_labels(cohort.table, classes, cohort.source),
                                            probabilities)
            log.info("fold %d run %d: balanced accuracy %.3f on %s", fold, run_index,
                     scores["balanced_accuracy"], config.cohort)
    predictions = pd.concat(tables, ignore_index=True)
    out = config.out or predictions_file(run, config.cohort)
    write_tsv(out, predictions)
    log.info("predictions of %d model(s) on %d session(s) written to %s", len(tables),
             len(cohort), out)
    return predictions


def predictions_file(run: RunFolder, cohort: Path) -> Path:
    """``RUN/predictions/LABEL.tsv`` with :func:`~voxplain.run.cohort_label`: two cohorts both
    called ``cohort.tsv`` never write to the same file (and the same cohort always does)."""
    return run.root / "predictions" / f"{cohort_label(cohort)}.tsv"
