"""Figures of a user study's analysis (paper 3, figs. 7-9), written as PNG for the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.io import atomic_path


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def _bars(axis, table: pd.DataFrame, methods: list[str], offset: float, width: float,
          colour: str, label: str) -> None:
    rows = table.set_index("method").reindex(methods)
    lower = (rows["mean"] - rows["ci_low"]).to_numpy()
    upper = (rows["ci_high"] - rows["mean"]).to_numpy()
    axis.bar(np.arange(len(methods)) + offset, rows["mean"], width, color=colour, label=label,
             yerr=np.vstack([lower, upper]), capsize=2)


def comparison_figure(overall: pd.DataFrame, by_class: pd.DataFrame, path: Path) -> None:
    """Fig. 7: z-adjusted score per method for each criterion, all samples (grey) and per class,
    with 95 % CIs over raters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = list(dict.fromkeys(overall["criterion"]))
    methods = sorted(overall["method"].unique())
    classes = sorted(by_class["diagnosis"].unique())
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    width = 0.8 / (1 + len(classes))
    figure, axes = plt.subplots(1, len(criteria), figsize=(4 * len(criteria), 3.5),
                                sharey=True, squeeze=False)
    for axis, criterion in zip(axes[0], criteria):
        _bars(axis, overall[overall["criterion"] == criterion], methods, -0.4 + width / 2,
              width, "0.6", "all")
        for k, name in enumerate(classes):
            rows = by_class[(by_class["criterion"] == criterion) & (by_class["diagnosis"] == name)]
            _bars(axis, rows, methods, -0.4 + width * (k + 1.5), width,
                  colours[k % len(colours)], name)
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
        axis.set_title(criterion)
    axes[0][0].set_ylabel("z-adjusted score (95 % CI)")
    axes[0][-1].legend(fontsize="small")
    _save(figure, path)


def criteria_dendrogram(correlation: pd.DataFrame, path: Path) -> None:
    """Fig. 8: average-linkage dendrogram of the criteria with distance ``1 - r``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    distance = np.clip(1 - correlation.to_numpy(), 0, None)
    np.fill_diagonal(distance, 0)
    tree = linkage(squareform(distance, checks=False), method="average")
    figure, axis = plt.subplots(figsize=(5, 3))
    dendrogram(tree, labels=list(correlation.columns), ax=axis)
    axis.set_ylabel("1 - Pearson r")
    _save(figure, path)


def preference_figure(phi: pd.DataFrame, loadings: pd.Series, explained: float,
                      path: Path) -> None:
    """Fig. 9: (a) mean general preference factor Phi per method, (b) its L1-normalised
    eigenvector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(phi["method"].unique())
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    _bars(left, phi, methods, 0.0, 0.6, "tab:blue", "Phi")
    left.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    left.axhline(0, color="black", linewidth=0.5)
    left.set_title(f"(a) Phi ({100 * explained:.1f} % of the variance)")
    right.bar(np.arange(len(loadings)), loadings.to_numpy(), color="tab:gray")
    right.set_xticks(np.arange(len(loadings)), list(loadings.index), rotation=30, ha="right")
    right.set_title("(b) L1-normalised eigenvector")
    _save(figure, path)
