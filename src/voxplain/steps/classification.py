"""``voxplain evaluate classification``: metrics with bootstrap CIs of every model of a run
folder (:func:`voxplain.evaluate.classification.cross_validation_metrics`), their confusion
matrices per fold and averaged over folds (paper 2, fig. 3), and for slice models (prediction
tables with a ``slice`` column, paper 2, 3.5) the misclassified slices of every session
(:mod:`voxplain.evaluate.slices`).

Writes ``RUN/evaluation/classification.tsv`` and ``confusion.tsv`` (for slice models: of the
sessions' soft votes, and ``classification-slices.tsv``, ``confusion-slices.tsv``,
``slices.tsv``, ``misclassified_slices.tsv`` from the per-slice predictions
``predictions-SUBSET-slices.tsv``, or from ``predictions-SUBSET.tsv`` when it has a ``slice``
column); records its settings as ``[evaluate_classification]`` (replaced at each run: the
outputs are rewritten whole).

With ``cohort`` (another cohort the run's models classified with ``voxplain predict``: an
external test set), the same tables of ``predictions/LABEL.tsv``, one model per fold/run, go to
``RUN/evaluation/cohort-LABEL/`` (settings in ``[evaluate_classification_cohort-LABEL]``).
"""

from __future__ import annotations

import logging

import pandas as pd
from rich.progress import Progress

from voxplain.config import ClassificationEvaluationConfig
from voxplain.evaluate.classification import confusion_matrices, cross_validation_metrics
from voxplain.evaluate.slices import misclassified_slices, slice_summary
from voxplain.io import read_tsv, write_tsv
from voxplain.run import COHORT_PREFIX, RunFolder, RunFolderError, cohort_label, fold_run_files

log = logging.getLogger("voxplain")

__all__ = ["cohort_classification", "run_classification"]


def run_classification(config: ClassificationEvaluationConfig,
                       progress: Progress | None = None) -> pd.DataFrame:
    """Metrics of the predictions ``models/fold-K/run-R/predictions-SUBSET.tsv``; returns the
    table written to ``evaluation/classification.tsv``.

    Raises:
        RunFolderError: no model of the run folder has a ``predictions-SUBSET.tsv``.
    """
    run = RunFolder(config.run)
    if config.cohort is not None:
        return cohort_classification(run, config)
    found = fold_run_files(run.root / "models", f"predictions-{config.subset}.tsv")
    if not found:
        raise RunFolderError(f"{run.root}: no models/fold-K/run-R/predictions-{config.subset}.tsv "
                             "(run `voxplain train` first)")
    run.record_config("evaluate_classification", config, replace=True)
    predictions = {(fold, index): read_tsv(path) for fold, index, path in found}
    sources = {(f, r): str(p) for f, r, p in found}
    table = cross_validation_metrics(predictions, config.n_boot, config.seed, config.level,
                                     positive=config.positive, sources=sources)
    write_tsv(run.evaluation_file("classification.tsv"), table)
    write_tsv(run.evaluation_file("confusion.tsv"), confusion_matrices(predictions, sources))
    found = fold_run_files(run.root / "models", f"predictions-{config.subset}-slices.tsv")
    if found:  # a slice model: the tables above are the soft votes, these every slice
        per_slice = {(fold, index): read_tsv(path) for fold, index, path in found}
        sources = {(f, r): str(p) for f, r, p in found}
        write_tsv(run.evaluation_file("classification-slices.tsv"), cross_validation_metrics(
            per_slice, config.n_boot, config.seed, config.level, positive=config.positive,
            sources=sources))
        write_tsv(run.evaluation_file("confusion-slices.tsv"),
                  confusion_matrices(per_slice, sources))
        predictions = per_slice
    if all("slice" in frame.columns for frame in predictions.values()):
        slices = pd.concat([frame.assign(fold=fold, run=index)
                            for (fold, index), frame in predictions.items()], ignore_index=True)
        write_tsv(run.evaluation_file("slices.tsv"), slice_summary(slices))
        write_tsv(run.evaluation_file("misclassified_slices.tsv"), misclassified_slices(slices))
        log.info("slice models: misclassified slices per session in %s",
                 run.evaluation_file("slices.tsv"))
    return table


def cohort_classification(run: RunFolder, config: ClassificationEvaluationConfig) -> pd.DataFrame:
    """Metrics with CIs and confusion matrices of every model on ``config.cohort``, from
    ``predictions/LABEL.tsv`` (its ``fold`` and ``run`` columns name the models), written to
    ``evaluation/cohort-LABEL/{classification,confusion}.tsv``; returns the metrics.

    Raises:
        RunFolderError: the cohort has no predictions yet, or they lack fold/run columns.
    """
    path = run.predictions_file(config.cohort)
    if not path.is_file():
        raise RunFolderError(f"{path}: no predictions of {config.cohort} (run `voxplain predict "
                             f"--run {run.root} --cohort {config.cohort}` first)")
    table = read_tsv(path)
    missing = {"fold", "run"} - set(table.columns)
    if missing:
        raise RunFolderError(f"{path}: needs columns fold and run (missing {sorted(missing)})")
    label = cohort_label(config.cohort)
    run.record_config(f"evaluate_classification_{COHORT_PREFIX}{label}", config, replace=True)
    predictions = {(int(fold), int(index)): rows.drop(columns=["fold", "run"])
                   for (fold, index), rows in table.groupby(["fold", "run"], sort=True)}
    sources = {key: f"{path} (fold {key[0]} run {key[1]})" for key in predictions}
    metrics = cross_validation_metrics(predictions, config.n_boot, config.seed, config.level,
                                       positive=config.positive, sources=sources)
    out = run.evaluation_dir / f"{COHORT_PREFIX}{label}"
    write_tsv(out / "classification.tsv", metrics)
    write_tsv(out / "confusion.tsv", confusion_matrices(predictions, sources))
    log.info("metrics of %d model(s) on %s written to %s", len(predictions), config.cohort, out)
    return metrics
