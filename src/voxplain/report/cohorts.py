"""The report's section on other cohorts the run's models were applied to (paper 1, 3.2.1 and
fig. 5: models trained on ADNI, tested and masked on AIBL).

For each cohort label (:func:`voxplain.run.cohort_label`) the run folder holds outputs of, it
shows what is there: the classification metrics per fold with their bootstrap CIs
(``evaluation/cohort-LABEL/classification.tsv``, ``voxplain predict --cohort``), the group masks
of that cohort beside the run's own, fold by fold (``masks/cohort-LABEL/group``), and the
similarity of the two, per fold (``evaluation/robustness/METHOD/datasets_cohort-LABEL.tsv``).
The section is left out when the run has never been applied to another cohort.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.io import read_tsv, visible
from voxplain.report import figures
from voxplain.data.grid import Grid
from voxplain.data.template import brain_mask
from voxplain.report.sections import (Block, ReportContext, Section, column_labels,
                                      fold_run_files, map_figures, read_map, table_block,
                                      template_for)
from voxplain.run import COHORT_PREFIX

#: Metrics of the classification table, in this order.
METRICS = ("balanced_accuracy", "auc", "sensitivity", "specificity")


def cohort_labels(context: ReportContext) -> list[str]:
    """Labels of the other cohorts with predictions' metrics or masks in the run folder."""
    folders = [context.run.evaluation_dir, context.run.masks_dir]
    return sorted({path.name.removeprefix(COHORT_PREFIX) for folder in folders
                   if folder.is_dir() for path in folder.glob(f"{COHORT_PREFIX}*/")
                   if path.is_dir()})


def external_cohorts_section(context: ReportContext) -> Section:
    """One part per other cohort: metrics per fold, group masks beside the run's, and their
    similarity per fold (the robustness across datasets)."""
    section = Section("cohorts", "Other cohorts (external test sets)")
    labels = cohort_labels(context)
    if not labels:
        section.applies = False
        return section
    section.blocks.append(Block(
        "text", "The run's models applied to other cohorts on the training grid (paper 1, "
        "3.2.1: an independent test set). Per cohort: classification per fold with bootstrap "
        "95% CIs, the group masks made on its correctly classified patients (stopped on each "
        "fold's own validation patients) beside the run's own, and their similarity fold by "
        "fold."))
    for label in labels:
        section.blocks.extend(_cohort_blocks(context, label))
    return section


def _cohort_blocks(context: ReportContext, label: str) -> list[Block]:
    blocks = [Block("text", f"Cohort {label}" + _source_of(context, label))]
    metrics = context.run.evaluation_dir / f"{COHORT_PREFIX}{label}" / "classification.tsv"
    if metrics.is_file():
        table = read_tsv(metrics)
        table = table[table.metric.isin(METRICS)]
        shown = table.assign(ci=[f"[{low:.3f}, {high:.3f}]" for low, high in
                                 zip(table.ci_low, table.ci_high)])
        columns = [c for c in ("scope", "fold", "run", "metric", "value", "ci", "n", "per_fold")
                   if c in shown]
        blocks.append(table_block(shown[columns], f"Classification of {label} by each fold's "
                                  f"model ({metrics.relative_to(context.run.root)})."))
    else:
        blocks.append(Block("text", f"No metrics of {label}: `voxplain predict --cohort` "
                            "writes them when every diagnosis of the cohort is a class."))
    blocks.extend(_mask_blocks(context, label))
    robustness = context.run.evaluation_dir / "robustness"
    for path in visible(robustness.glob(f"*/datasets_{COHORT_PREFIX}{label}.tsv")):
        blocks.append(table_block(read_tsv(path), f"{path.parent.name}: the group map of each "
                                  f"fold on the run's cohort against the one on {label} "
                                  "(roi_cosine: cosine of the AAL2 region densities, 1 = same "
                                  "regions; prob_cnn: mean probability of the masked class when "
                                  "each cohort's mask hides the other cohort's patients, low = "
                                  f"the mask transfers) ({path.relative_to(context.run.root)})."))
    return blocks


def _source_of(context: ReportContext, label: str) -> str:
    """``: PATH`` of the cohort's TSV as the steps recorded it (empty when unknown)."""
    recorded = context.run.read_config()
    for section in (f"predict_{label}", f"mask_group_{COHORT_PREFIX}{label}",
                    f"mask_session_{COHORT_PREFIX}{label}"):
        cohort = recorded.get(section, {}).get("cohort")
        if cohort:
            return f": {cohort}"
    return ""


def _mask_blocks(context: ReportContext, label: str) -> list[Block]:
    """The group masks on the run's cohort and on ``label``, one column per fold, the run's
    above (fig. 5); flagged masks marked in their column label."""
    own = {(f, r): p for f, r, p in fold_run_files(context.run.masks_dir / "group", "mask.nii.gz")}
    other = fold_run_files(context.run.masks_dir / f"{COHORT_PREFIX}{label}" / "group",
                           "mask.nii.gz")
    if not other:
        return []
    blocks = []
    labels = column_labels(other)
    rows: dict[str, dict[str, np.ndarray]] = {"run's cohort": {}, label: {}}
    affine = None
    for column, (fold, run, path) in zip(labels, other):
        values, affine = read_map(path)
        rows[label][f"{column}: {label}{_flag(path)}"] = 1.0 - values
        if (fold, run) in own:
            own_values = read_map(own[fold, run])[0]
            rows["run's cohort"][f"{column}: run's cohort{_flag(own[fold, run])}"] = \
                1.0 - own_values
    maps = [values for row in rows.values() for values in row.values()]
    style = figures.map_style(maps, "1 - mask", signed=False, threshold_fraction=0.0)
    for name, row in rows.items():
        if not row:
            continue
        if affine is None:  # 2D masks
            blocks.extend(map_figures(context, f"cohort_{label}_{_row_name(name, label)}",
                                      f"Group mask (1 - m) on {name}", row, None, style,
                                      viewer=False))
            continue
        grid = Grid(tuple(maps[0].shape), affine)
        inside = brain_mask(grid)
        row = {column: np.where(inside, values, 0.0) for column, values in row.items()}
        blocks.append(context.figure(
            figures.coronal_montage(row, affine, template_for(maps[0], affine), style),
            f"cohort_{label}_{_row_name(name, label)}_group_mask",
            f"Group mask (1 - m) on {name}, inside the brain mask: coronal montage (back to "
            "front), one column per fold (paper 1, fig. 5: one line per dataset)."))
    summaries = [dict(json.loads(path.read_text()), fold=f, run=r) for f, r, path in fold_run_files(
        context.run.masks_dir / f"{COHORT_PREFIX}{label}" / "group", "summary.json")]
    if summaries:
        columns = ["fold", "run", "n_train", "n_validation", "epochs", "masked_fraction",
                   "cohort_probability_before", "cohort_probability_after", "flagged"]
        table = pd.DataFrame(summaries)
        blocks.append(table_block(table[[c for c in columns if c in table]],
                                  f"Group masks on {label}: trained on its correctly classified "
                                  "patients (n_train), probability of the masked class on them "
                                  "without/with the mask."))
    return blocks


def _row_name(name: str, label: str) -> str:
    return "other" if name == label else "own"


def _flag(mask: Path) -> str:
    summary = mask.parent / "summary.json"
    flagged = summary.is_file() and json.loads(summary.read_text()).get("flagged", False)
    return " (flagged)" if flagged else ""
