"""Classification metrics with bootstrap confidence intervals (paper 1, 2.2 and 3; paper 3, 3.3
and table 1).

Definitions, from the confusion counts TP, FP, FN, TN (class index 1 is positive, e.g. AD in
[CN, AD]; the second ``proba_`` column of a prediction table):

=================  ============================================
accuracy           (TP + TN) / N
sensitivity        TP / (TP + FN)            (recall, TPR)
specificity        TN / (TN + FP)            (TNR)
balanced_accuracy  (sensitivity + specificity) / 2   (paper 1's model-selection criterion)
ppv                TP / (TP + FP)            (precision)
npv                TN / (TN + FN)
f1                 2 TP / (2 TP + FP + FN)
informedness       sensitivity + specificity - 1     (Youden's J)
markedness         ppv + npv - 1
mcc                (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor of
                   the denominator is 0 (scikit-learn's convention)
auc                area under the ROC curve of the positive-class score (ties count 1/2)
=================  ============================================

A ratio with a zero denominator is NaN. With K > 2 classes every metric except accuracy, mcc and
auc is the unweighted mean over classes of its one-vs-rest value (classes whose value is
undefined are left out of the mean), mcc is the K-class generalisation (Gorodkin 2004, as
scikit-learn) and auc the one-vs-rest macro average. Balanced accuracy is the mean recall of the
classes present in ``y_true`` (NaN with fewer than two).

Bootstrap (:func:`bootstrap_metrics`): resamples are stratified by true class (each class keeps
its size, as when the class sizes of a validation set are fixed by design), the interval is the
percentile interval of the resampled values. A resample where a metric is undefined (e.g. no
positive prediction, so no PPV) gives NaN; the interval is taken over the resamples where the
metric is defined and ``n_valid`` reports how many there were. Stratification keeps every class
present, so sensitivity, specificity and AUC are defined in every resample.

Every metric is computed from per-resample confusion matrices and a rank form of the AUC, so the
point estimate and 1000 resamples share one vectorised code path.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats


METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv",
           "informedness", "markedness", "mcc", "auc")
#: resamples x samples handled at once by the bootstrap (bounds its memory to ~40 MB).
_CHUNK_ELEMENTS = 5_000_000


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           y_score: np.ndarray | None = None, *,
                           n_classes: int | None = None) -> dict[str, float]:
    """The metrics of the module docstring for one set of predictions.

    Args:
        y_true: ``(N,)`` true class indices.
        y_pred: ``(N,)`` predicted class indices; or ``(N, K)`` class probabilities when
            ``y_score`` is omitted (then ``y_pred = argmax``, ``y_score`` = the probabilities).
        y_score: ``(N,)`` score of class 1 (binary) or ``(N, K)`` class probabilities; without
            it ``auc`` is NaN.
        n_classes: K (default: from ``y_score``'s columns, else the largest label + 1, at least 2).

    Returns:
        ``{"n": N, "accuracy": ..., ..., "auc": ...}`` in the order of :data:`METRICS`.
    """
    y_true, y_pred, y_score, k = _check(y_true, y_pred, y_score, n_classes)
    weights = np.ones((1, len(y_true)))
    values = _weighted_metrics(y_true, y_pred, y_score, k, weights)
    return {"n": float(len(y_true)), **{name: float(values[name][0]) for name in METRICS}}


def chance_p_value(y_true: np.ndarray, y_pred: np.ndarray, n_resamples: int = 9999,
                   seed: int = 0) -> float:
    """One-sided permutation p-value of the balanced accuracy against chance.

    H0: the predictions carry no information on the true classes. The true labels are permuted
    against the fixed predictions (:func:`scipy.stats.permutation_test`, ``pairings``; exact when
    ``n_resamples`` covers every permutation) and the p-value is the share of permutations whose
    balanced accuracy is at least the observed one. A model whose validation balanced accuracy
    has ``p > 0.05`` cannot be told from one that learned nothing.

    Args:
        y_true, y_pred: ``(N,)`` true and predicted class indices.
        n_resamples: permutations drawn (seeded by ``seed``).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    if len(classes) < 2:
        return float("nan")
    hits = [y_pred == c for c in classes]
    sizes = [(y_true == c).sum() for c in classes]

    def balanced_accuracy(labels: np.ndarray, axis: int = -1) -> np.ndarray:
        recalls = [((labels == c) & hit).sum(axis) / size
                   for c, hit, size in zip(classes, hits, sizes)]
        return np.mean(recalls, axis=0)

    result = stats.permutation_test((y_true,), balanced_accuracy, permutation_type="pairings",
                                    vectorized=True, n_resamples=n_resamples,
                                    alternative="greater", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def bootstrap_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None = None,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95, *,
                      n_classes: int | None = None) -> pd.DataFrame:
    """Every metric with a stratified percentile bootstrap confidence interval.

    Args:
        y_true, y_pred, y_score, n_classes: as in :func:`classification_metrics`.
        n_boot: number of resamples.
        seed: seed of the resampling.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        One row per metric: ``metric``, ``value`` (on the data), ``ci_low``, ``ci_high``,
        ``n_valid`` (resamples where the metric is defined), ``n``.
    """
    y_true, y_pred, y_score, k = _check(y_true, y_pred, y_score, n_classes)
    point = _weighted_metrics(y_true, y_pred, y_score, k, np.ones((1, len(y_true))))
    replicates = bootstrap_replicates(y_true, y_pred, y_score, n_boot, seed, n_classes=k)
    return _interval_table({name: point[name][0] for name in METRICS}, replicates, level,
                           len(y_true))


def bootstrap_replicates(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None,
                         n_boot: int = 1000, seed: int = 0, *,
                         n_classes: int | None = None) -> dict[str, np.ndarray]:
    """``{metric: (n_boot,)}`` values of every metric on stratified resamples (NaN: undefined).

    Resamples are drawn as counts: row ``b`` of the ``(n_boot, N)`` count matrix says how often
    each sample is in resample ``b``; counts of one class sum to that class's size.
    """
    y_true, y_pred, y_score, k = _check(y_true, y_pred, y_score, n_classes)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    chunk = max(1, _CHUNK_ELEMENTS // len(y_true))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = np.zeros(size * len(y_true))
        offsets = np.arange(size)[:, None] * len(y_true)
        for members in strata:
            drawn = members[rng.integers(0, len(members), size=(size, len(members)))]
            counts += np.bincount((offsets + drawn).ravel(), minlength=len(counts))
        counts = counts.reshape(size, len(y_true))
        values = _weighted_metrics(y_true, y_pred, y_score, k, counts)
        for name in METRICS:
            parts[name].append(values[name])
    return {name: np.concatenate(parts[name]) for name in METRICS}


def prediction_metrics(predictions: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95, *, positive: str | None = None,
                       by: list[str] | None = None, source: str = "predictions") -> pd.DataFrame:
    """Metrics with CIs of a prediction table (``predictions-*.tsv``, ``voxplain predict``).

    The table has ``diagnosis``, one ``proba_CLASS`` column per class in the model's class
    order, and optionally ``predicted`` (default: the class of highest probability).

    Args:
        predictions: the table.
        n_boot, seed, level: as in :func:`bootstrap_metrics`.
        positive: binary problems: the positive class (default: the second ``proba_`` column).
        by: columns whose groups are evaluated separately (default: those of ``fold``, ``run``
            present in the table, e.g. one group per model of a ``voxplain predict`` table).
        source: how error messages name the table (e.g. its path).

    Returns:
        The :func:`bootstrap_metrics` table, with the ``by`` columns first.
    """
    classes = _classes_of(predictions, source, positive)
    by = [c for c in ("fold", "run") if c in predictions.columns] if by is None else list(by)
    groups = predictions.groupby(by, sort=True) if by else [((), predictions)]
    tables = []
    for key, group in groups:
        y_true, y_pred, y_score = _encode(group, classes, source)
        table = bootstrap_metrics(y_true, y_pred, y_score, n_boot, seed, level,
                                  n_classes=len(classes))
        key = key if isinstance(key, tuple) else (key,)
        for position, (column, value) in enumerate(zip(by, key)):
            table.insert(position, column, value)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def cross_validation_metrics(predictions: Mapping[tuple[int, int], pd.DataFrame],
                             n_boot: int = 1000, seed: int = 0, level: float = 0.95, *,
                             positive: str | None = None,
                             sources: Mapping[tuple[int, int], str] | None = None) -> pd.DataFrame:
    """Metrics with CIs of the models of a cross-validation, per fold and over folds.

    ``predictions`` maps ``(fold, run)`` to that model's prediction table (``diagnosis``, one
    ``proba_CLASS`` column per class, optionally ``predicted``; as ``predictions-SUBSET.tsv``
    of a run folder); ``sources`` names each table in errors. Paper 1 (3) reports, per run, the
    balanced accuracy of each fold and their mean; so does this table:

    - ``scope == "fold"``: one row per fold, run and metric, CI from a stratified bootstrap of
      that fold's predictions (seed ``seed``; the same resampling in every fold);
    - ``scope == "mean"``: per run and metric, ``value`` = mean over folds, ``per_fold`` = the
      folds' values (``"0.95, 0.82, ..."`` in fold order), ``n`` = number of folds, and as CI
      the percentile interval of the mean of the folds' bootstrap replicates (folds resampled
      independently). That interval is the sampling uncertainty of the mean over the folds'
      validation sets; the spread between folds is in ``per_fold``.

    Returns:
        Columns ``scope, fold, run, metric, value, ci_low, ci_high, n_valid, n, per_fold``
        (``fold`` is empty on ``mean`` rows).
    """
    if not predictions:
        raise ValueError("no prediction table to evaluate")
    rows, replicates = [], {}
    for fold, run in sorted(predictions):
        table = predictions[fold, run]
        source = (sources or {}).get((fold, run), f"fold {fold} run {run}")
        classes = _classes_of(table, source, positive)
        y_true, y_pred, y_score = _encode(table, classes, source)
        k = len(classes)
        point = classification_metrics(y_true, y_pred, y_score, n_classes=k)
        replicates[fold, run] = bootstrap_replicates(y_true, y_pred, y_score, n_boot, seed,
                                                     n_classes=k)
        fold_table = _interval_table(point, replicates[fold, run], level, len(y_true))
        fold_table.insert(0, "scope", "fold")
        fold_table.insert(1, "fold", fold)
        fold_table.insert(2, "run", run)
        rows.append(fold_table)
    per_fold = pd.concat(rows, ignore_index=True)
    means = [_mean_over_folds(per_fold, replicates, run, level)
             for run in sorted(per_fold["run"].unique())]
    table = pd.concat([per_fold, *means], ignore_index=True)
    table["fold"] = table["fold"].astype("Int64")
    return table


def _mean_over_folds(per_fold: pd.DataFrame, replicates: dict, run: int,
                     level: float) -> pd.DataFrame:
    rows = per_fold[per_fold["run"] == run]
    folds = sorted(rows["fold"].unique())
    records = []
    for metric in METRICS:
        values = rows[rows["metric"] == metric].set_index("fold")["value"].reindex(folds)
        stacked = np.stack([replicates[fold, run][metric] for fold in folds])
        low, high, valid = _percentile_interval(stacked.mean(axis=0), level)
        records.append({"scope": "mean", "fold": pd.NA, "run": run, "metric": metric,
                        "value": float(values.mean(skipna=False)), "ci_low": low,
                        "ci_high": high, "n_valid": valid, "n": len(folds),
                        "per_fold": ", ".join(f"{v:.4g}" for v in values)})
    return pd.DataFrame(records)


def _interval_table(point: dict[str, float], replicates: dict[str, np.ndarray], level: float,
                    n: int) -> pd.DataFrame:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    records = []
    for name in METRICS:
        low, high, valid = _percentile_interval(replicates[name], level)
        records.append({"metric": name, "value": float(point[name]), "ci_low": low,
                        "ci_high": high, "n_valid": valid, "n": n})
    return pd.DataFrame(records)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float, int]:
    defined = values[~np.isnan(values)]
    if not len(defined):
        return float("nan"), float("nan"), 0
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high), len(defined)


