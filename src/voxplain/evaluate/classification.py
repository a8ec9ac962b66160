"""Classification metrics of a set of predictions (paper 1, 2.2; paper 3, table 1).

Binary problems treat class index 1 as positive (e.g. AD in [CN, AD]). Balanced accuracy is the
mean of per-class recalls, the model-selection criterion of paper 1.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Metrics of predictions ``argmax(probabilities)`` against ``labels``.

    Args:
        labels: ``(N,)`` true class indices.
        probabilities: ``(N, K)`` class probabilities (rows sum to 1).

    Returns:
        ``accuracy``, ``balanced_accuracy``, and for two classes ``sensitivity``,
        ``specificity`` and ``auc`` (NaN when a class is absent from ``labels``).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    n_classes = probabilities.shape[1]
    present = np.unique(labels)
    metrics = {
        "n": float(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted))
        if len(present) > 1 else float("nan"),
    }
    if n_classes == 2:
        (tn, fp), (fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])
        metrics["sensitivity"] = _ratio(tp, tp + fn)
        metrics["specificity"] = _ratio(tn, tn + fp)
        metrics["auc"] = (float(roc_auc_score(labels, probabilities[:, 1]))
                          if len(present) == 2 else float("nan"))
    return metrics


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")
