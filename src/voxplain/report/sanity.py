"""The report's section on the randomisation sanity checks (``voxplain evaluate
randomisation``, :mod:`voxplain.steps.randomisation`): the verdict of every method and fold,
and per method the cascade of the model-randomisation test (rank correlation with the trained
model's maps as layers are re-initialised from the top). Left out when the step has not run."""

from __future__ import annotations

from voxplain.evaluate.sanity import RANDOMISATION_THRESHOLD
from voxplain.io import read_tsv, visible
from voxplain.report import figures
from voxplain.report.sections import Block, ReportContext, Section, table_block


def randomisation_section(context: ReportContext) -> Section:
    """Pass/fail of both randomisation tests per method and fold, and the cascades."""
    section = Section("randomisation", "Sanity checks: model and data randomisation")
    folder = context.run.evaluation_dir / "randomisation"
    summary_file = folder / "summary.tsv"
    if not summary_file.is_file():
        section.applies = False
        return section
    summary = read_tsv(summary_file)
    section.blocks.append(Block(
        "text", "Adebayo et al. (2018): a method whose maps stay the same when the model's "
        "layers are re-initialised (model test) or when the model is trained on permuted "
        "diagnoses (data test) explains the input, not what the model learned. Rule: a method "
        "passes when the mean rank correlation of its absolute maps with the trained model's "
        f"is below {RANDOMISATION_THRESHOLD:g} (every layer randomised; the model trained on "
        "permuted labels)."))
    failed = summary[~summary.passes.astype(bool)]
    for (test, method), rows in failed.groupby(["test", "method"], sort=False):
        section.blocks.append(Block(
            "warning", f"{method} fails the {test}-randomisation test in "
            f"{len(rows)} of {int(((summary.test == test) & (summary.method == method)).sum())} "
            f"fold(s) (rank correlation {rows.spearman_abs.mean():.2f}): its maps do not depend "
            "on what the model learned."))
    section.blocks.append(table_block(summary, "Verdict per test, method and fold "
                                      "(evaluation/randomisation/summary.tsv)."))
    for path in visible(folder.glob("model_*.tsv")):
        method = path.stem.removeprefix("model_")
        cascade = read_tsv(path)
        tables = {f"fold {fold} run {run}": rows for (fold, run), rows
                  in cascade.groupby(["fold", "run"], sort=True)}
        section.blocks.append(context.figure(
            figures.curves(tables, [(f"{method}: rank correlation with the trained maps",
                                     ["spearman_abs"])], x="randomised"),
            f"randomisation_{method}", f"Model randomisation of {method}: layers re-initialised "
            "from the top (x: how many), mean rank correlation of the absolute maps with the "
            f"trained model's ({path.name}).", vector=True))
    return section
