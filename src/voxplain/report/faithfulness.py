"""The report's section on faithfulness (``voxplain evaluate faithfulness``,
:mod:`voxplain.steps.faithfulness`): the mean deletion and insertion areas of every
explanation, mask and baseline on the same sessions, the rankings that do no better than a
random one, and the mean curves. Left out when the step has not run."""

from __future__ import annotations

import pandas as pd

from voxplain.evaluate.baselines import is_baseline
from voxplain.io import read_tsv
from voxplain.report import figures
from voxplain.report.sections import Block, ReportContext, Section, table_block


def faithfulness_section(context: ReportContext) -> Section:
    """The summary table, a warning naming the maps no better than a random ranking, and the
    mean deletion and insertion curves."""
    section = Section("faithfulness", "Faithfulness: deleting and inserting what the maps rank "
                                      "first")
    folder = context.run.evaluation_dir / "faithfulness"
    if not (folder / "summary.tsv").is_file():
        section.applies = False
        return section
    summary = read_tsv(folder / "summary.tsv")
    section.blocks.append(Block(
        "text", "Petsiuk et al. (2018): the voxels a map ranks highest are deleted (replaced by "
        "the masks' perturbation) step by step, and the probability of the explained class "
        "should fall fast (low deletion area); inserted into the perturbed image, it should "
        "rise fast (high insertion area). Every row is scored on the same sessions; the "
        "baselines are rankings no explanation method made."))
    explained = summary[~summary.method.astype(str).map(is_baseline)]
    if "deletion_beats_random" in explained:
        deletion = explained.deletion_beats_random.astype(str)
        insertion = explained.insertion_beats_random.astype(str)
        losing = explained[(deletion == "False") & (insertion == "False")]
        if not losing.empty:
            section.blocks.append(Block(
                "warning", "No better than a random ranking (baseline:random) in deletion or "
                "in insertion on the same sessions: " + _named(losing) + "."))
        half = explained[(deletion == "True") != (insertion == "True")]
        if not half.empty:
            section.blocks.append(Block(
                "text", "Better than a random ranking in one of deletion and insertion only: "
                + _named(half) + "."))
    section.blocks.append(table_block(summary, "Mean areas under the deletion (lower is "
                                      "better) and insertion (higher) curves "
                                      "(evaluation/faithfulness/summary.tsv; per session: "
                                      "sessions.tsv)."))
    curves_file = folder / "curves.tsv"
    if curves_file.is_file():
        curves = read_tsv(curves_file)
        tables = {key: _wide(rows) for key, rows in curves.groupby("key", sort=False)}
        section.blocks.append(context.figure(
            figures.curves(tables, [("deletion: probability of the explained class",
                                     ["deletion"]),
                                    ("insertion: probability of the explained class",
                                     ["insertion"])], x="fraction"),
            "faithfulness_curves", "Mean deletion and insertion curves (x: fraction of the "
            "brain's voxels changed; evaluation/faithfulness/curves.tsv).", vector=True))
    return section


def _wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One ranking's curves as columns fraction, deletion, insertion."""
    return rows.pivot_table(index="fraction", columns="mode", values="probability").reset_index()


def _named(rows: pd.DataFrame) -> str:
    return ", ".join(f"{row.key} (deletion {row.deletion_auc:.3f}, insertion "
                     f"{row.insertion_auc:.3f})" for row in rows.itertuples())
