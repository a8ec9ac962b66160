"""Per-session probabilities of every model of a run folder on a cohort (``voxplain predict``)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import PredictConfig
from voxplain.data.cohort import Cohort, encode_labels
from voxplain.evaluate.classification import classification_metrics
from voxplain.io import write_tsv
from voxplain.run import RunFolder, cohort_label
from voxplain.steps.context import load_context
from voxplain.train.trainer import Dataset, predict_proba, prediction_table

log = logging.getLogger("voxplain")


def run_predict(config: PredictConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Classify every session of ``config.cohort`` with every trained model of ``config.run``.

    Returns (and writes to ``config.out``, default :meth:`RunFolder.predictions_file`) one row per
    session and model: ids, diagnosis, ``fold``, ``run``, ``proba_CLASS``, ``predicted``. When
    the cohort's diagnoses are all known classes, metrics per model are logged.

    Raises:
        RunFolderError: the cohort's images, after the run's downsampling, are not on the grid
            the models were trained on (shape, channels or affine).
    """
    run = RunFolder(config.run)
    train = run.train_config()
    cohort = Cohort.from_tsv(config.cohort, train.diagnosis_column, config.caps, train.caps_group)
    context = load_context(run, config.device, progress, cohort)
    run.record_config(f"predict_{cohort_label(config.cohort)}", config, replace=True)
    data = Dataset(cohort.table.assign(image_index=np.arange(len(cohort))), context.images,
                   np.zeros(len(cohort), dtype=np.int64))
    tables = []
    for fold, run_index, fitted in context.models(None):
        classes = fitted.classes
        probabilities, _ = predict_proba(fitted.model, data, config.batch_size, context.device)
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
    out = config.out or run.predictions_file(config.cohort)
    write_tsv(out, predictions)
    log.info("predictions of %d model(s) on %d session(s) written to %s", len(tables),
             len(cohort), out)
    return predictions
