"""Domain-transfer evaluation of CyCE (paper 3, 3.3 and 4.1).

Does the classifier's output move the expected way? For each image ``x`` the classifier's
probability of the positive class is taken on ``x``, ``G-(x)`` and ``G+(x)``; the table gives the
mean of each with a t-based confidence interval (``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``)
and paired two-tailed t-tests (``scipy.stats.ttest_rel``) of ``G+(x)`` vs ``x`` and ``G-(x)`` vs
``x`` (``t`` positive when the transferred images score higher). Paper: .470 on x, .289 on
G-(x), .820 on G+(x), t(233) = 17.9 and 14.5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from voxplain.explain.cyce.relevance import CyCEGenerators

DOMAINS = ("x", "G-(x)", "G+(x)")


@torch.no_grad()
def transfer_probabilities(classifier: nn.Module, generators: CyCEGenerators,
                           images: np.ndarray | torch.Tensor, positive_class: int = 1,
                           batch_size: int = 32, device: str | torch.device = "cpu"
                           ) -> dict[str, np.ndarray]:
    """Probability of ``positive_class`` on x, G-(x), G+(x): ``{domain: (N,)}``."""
    classifier = classifier.to(device).eval()
    generators = generators.to(device).eval()
    images = torch.as_tensor(np.asarray(images))
    outputs: dict[str, list[np.ndarray]] = {domain: [] for domain in DOMAINS}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        plus, minus = generators.transfer(x)
        for domain, batch in zip(DOMAINS, (x, minus, plus)):
            probability = torch.softmax(classifier(batch), 1)[:, positive_class]
            outputs[domain].append(probability.cpu().numpy())
    return {domain: np.concatenate(values) for domain, values in outputs.items()}


def mean_confidence_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` with the t-based interval of the mean."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def transfer_table(probabilities: dict[str, np.ndarray], level: float = 0.95) -> pd.DataFrame:
    """One row per domain: n, mean, CI, and for G-(x) and G+(x) the paired t-test against x."""
    original = np.asarray(probabilities["x"], dtype=float)
    rows = []
    for domain in DOMAINS:
        values = np.asarray(probabilities[domain], dtype=float)
        if values.shape != original.shape:
            raise ValueError(f"{domain}: {values.shape} probabilities for {original.shape} images")
        mean, low, high = mean_confidence_interval(values, level)
        row = {"domain": domain, "n": len(values), "mean": mean, "ci_low": low, "ci_high": high,
               "difference": mean - float(original.mean()), "t": np.nan, "df": np.nan,
               "p": np.nan}
        if domain != "x":
            test = stats.ttest_rel(values, original)
            row |= {"t": float(test.statistic), "df": len(values) - 1, "p": float(test.pvalue)}
        rows.append(row)
    return pd.DataFrame(rows)
