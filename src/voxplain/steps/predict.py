"""Per-session probabilities of every model of a run folder on a cohort (``voxplain predict``)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import ClassificationEvaluationConfig, PredictConfig
from voxplain.data.cohort import Cohort, encode_labels
from voxplain.evaluate.classification import classification_metrics
from voxplain.io import write_tsv
from voxplain.run import RunFolder, cohort_label
from voxplain.steps.classification import cohort_classification
from voxplain.steps.context import load_context
from voxplain.train.trainer import prediction_table

log = logging.getLogger("voxplain")


def run_predict(config: PredictConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Classify every session of ``config.cohort`` with every trained model of ``config.run``.

    Returns (and writes to ``config.out``, default :meth:`RunFolder.predictions_file`) one row per
    session and model: ids, diagnosis, ``fold``, ``run``, ``proba_CLASS``, ``predicted``. When
    the cohort's diagnoses are all known classes, metrics per model are logged and, without
    ``config.out``, written with bootstrap CIs to ``evaluation/cohort-LABEL/``
    (:func:`~voxplain.steps.classification.cohort_classification`).

    Raises:
        RunFolderError: the cohort's images, after the run's downsampling, are not on the grid
            the models were trained on (shape, channels or affine).
    """
    run = RunFolder(config.run)
    train = run.train_config()
    cohort = Cohort.from_tsv(config.cohort, train.diagnosis_column, config.caps, train.caps_group,
                             train.sequences)
    context = load_context(run, config.device, progress, cohort)
    run.record_config(f"predict_{cohort_label(config.cohort)}", config, replace=True)
    rows = cohort.table.assign(image_index=np.arange(len(cohort)))
    tables, slice_tables = [], []
    for fold, run_index, fitted in context.models(None):
        classes = fitted.classes
        probabilities, slices, slice_probabilities = context.predict(fitted.model, rows,
                                                                     config.batch_size)
        for table, out in ((prediction_table(rows, probabilities, classes), tables),
                           *([] if slices is None else
                             [(prediction_table(slices, slice_probabilities, classes),
                               slice_tables)])):
            table.insert(3, "fold", fold)
            table.insert(4, "run", run_index)
            out.append(table)
        if set(cohort.table["diagnosis"]) <= set(classes):
            scores = classification_metrics(encode_labels(cohort.table, classes, cohort.source),
                                            probabilities)
            log.info("fold %d run %d: balanced accuracy %.3f on %s", fold, run_index,
                     scores["balanced_accuracy"], config.cohort)
    predictions = pd.concat(tables, ignore_index=True)
    out = config.out or run.predictions_file(config.cohort)
    write_tsv(out, predictions)
    if slice_tables:  # a slice model: the soft vote above, every slice beside it
        write_tsv(out.with_name(out.name.removesuffix(".tsv") + "-slices.tsv"),
                  pd.concat(slice_tables, ignore_index=True))
    log.info("predictions of %d model(s) on %d session(s) written to %s", len(tables),
             len(cohort), out)
    if config.out is None and set(cohort.table["diagnosis"]) <= set(classes):
        cohort_classification(run, ClassificationEvaluationConfig(run=run.root,
                                                                  cohort=config.cohort))
    return predictions