def _weighted_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None,
                      k: int, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of ``(B,)`` resamples given as sample counts ``weights`` ``(B, N)``."""
    cell = y_true * k + y_pred
    onehot = np.zeros((len(y_true), k * k))
    onehot[np.arange(len(y_true)), cell] = 1.0
    confusion = (weights @ onehot).reshape(-1, k, k)  # [b, true, predicted]
    values = _confusion_metrics(confusion)
    values["auc"] = _weighted_auc(y_true, y_score, k, weights)
    return values


def _confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric but AUC from ``(B, K, K)`` confusion matrices (rows: true class)."""
    total = confusion.sum(axis=(1, 2))
    tp = np.diagonal(confusion, axis1=1, axis2=2)  # (B, K): one-vs-rest per class
    actual = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    fn, fp = actual - tp, predicted - tp
    tn = total[:, None] - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / actual
        specificity = tn / (tn + fp)
        ppv = tp / predicted
        npv = tn / (tn + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        present = actual > 0
        balanced = np.where(present.sum(1) >= 2,
                            np.nansum(np.where(present, recall, 0), 1) / present.sum(1), np.nan)
        trace = tp.sum(1)
        numerator = trace * total - (actual * predicted).sum(1)
        denominator = np.sqrt((total**2 - (predicted**2).sum(1)) * (total**2 - (actual**2).sum(1)))
        mcc = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0.0)
    values = {"accuracy": trace / total, "balanced_accuracy": balanced, "mcc": mcc}
    per_class = {"f1": f1, "sensitivity": recall, "specificity": specificity, "ppv": ppv,
                 "npv": npv, "informedness": recall + specificity - 1, "markedness": ppv + npv - 1}
    for name, value in per_class.items():
        values[name] = value[:, 1] if confusion.shape[1] == 2 else _nanmean_rows(value)
    return values


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    defined = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined.any(1), np.nansum(values, 1) / defined.sum(1), np.nan)


