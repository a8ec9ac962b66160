"""The headline figures of a run folder as small tables, for the terminal (``voxplain summary``).

Each table is read from what the steps wrote; a step that has not run gives no table:

- ``warnings``: the checks of :mod:`voxplain.report.trust` that failed (a classifier at chance,
  an explanation near chance or read from a coarse layer, maps identical across subjects, a
  flagged mask), the same as the report opens with;
- ``classification``: the mean over folds of each metric with its bootstrap 95% CI and the
  per-fold values (``evaluation/classification.tsv``, ``voxplain evaluate classification``);
- ``group masks``: per fold and run, the probability of the masked class before and after the
  mask and the 5 most masked AAL2 regions (``masks/group/fold-K/run-R/summary.json``);
- ``robustness``: similarity of maps across folds and intra- vs inter-subject
  (``evaluation/robustness/summary.tsv``, ``voxplain evaluate robustness``);
- ``localisation``: per explanation, the mean over folds of the scores against the ground
  truth (``evaluation/localisation.tsv``, ``voxplain evaluate localisation --against``), and per
  explanation and diagnosis the mean over session maps of the scores against each session's
  own truth (``evaluation/localisation_sessions.tsv``, ``voxplain explain --session-truth``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from voxplain.io import read_tsv
from voxplain.run import RunFolder

CLASSIFICATION_METRICS = ["balanced_accuracy", "accuracy", "sensitivity", "specificity", "auc",
                          "mcc"]


def run_summary(run: Path) -> dict[str, pd.DataFrame]:
    """The tables described in the module docstring, by title, in reading order."""
    run = Path(run)
    tables = {
        "Warnings: results that cannot be taken at face value": _warnings(run),
        "Classification (mean over folds, bootstrap 95% CI)": _classification(run),
        "Group masks": _group_masks(run),
        "Robustness of maps": _robustness(run),
        "Localisation against the ground truth (mean over folds)": _localisation(run),
        "Localisation of session maps against their own truth (mean per diagnosis)":
            _session_localisation(run),
    }
    return {title: table for title, table in tables.items() if table is not None and len(table)}


def _read(path: Path) -> pd.DataFrame | None:
    return read_tsv(path) if path.is_file() else None


def _classification(run: Path) -> pd.DataFrame | None:
    table = _read(run / "evaluation" / "classification.tsv")
    if table is None:
        return None
    rows = table[(table["scope"] == "mean") & table["metric"].isin(CLASSIFICATION_METRICS)]
    return rows[["run", "metric", "value", "ci_low", "ci_high", "per_fold"]]


def _group_masks(run: Path) -> pd.DataFrame | None:
    records = [json.loads(path.read_text())
               for path in sorted((run / "masks" / "group").glob("fold-*/run-*/summary.json"))]
    if not records:
        return None
    table = pd.DataFrame(records)
    columns = ["fold", "run", "diagnosis", "probability_before", "probability_after",
               "masked_fraction", "flagged", "top_regions"]
    return table[[column for column in columns if column in table.columns]]


def _warnings(run: Path) -> pd.DataFrame | None:
    from voxplain.report.trust import findings_table, run_findings

    findings = [f for f in run_findings(RunFolder(run)) if f.verdict == "warning"]
    return findings_table(findings).drop(columns="verdict") if findings else None


def _robustness(run: Path) -> pd.DataFrame | None:
    table = _read(run / "evaluation" / "robustness" / "summary.tsv")
    if table is None:
        return None
    columns = ["method", "experiment", "diagnosis", "metric", "mean", "sd", "median", "n_pairs"]
    return table[[column for column in columns if column in table.columns]]


def _localisation(run: Path) -> pd.DataFrame | None:
    table = _read(run / "evaluation" / "localisation.tsv")
    if table is None:
        return None
    scores = [column for column in table.columns
              if column in ("auc", "mass_inside", "chance_mass", "pointing_game")
              or column.startswith("top")]
    return table.groupby(["key", "diagnosis"], as_index=False)[scores].mean()


def _session_localisation(run: Path) -> pd.DataFrame | None:
    from voxplain.evaluate.localisation import session_localisation_summary

    table = _read(run / "evaluation" / "localisation_sessions.tsv")
    if table is None:
        return None
    return session_localisation_summary(table).drop(columns=["method", "layer"])