def _weighted_auc(y_true: np.ndarray, y_score: np.ndarray | None, k: int,
                  weights: np.ndarray) -> np.ndarray:
    """``(B,)`` ROC AUC (one-vs-rest macro for K > 2) of weighted samples."""
    if y_score is None:
        return np.full(len(weights), np.nan)
    if k == 2:
        score = y_score if y_score.ndim == 1 else y_score[:, 1]
        return _binary_auc(y_true == 1, score, weights)
    per_class = np.stack([_binary_auc(y_true == c, y_score[:, c], weights) for c in range(k)], 1)
    return _nanmean_rows(per_class)


def _binary_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney form: P(score of a positive > score of a negative) + 1/2 P(equal).

    Scores are replaced by the index of their distinct value; per resample, the weight of
    negatives at each value and its cumulative sum give, for every positive, the weight of
    negatives below it and tied with it.
    """
    if positive.all() or not positive.any():
        return np.full(len(weights), np.nan)
    values, bucket = np.unique(score, return_inverse=True)
    n_values = len(values)
    rows = len(weights)
    offsets = (np.arange(rows)[:, None] * n_values)
    negative_weight = np.bincount((offsets + bucket[~positive]).ravel(),
                                  weights=weights[:, ~positive].ravel(),
                                  minlength=rows * n_values).reshape(rows, n_values)
    below = np.cumsum(negative_weight, axis=1) - negative_weight
    favourable = below + 0.5 * negative_weight  # (B, values)
    pos_w = weights[:, positive]
    numerator = (pos_w * np.take_along_axis(favourable, np.broadcast_to(
        bucket[positive], pos_w.shape), axis=1)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / (pos_w.sum(1) * negative_weight.sum(1))


def _check(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None,
           n_classes: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_score is None and y_pred.ndim == 2:
        y_score, y_pred = y_pred, y_pred.argmax(axis=1)
    if y_true.ndim != 1 or y_pred.ndim != 1 or len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must be 1D of one length, got shapes "
                         f"{y_true.shape} and {y_pred.shape}")
    if not len(y_true):
        raise ValueError("no predictions to evaluate")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"{name} must hold class indices 0..K-1, got {labels[:5]}")
    if y_score is not None:
        y_score = np.asarray(y_score, dtype=np.float64)
        if y_score.shape[0] != len(y_true) or y_score.ndim not in (1, 2):
            raise ValueError(f"y_score must be (N,) or (N, K) with N = {len(y_true)}, got "
                             f"shape {y_score.shape}")
        if not np.all(np.isfinite(y_score)):
            raise ValueError("y_score holds NaN or infinite values")
    k = n_classes or (y_score.shape[1] if y_score is not None and y_score.ndim == 2
                      else max(2, int(max(y_true.max(), y_pred.max())) + 1))
    if max(y_true.max(), y_pred.max()) >= k:
        raise ValueError(f"class index {max(y_true.max(), y_pred.max())} is not below the "
                         f"number of classes {k}")
    if y_score is not None and ((y_score.ndim == 2 and y_score.shape[1] != k)
                                or (y_score.ndim == 1 and k != 2)):
        raise ValueError(f"y_score of shape {y_score.shape} does not match {k} classes")
    return y_true.astype(np.int64), y_pred.astype(np.int64), y_score, k


def _classes_of(table: pd.DataFrame, source: str, positive: str | None) -> list[str]:
    classes = [c.removeprefix("proba_") for c in table.columns if c.startswith("proba_")]
    if len(classes) < 2 or "diagnosis" not in table.columns:
        raise ValueError(f"{source}: a prediction table needs a diagnosis column and one "
                         f"proba_CLASS column per class; found {list(table.columns)}")
    if positive is not None:
        if len(classes) != 2 or positive not in classes:
            raise ValueError(f"{source}: positive class {positive!r} must be one of the two "
                             f"classes {classes}")
        classes = [c for c in classes if c != positive] + [positive]
    return classes


def _encode(table: pd.DataFrame, classes: list[str],
            source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(table["diagnosis"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"{source}: diagnosis {unknown[0]!r} is not one of the classes "
                         f"{classes}")
    y_score = table[[f"proba_{c}" for c in classes]].to_numpy(np.float64)
    y_true = table["diagnosis"].astype(str).map(index).to_numpy(np.int64)
    if "predicted" in table.columns:
        bad = sorted(set(table["predicted"].astype(str)) - set(index))
        if bad:
            raise ValueError(f"{source}: predicted class {bad[0]!r} is not one of {classes}")
        y_pred = table["predicted"].astype(str).map(index).to_numpy(np.int64)
    else:
        y_pred = y_score.argmax(axis=1)
    return y_true, y_pred, y_score


def confusion_matrices(predictions: Mapping[tuple[int, int], pd.DataFrame],
                       sources: Mapping[tuple[int, int], str] | None = None) -> pd.DataFrame:
    """Confusion matrices of every model and their average over the models (paper 2, fig. 3:
    "data averaged from 10 tests"), for any number of classes.

    ``predictions`` maps ``(fold, run)`` to a prediction table (``diagnosis``, ``proba_CLASS``
    columns, optionally ``predicted``), as :func:`cross_validation_metrics` takes them.

    Returns:
        A long table, columns ``scope, fold, run, true, predicted, count, fraction``: one row
        per model (``scope == "fold"``) and cell, ``fraction`` = count / the true class's count
        (the row-normalised matrix; NaN for a class absent from that model's table); then per
        cell (``scope == "mean"``, fold and run empty) the mean count and the mean fraction over
        the models (models without that true class left out of the fraction's mean).
    """
    if not predictions:
        raise ValueError("no prediction table to evaluate")
    rows, classes = [], None
    for fold, run in sorted(predictions):
        table = predictions[fold, run]
        source = (sources or {}).get((fold, run), f"fold {fold} run {run}")
        found = _classes_of(table, source, None)
        if classes is not None and found != classes:
            raise ValueError(f"{source}: classes {found} differ from the other models' {classes}")
        classes = found
        y_true, y_pred, _ = _encode(table, classes, source)
        counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(counts, (y_true, y_pred), 1)
        totals = counts.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            fractions = np.where(totals > 0, counts / totals, np.nan)
        for i, true in enumerate(classes):
            for j, predicted in enumerate(classes):
                rows.append({"scope": "fold", "fold": fold, "run": run, "true": true,
                             "predicted": predicted, "count": int(counts[i, j]),
                             "fraction": fractions[i, j]})
    per_model = pd.DataFrame(rows)
    mean = (per_model.groupby(["true", "predicted"], sort=False)[["count", "fraction"]]
            .mean().reset_index().assign(scope="mean", fold=pd.NA, run=pd.NA))
    table = pd.concat([per_model, mean[per_model.columns]], ignore_index=True)
    table["fold"] = table["fold"].astype("Int64")
    table["run"] = table["run"].astype("Int64")
    return table
