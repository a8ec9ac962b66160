"""The sections of the report, each read from what the run folder holds (layout:
:mod:`voxplain.run` and DESIGN.md).

A section function returns a :class:`Section` of blocks (tables, figures, text); when the run
folder holds nothing for it, the section carries a short ``note`` saying what is absent and which
step writes it, never an error. Files other steps write (explanations, robustness, statistics,
localisation) are read by their documented layout only, so a section renders as soon as its step
has run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from voxplain.config import ReportConfig
from voxplain.data.cohort import CONTROL_LABELS
from voxplain.data.grid import Grid, downsample
from voxplain.io import read_tsv, visible
from voxplain.report import figures
from voxplain.report.trust import findings_table, method_findings, run_findings
from voxplain.run import RunFolder
from voxplain.run.maps import grid_masks, map_grid, read_map_on_grid

log = logging.getLogger("voxplain")

#: Columns of cross_validation.tsv shown in the classification table, in this order.
METRIC_COLUMNS = ("balanced_accuracy", "accuracy", "auc", "sensitivity", "specificity", "f1",
                  "ppv", "npv", "mcc", "informedness", "markedness", "loss")
#: Largest table rendered in full; longer ones show their first rows and say so.
MAX_TABLE_ROWS = 60
MAP_SUFFIXES = (".nii.gz", ".nii", ".npy")
#: Columns of evaluation/classification.tsv that name a row (scope: a fold or the mean).
CI_KEYS = ("scope", "subset", "fold", "run")


@dataclass(frozen=True)
class Block:
    """One element of a section: ``kind`` is table, figure, text, warning, code or viewer.

    ``content`` is HTML for tables, text for text/code, the PNG path for figures and the
    viewer's HTML file for viewers.
    """

    kind: str
    content: Any
    caption: str = ""


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    note: str = ""
    applies: bool = True  # False: the section does not concern this run and is left out


@dataclass(frozen=True)
class ViewerCandidate:
    """A 3D group map offered to the interactive viewer section."""

    name: str
    title: str
    values: np.ndarray
    affine: np.ndarray
    style: figures.MapStyle
    family: str = ""  # the mask, or the explanation method: viewers go round the families


@dataclass
class ReportContext:
    """The run folder, the settings, and where figures go; collects viewer candidates."""

    run: RunFolder
    config: ReportConfig
    figures_dir: Path
    viewers: list[ViewerCandidate] = field(default_factory=list)

    def figure(self, figure: Figure, name: str, caption: str, vector: bool = False) -> Block:
        """Save ``figure`` as PNG, plus ``config.formats`` when it is drawn with vectors only
        (curves, box plots): brain slices and heatmaps are rasters, whose SVG/PDF copies would
        only embed the same pixels at several times the size."""
        path = figures.save_figure(figure, self.figures_dir, _slug(name),
                                   self.config.formats if vector else ["png"], self.config.dpi)
        return Block("figure", path, caption)

    def path(self, *parts: str) -> Path:
        return self.run.root.joinpath(*parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def table_html(table: pd.DataFrame, index: bool = False, prose: bool = False) -> str:
    """An HTML table (escaped cells, 3 significant digits), cut at :data:`MAX_TABLE_ROWS`;
    ``prose``: cells of sentences, left-aligned and wrapped."""
    shown = table.head(MAX_TABLE_ROWS)
    html = shown.to_html(index=index, border=0, classes="data prose" if prose else "data",
                         na_rep="–", escape=True, float_format=lambda v: f"{v:.3g}")
    if len(table) > MAX_TABLE_ROWS:
        html += f"<p class='note'>First {MAX_TABLE_ROWS} of {len(table)} rows.</p>"
    return html


def table_block(table: pd.DataFrame, caption: str, index: bool = False,
                prose: bool = False) -> Block:
    return Block("table", table_html(table, index, prose), caption)


def read_map(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A saved map (:func:`voxplain.run.maps.read_map_on_grid`) and its affine: a volume's, or
    ``None`` for a 2D map, drawn as flat panels rather than over the MNI template."""
    values, grid = read_map_on_grid(path)
    return values, grid.affine if values.ndim == 3 else None


def map_stem(path: Path) -> str:
    name = path.name
    for suffix in MAP_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def fold_run_files(folder: Path, pattern: str) -> list[tuple[int, int, Path]]:
    """``(fold, run, path)`` of ``folder/fold-K/run-R/PATTERN``, in fold then run order."""
    found = []
    for path in visible(folder.glob(f"fold-*/run-*/{pattern}")):
        fold, run = path.parent.parent.name, path.parent.name
        if re.fullmatch(r"fold-\d+", fold) and re.fullmatch(r"run-\d+", run):
            found.append((int(fold[5:]), int(run[4:]), path))
    return sorted(found)


def column_labels(found: Sequence[tuple[int, int, Path]]) -> list[str]:
    """``fold K`` columns, ``fold K run R`` when a fold has several runs."""
    several = len({run for _, run, _ in found}) > 1
    return [f"fold {f} run {r}" if several else f"fold {f}" for f, r, _ in found]


def template_for(values: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """The MNI GM template on the maps' grid (None off MNI space, e.g. an empty overlap)."""
    from voxplain.data.template import gm_template

    template = np.asarray(gm_template(Grid(tuple(values.shape), affine)))
    return template if template.max() > 0 else None


# --- cohort, configuration, software ------------------------------------------------------

def cohort_section(context: ReportContext) -> Section:
    section = Section("cohort", "Cohort")
    if not context.run.cohort_file.is_file():
        section.note = "No cohort.tsv in the run folder: `voxplain train` writes it."
        return section
    table = read_tsv(context.run.cohort_file)
    counts = table.groupby("diagnosis").agg(subjects=("participant_id", "nunique"),
                                            sessions=("session_id", "size"))
    if "age" in table:
        ages = table.groupby("diagnosis")["age"]
        counts["age (mean ± sd)"] = [f"{m:.1f} ± {s:.1f}" for m, s in
                                     zip(ages.mean(), ages.std().fillna(0))]
    if "sex" in table:
        counts = counts.join(pd.crosstab(table.diagnosis, table.sex).add_prefix("sex "))
    total = pd.DataFrame({"subjects": [table.participant_id.nunique()],
                          "sessions": [len(table)]}, index=["all"])
    counts = pd.concat([counts, total]).rename_axis("diagnosis")
    section.blocks.append(table_block(counts.reset_index(), "Sessions kept after the quality "
                                      "check, per diagnosis."))
    rejected = (read_tsv(context.run.qc_rejected_file)
                if context.run.qc_rejected_file.is_file() else None)
    if rejected is None:
        section.blocks.append(Block("text", "No qc_rejected.tsv: quality-check results absent."))
    elif rejected.empty:
        section.blocks.append(Block("text", "Quality check (paper 1, 2.3.1: GM maximum below "
                                    "the threshold): no session rejected."))
    else:
        section.blocks.append(table_block(
            rejected.drop(columns=["path"], errors="ignore"),
            f"{len(rejected)} session(s) rejected by the quality check (paper 1, 2.3.1)."))
    return section


def configuration_section(context: ReportContext) -> Section:
    section = Section("configuration", "Configuration and software")
    if context.run.config_file.is_file():
        section.blocks.append(Block("code", context.run.config_file.read_text(),
                                    "config.toml: the settings of every step of this run."))
    environment_file = context.path("environment.json")
    if environment_file.is_file():
        record = json.loads(environment_file.read_text())
        rows = {}
        for step, info in record.items():
            rows[step] = {"python": info.get("python"), "platform": info.get("platform"),
                          **info.get("packages", {})}
        section.blocks.append(table_block(pd.DataFrame(rows).rename_axis("package")
                                          .reset_index(), "Software versions per step "
                                          "(environment.json)."))
    if not section.blocks:
        section.note = "Neither config.toml nor environment.json in the run folder."
    return section


# --- classification ------------------------------------------------------------------------

def classification_section(context: ReportContext) -> Section:
    section = Section("classification", "Classification")
    cross_validation = context.path("evaluation", "cross_validation.tsv")
    if cross_validation.is_file():
        table = read_tsv(cross_validation)
        ids = [c for c in ("fold", "run", "subset", "best_epoch", "n") if c in table]
        metrics = [c for c in METRIC_COLUMNS if c in table]
        shown = table[ids + metrics]
        if metrics:
            means = shown.groupby("subset")[metrics].agg(["mean", "std"]) if "subset" in shown \
                else None
            section.blocks.append(table_block(shown, "Best model of each fold and run "
                                              "(evaluation/cross_validation.tsv)."))
            if means is not None:
                summary = pd.DataFrame({m: [f"{a:.3f} ± {s:.3f}" for a, s in
                                            zip(means[m]["mean"], means[m]["std"].fillna(0))]
                                        for m in metrics}, index=means.index)
                section.blocks.append(table_block(summary.reset_index(),
                                                  "Mean ± standard deviation over folds."))
    intervals = context.path("evaluation", "classification.tsv")
    if intervals.is_file():
        section.blocks.append(confidence_interval_block(read_tsv(intervals)))
    elif cross_validation.is_file():
        section.blocks.append(Block("text", "No evaluation/classification.tsv: bootstrap 95% "
                                    "confidence intervals not computed yet."))
    for name, what in (("confusion.tsv", "sessions"), ("confusion-slices.tsv", "slices")):
        path = context.path("evaluation", name)
        if path.is_file():
            section.blocks.append(_confusion_block(context, read_tsv(path), name, what))
    found = fold_run_files(context.path("models"), "history.tsv")
    histories = {label: read_tsv(path)
                 for label, (_, _, path) in zip(column_labels(found), found)}
    if histories:
        figure = figures.curves(histories, [
            ("loss (solid: train, dashed: validation)", ["train_loss", "validation_loss"]),
            ("validation balanced accuracy", ["validation_balanced_accuracy"])])
        section.blocks.append(context.figure(figure, "training_curves",
                                             "Training curves of each fold (history.tsv).",
                                             vector=True))
    if not section.blocks:
        section.note = "No trained model yet: `voxplain train` writes models/ and evaluation/."
    return section


def _confusion_block(context: ReportContext, table: pd.DataFrame, name: str,
                     what: str) -> Block:
    """The confusion matrix averaged over the models (paper 2, fig. 3), row-normalised."""
    mean = table[table.scope == "mean"]
    classes = list(dict.fromkeys(mean.true))
    matrix = mean.pivot(index="true", columns="predicted", values="fraction").loc[
        classes, classes]
    models = int((table.scope == "fold").sum() / max(1, len(classes) ** 2))
    figure = figures.heatmap(matrix, f"{what}: rows true, columns predicted")
    return context.figure(figure, name.removesuffix(".tsv"), f"Confusion matrix of the {what}, "
                          f"row-normalised, averaged over {models} model(s) (evaluation/{name}; "
                          "per fold in the same file).")


# --- random search -----------------------------------------------------------------------------

#: Parameters of a search trial drawn on a log scale (:mod:`voxplain.train.search`).
SEARCH_LOG_PARAMETERS = ("learning_rate", "weight_decay")
SEARCH_COLUMNS = ("number", "state", "value", "seconds", "folder", "convs_per_block")


def search_section(context: ReportContext) -> Section:
    """Paper 1's random search (``voxplain search``): the trials, the best one, and a parallel
    coordinates figure of the parameters against the objective; left out without a search."""
    section = Section("search", "Random search (paper 1, 2.2.2)")
    trials_file = context.run.search_dir / "trials.tsv"
    if not trials_file.is_file():
        section.applies = False
        return section
    trials = read_tsv(trials_file)
    settings = context.run.read_config().get("search", {})
    objective = settings.get("objective", "balanced_accuracy")
    section.blocks.append(table_block(trials, f"Trials (search/trials.tsv); value: validation "
                                      f"{objective} of each trial's models."))
    finished = trials[trials.state == "COMPLETE"]
    if finished.empty:
        section.note = "No finished trial yet."
        return section
    best = finished.loc[finished["value"].idxmin() if objective == "loss"
                        else finished["value"].idxmax()]
    best_file = context.run.search_dir / "best_train.toml"
    section.blocks.append(Block("text", f"Best trial {int(best['number'])}: {objective} "
                                f"{best['value']:.3f} ({best.get('folder', '')}). Train it on "
                                f"every fold: voxplain train --config {best_file}"))
    if best_file.is_file():
        section.blocks.append(Block("code", best_file.read_text(), "search/best_train.toml"))
    parameters = [c for c in finished.columns if c not in SEARCH_COLUMNS
                  and finished[c].notna().all()]
    if len(finished) >= 2 and parameters:
        figure = figures.parallel_coordinates(finished, parameters, "value",
                                              log_axes=SEARCH_LOG_PARAMETERS)
        section.blocks.append(context.figure(
            figure, "search_parallel_coordinates", f"Finished trials: each line a trial "
            f"across its parameters (convolutions per block left out), coloured by its "
            f"{objective}.", vector=True))
    return section


def networks_section(context: ReportContext) -> Section:
    """Paper 2's table 1: one row per run folder (this one and ``config.compare``), the
    network, its head and initialisation, the validation loss and the test accuracy, mean and
    SD over the folds or random splits."""
    section = Section("networks", "Networks compared")
    runs = [context.run.root, *(context.config.compare or [])]
    if len(runs) < 2:  # one run folder: nothing to compare
        section.applies = False
        return section
    rows = [network_row(Path(run)) for run in runs]
    section.blocks.append(table_block(pd.DataFrame(rows), "Each run folder's network and "
                                      "results, mean ± SD over its folds or splits "
                                      "(evaluation/cross_validation.tsv; slice models: loss and "
                                      "accuracy per slice, as paper 2's table 1, and the "
                                      "subjects' soft vote); the Grad-CAM maps' localisation "
                                      "against each session's ground truth where scored "
                                      "(evaluation/localisation_sessions.tsv)."))
    return section


def network_row(root: Path) -> dict[str, Any]:
    """Table 1's row of one run folder (missing results are blank), with the mean session
    localisation AUC of its Grad-CAM maps of the true class where they were scored."""
    run = RunFolder(root)
    train = run.read_config().get("train", {}) if run.config_file.is_file() else {}
    model = train.get("model", {})
    weights = model.get("weights")
    row: dict[str, Any] = {"run": str(root), "network": model.get("name", ""),
                           "head": model.get("head", ""),
                           "initialisation": Path(weights).name if weights else "random"}
    path = run.evaluation_file("cross_validation.tsv")
    table = read_tsv(path) if path.is_file() else pd.DataFrame(columns=["subset"])
    slices = "validation-slices" in set(table.subset)
    columns = (("validation loss", "validation-slices" if slices else "validation", "loss"),
               ("test accuracy", "test-slices" if slices else "test", "accuracy"),
               ("test accuracy (subjects)" if slices else "", "test", "accuracy"),
               ("test balanced accuracy", "test", "balanced_accuracy"))
    for label, subset, metric in columns:
        values = table.loc[table.subset == subset, metric] if metric in table else []
        if label and len(values):
            row[label] = f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"
        elif label:
            row[label] = ""
    scored = run.evaluation_file("localisation_sessions.tsv")
    if scored.is_file():  # paper 2: better classifiers, better heatmaps?
        table = read_tsv(scored)
        # maps of the true class: keys without a target setting (explanation_key)
        grad_cam = table[(table.method == "grad_cam") & ~table.key.str.contains("_target-")]
        auc = grad_cam.auc.dropna()
        row["Grad-CAM localisation AUC"] = f"{auc.mean():.3f} (n={len(auc)})" if len(auc) else ""
    return row


def _key_label(value: Any) -> Any:
    """Row labels of the CI table: a blank fold (the mean over folds) reads "all", 0.0 reads 0."""
    if pd.isna(value):
        return "all"
    return int(value) if isinstance(value, float) and value.is_integer() else value


def confidence_interval_block(table: pd.DataFrame) -> Block:
    """``value [ci_low, ci_high]`` per metric (columns) and fold/run/subset (rows)."""
    needed = {"metric", "value"}
    if not needed <= set(table.columns):
        return table_block(table, "evaluation/classification.tsv (no metric/value columns: "
                           "shown as is).")
    keys = [c for c in CI_KEYS if c in table]
    labelled = table.assign(**{key: [_key_label(v) for v in table[key]] for key in keys})
    has_ci = {"ci_low", "ci_high"} <= set(table.columns)
    cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if has_ci else f"{v:.3f}" for v, lo, hi in zip(
        table["value"], table.get("ci_low", table["value"]), table.get("ci_high", table["value"]))]
    wide = labelled.assign(cell=cells).pivot_table(index=keys or None, columns="metric",
                                                   values="cell", aggfunc="first", sort=False)
    wide.columns.name = None  # else pandas writes an empty leading cell in every row
    return table_block(wide.reset_index() if keys else wide, "Classification metrics with "
                       "bootstrap 95% confidence intervals (evaluation/classification.tsv).",
                       index=not keys)


# --- brain maps shared by masks, explanations and statistics ---------------------------------

def map_figures(context: ReportContext, name: str, title: str, maps: dict[str, np.ndarray],
                affine: np.ndarray | None, style: figures.MapStyle, viewer: bool = True,
                brain_only: bool = False, family: str = "") -> list[Block]:
    """Orthogonal slices + coronal montage + glass brain of the mean of 3D maps; 2D panels.

    At most ``config.max_columns`` maps are drawn side by side (the caption says when some are
    left out); the glass brain and the viewer show the mean of all of them.

    ``brain_only`` hides values outside the MNI brain mask (for masks, whose values outside the
    brain perturb nothing a reader can interpret, and explanations, whose share outside the
    brain is reported among the findings); the caption says so.
    """
    items = dict(list(maps.items())[: context.config.max_columns])
    if len(items) < len(maps):
        title = f"{title} (first {len(items)} of {len(maps)} folds/runs)"
    if affine is None:
        return [context.figure(figures.panels_2d(items, style), f"{name}_panels",
                               f"{title}: one column per fold/run.")]
    template = template_for(next(iter(items.values())), affine)
    if brain_only and template is not None:
        from voxplain.data.template import brain_mask

        inside = brain_mask(Grid(tuple(template.shape), affine))
        maps = {label: np.where(inside, values, 0.0) for label, values in maps.items()}
        items = {label: maps[label] for label in items}
        title = f"{title}, inside the brain mask"
    blocks = [
        context.figure(figures.orthogonal_slices(items, affine, template, style), f"{name}_ortho",
                       f"{title}: orthogonal slices through the peak of the mean map, one column "
                       "per fold/run, over the MNI GM template."),
        context.figure(figures.coronal_montage(items, affine, template, style), f"{name}_coronal",
                       f"{title}: coronal montage (back to front), one column per fold/run.")]
    mean = np.mean(list(maps.values()), axis=0)
    blocks.append(context.figure(figures.glass_brain(mean, affine, style), f"{name}_glass",
                                 f"{title}: glass brain of the mean over {len(maps)} "
                                 "fold(s)/run(s)."))
    if viewer:
        context.viewers.append(ViewerCandidate(name, f"{title} (mean over folds/runs)", mean,
                                               affine, style, family or name))
    return blocks


# --- masks ---------------------------------------------------------------------------------

def masks_section(context: ReportContext) -> Section:
    section = Section("masks", "Meaningful-perturbation masks")
    group_dir = context.path("masks", "group")
    found = [item for suffix in (".nii.gz", ".npy")
             for item in fold_run_files(group_dir, f"mask{suffix}")]
    summaries = [json.loads(path.read_text())
                 for _, _, path in fold_run_files(group_dir, "summary.json")]
    flagged = {(s["fold"], s["run"]) for s in summaries if s.get("flagged")}
    if found:
        labels = column_labels(found)
        maps, affine = {}, None
        for label, (fold, run, path) in zip(labels, found):
            values, affine = read_map(path)
            # what the mask hides: 1 - m (paper 1, fig. 5); flagged masks marked in their label
            maps[f"{label} (flagged)" if (fold, run) in flagged else label] = 1.0 - values
        style = figures.map_style(list(maps.values()), "1 - mask", signed=False,
                                  threshold_fraction=0.0)
        section.blocks.extend(map_figures(context, "group_mask", "Group mask (1 - m)", maps,
                                          affine, style, brain_only=True))
    for summary in summaries:
        if summary.get("flagged"):
            section.blocks.append(Block("warning", f"Group mask fold {summary['fold']} run "
                                        f"{summary['run']} is flagged: "
                                        f"{'; '.join(summary.get('flag_reasons', []))}."))
    if summaries:
        table = pd.DataFrame(summaries)
        section.blocks.append(table_block(table.drop(columns="top_regions", errors="ignore"),
                                          "Group masks: validation probability of the masked "
                                          "class without/with the mask (summary.json)."))
        regions = pd.DataFrame([r if isinstance(r, list) else [] for r in
                                table.get("top_regions", [[]] * len(table))])
        if not regions.empty:
            regions.columns = [f"#{k + 1}" for k in regions.columns]
            section.blocks.append(table_block(
                pd.concat([table[["fold", "run"]], regions], axis=1),
                "The AAL2 regions each group mask hides most (density of 1 - m), most first."))
    losses_found = fold_run_files(group_dir, "loss.tsv")
    if losses_found:
        losses = {label: read_tsv(path)
                  for label, (_, _, path) in zip(column_labels(losses_found), losses_found)}
        section.blocks.append(context.figure(figures.curves(losses, [
            ("mask loss (solid: train, dashed: validation)", ["train_loss", "validation_loss"])]),
            "group_mask_losses", "Group-mask loss per epoch (loss.tsv).", vector=True))
    flags = [read_tsv(path).assign(fold=f, run=r)
             for f, r, path in fold_run_files(group_dir, "qc_flags.tsv")]
    if flags:
        flagged = pd.concat(flags, ignore_index=True)
        flagged = flagged[flagged["flagged"].astype(bool)] if "flagged" in flagged else flagged
        section.blocks.append(
            table_block(flagged, "Images flagged by the group-mask quality check (QC step 2; "
                        "removed: the group mask was optimised again without them).")
            if len(flagged) else Block("text", "Group-mask quality check (QC step 2): no image "
                                       "flagged."))
    section.blocks.extend(_qc_step2_blocks(context, summaries))
    section.blocks.extend(_session_mask_blocks(context))
    grid_summary = context.path("masks", "grid", "summary.tsv")
    if grid_summary.is_file():
        section.blocks.append(table_block(read_tsv(grid_summary),
                                          "Group masks over the hyperparameter grid "
                                          "(masks/grid/summary.tsv)."))
    section.blocks.extend(_grid_mask_blocks(context))
    if not section.blocks:
        section.note = "No mask in the run folder: `voxplain mask group` and `voxplain mask " \
                       "session` write masks/."
    return section


def _qc_step2_blocks(context: ReportContext, summaries: list[dict]) -> list[Block]:
    """Each group mask that quality check step 2 optimised again, beside its first pass (with
    the removed images), over the whole image: a defect may lie outside the brain."""
    blocks = []
    for summary in summaries:
        if not summary.get("removed"):
            continue
        fold, run = summary["fold"], summary["run"]
        folder = context.run.mask_dir("group", fold, run)
        removed = ", ".join(summary["removed"])
        blocks.append(Block("text", f"Quality check step 2 (paper 1, 2.3.1) removed {removed} "
                            f"from the group mask of fold {fold} run {run}: the mask was "
                            "optimised again without them; the first one is kept in "
                            f"{folder.relative_to(context.run.root)}/first/."))
        maps, affine = {}, None
        for label, path in (("first pass", folder / "first" / "mask.nii.gz"),
                            (f"without {removed}", folder / "mask.nii.gz")):
            values, affine = read_map(path)
            maps[f"fold {fold} run {run}, {label}"] = 1.0 - values
        style = figures.map_style(list(maps.values()), "1 - mask", signed=False,
                                  threshold_fraction=0.0)
        figure = (figures.panels_2d(maps, style) if affine is None else figures.orthogonal_slices(
            maps, affine, template_for(next(iter(maps.values())), affine), style))
        blocks.append(context.figure(figure, f"group_mask_qc_step2_fold-{fold}_run-{run}",
                                     "Group mask (1 - m) with the images quality check step 2 "
                                     "flagged (first pass) and without them (the mask every "
                                     "other result uses), whole image."))
    return blocks


def _grid_mask_blocks(context: ReportContext) -> list[Block]:
    """Paper 1, figs. 3-4: the grid masks of one fold/run, one panel per setting, one cut."""
    table = grid_masks(context.run)
    if table.empty:
        return []
    fold, run = min(zip(table.fold, table.run))
    chosen = table[(table.fold == fold) & (table.run == run)].sort_values(
        ["l1", "l2", "b1", "b2", "learning_rate"])
    maps, affine = {}, None
    for row in chosen.itertuples():
        values, affine = read_map(Path(row.path))
        label = (f"l1 {row.l1:g}, l2 {row.l2:g}\nb1 {row.b1:g}, b2 {row.b2:g}, "
                 f"lr {row.learning_rate:g}{' (flagged)' if row.flagged else ''}")
        maps[label] = 1.0 - values
    style = figures.map_style(list(maps.values()), "1 - mask", signed=False,
                              threshold_fraction=0.0)
    figure = (figures.panels_2d(maps, style) if affine is None else figures.one_cut(
        maps, affine, template_for(next(iter(maps.values())), affine), style))
    return [context.figure(figure, "grid_masks", f"Group masks (1 - m) of fold {fold} run {run} "
                           "over the hyperparameter grid, one panel per setting, the same "
                           "coronal slice (paper 1, figs. 3-4).")]


def _session_mask_blocks(context: ReportContext) -> list[Block]:
    indexes = [read_tsv(path) for _, _, path in
               fold_run_files(context.path("masks", "session"), "index.tsv")]
    if not indexes:
        return []
    index = pd.concat(indexes, ignore_index=True)
    keys = [c for c in ("fold", "run") if c in index]
    numeric = [c for c in ("iterations", "loss", "probability_before", "probability_after")
               if c in index]
    summary = index.groupby(keys)[numeric].mean() if keys else index[numeric].mean().to_frame().T
    summary.insert(0, "sessions", index.groupby(keys).size() if keys else len(index))
    blocks = [table_block(summary.reset_index() if keys else summary,
                          "Session masks: number of sessions and means per fold/run (index.tsv).")]
    if "flagged" in index and index["flagged"].astype(bool).any():
        flagged = index[index["flagged"].astype(bool)]
        columns = [c for c in (*keys, "participant_id", "session_id", "loss", "robust_z",
                               "iterations") if c in flagged]
        blocks.append(table_block(flagged[columns], "Session masks flagged as not converged "
                                  "(lowest loss an outlier among the masks of their model); "
                                  "robustness and statistics leave them out."))
    return blocks


# --- explanations --------------------------------------------------------------------------

def explanations_section(context: ReportContext) -> Section:
    section = Section("explanations", "Explanations")
    root = context.path("explanations")
    methods = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for method in methods:
        section.blocks.append(Block("heading", method))
        section.blocks.extend(Block("warning" if finding.verdict == "warning" else "text",
                                    finding.text) for finding in method_findings(context.run,
                                                                                 method))
        described = root / method / "explanation.json"
        description = json.loads(described.read_text()) if described.is_file() else {}
        if description:
            section.blocks.append(Block("text", "; ".join(
                f"{key}: {value}" for key, value in description.items() if value is not None)))
        if description.get("baseline_class") is not None:
            section.blocks.append(Block("text", (
                f"Reference: the mean training image of {description['baseline_class']} of each "
                "fold (--baseline-class): these maps show how a session departs from that "
                "class's average, not from an empty image.")))
        found = [item for item in fold_run_files(root / method, "group_*")
                 if item[2].name.endswith(MAP_SUFFIXES)]  # not the PNG previews of 2D maps
        diagnoses = sorted({map_stem(path).removeprefix("group_") for _, _, path in found},
                           key=lambda d: (d in CONTROL_LABELS, d))  # patients first
        for diagnosis in diagnoses:
            chosen = [item for item in found
                      if map_stem(item[2]) == f"group_{diagnosis}"]
            maps, affine = {}, None
            for label, (_, _, path) in zip(column_labels(chosen), chosen):
                maps[label], affine = read_map(path)
            style = figures.map_style(list(maps.values()), f"{method} relevance",
                                      signed=description.get("signed"))
            # inside the brain, as the localisation scores it (the share outside is a finding)
            section.blocks.extend(map_figures(context, f"{method}_group_{diagnosis}",
                                              f"{method}, group map of {diagnosis}", maps,
                                              affine, style, brain_only=True, family=method))
        indexes = fold_run_files(root / method, "index.tsv")
        sessions = sum(len(read_tsv(path)) for _, _, path in indexes)
        if not diagnoses:
            section.blocks.append(Block("text", f"{method}: no group map (group_<DIAGNOSIS>) "
                                        f"yet; {sessions} session map(s) indexed."))
        else:
            section.blocks.append(Block("text", f"{method}: {sessions} session map(s) indexed "
                                        f"in {len(indexes)} fold/run index.tsv file(s)."))
    overlays = _overlay_block(context, root, methods)
    if overlays is not None:
        section.blocks.append(overlays)
    cyce = _cyce_blocks(context)
    section.blocks.extend(cyce)
    if not methods and not cyce:
        section.note = "No explanation in the run folder (explanations/METHOD/fold-K/run-R/ is " \
                       "written by the explanation step)."
    return section


def _cyce_blocks(context: ReportContext) -> list[Block]:
    """CyCE (paper 3): the domain transfer table and the generator/discriminator losses."""
    blocks = []
    transfers = [read_tsv(path)
                 for _, _, path in fold_run_files(context.path("cyce"), "transfer.tsv")]
    if transfers:
        blocks.append(Block("heading", "CyCE"))
        blocks.append(table_block(pd.concat(transfers, ignore_index=True), "CyCE domain "
                                  "transfer (paper 3, 4.1): classifier output on x, G-(x) and "
                                  "G+(x), with CIs and paired t-tests against x (transfer.tsv)."))
    found = fold_run_files(context.path("cyce"), "loss.tsv")
    if found:
        losses = {label: read_tsv(path)
                  for label, (_, _, path) in zip(column_labels(found), found)}
        blocks.append(context.figure(figures.curves(losses, [
            ("CyCE losses (solid: generator, dashed: discriminator)",
             ["generator", "discriminator"])], x="step"), "cyce_losses",
            "CyCE training losses per step (cyce/fold-K/run-R/loss.tsv).", vector=True))
    return blocks


def _overlay_block(context: ReportContext, root: Path, methods: Sequence[str]) -> Block | None:
    """2D session maps of every method (and session masks) next to their image (paper 3 fig. 6)."""
    sources = {method: root / method for method in methods}
    sources["mask (1 - m)"] = context.path("masks", "session")
    per_method: dict[str, dict[str, Path]] = {}
    for name, folder in sources.items():
        found = [path for _, _, path in fold_run_files(folder, "sub-*")
                 if path.name.endswith(MAP_SUFFIXES)]
        if not found or len(map_grid(found[0]).shape) != 2:  # one header tells 2D from 3D
            continue
        for path in found:
            per_method.setdefault(map_stem(path), {}).setdefault(name, path)
    if not per_method or not context.run.cohort_file.is_file():
        return None
    from voxplain.data.cohort import read_cohort_table
    from voxplain.data.images import read_image

    cohort = read_cohort_table(context.run.cohort_file).set_index(
        ["participant_id", "session_id"])
    factor = int(context.run.read_config().get("train", {}).get("downsample", 1))
    rows = []
    for stem in sorted(per_method, key=lambda s: -len(per_method[s]))[
            : context.config.max_sessions_2d]:
        participant, _, session = stem.partition("_")
        if (participant, session) not in cohort.index:
            continue
        image = read_image(Path(cohort.loc[(participant, session), "path"]))[0]
        image = downsample(image, factor, spatial_dims=2).mean(axis=0)
        maps = {}
        for name, path in per_method[stem].items():
            values = read_map(path)[0]
            maps[name] = 1.0 - values if name.startswith("mask") else values
        if all(m.shape == image.shape for m in maps.values()):
            rows.append((f"{participant}\n{session}", image, maps))
    if not rows:
        return None
    return context.figure(figures.overlays_2d(rows), "explanations_2d",
                          "2D explanations: each image, then each method's map over it "
                          "(each map scaled by its own largest |value|; blue-red: signed).")


# --- slice models (paper 2) ------------------------------------------------------------------

#: Most slices shown per session in the slice figures (misclassified ones first).
MAX_SLICE_COLUMNS = 12


def slices_section(context: ReportContext) -> Section:
    """Slice models (paper 2, 3.5 and figs. 5-6): per session, which slices went to which class,
    and a session's slices with every method's maps, misclassified slices framed."""
    section = Section("slices", "Slices")
    view = context.run.slice_view()
    if view is None:  # the models read whole images (no --slice-axis)
        section.applies = False
        return section
    summary = context.path("evaluation", "slices.tsv")
    if summary.is_file():
        section.blocks.append(table_block(read_tsv(summary), "Per model and session: the "
                                          "misclassified slices and the class each went to, and "
                                          "the majority vote (evaluation/slices.tsv)."))
    root = context.path("explanations")
    keys = sorted(p.name for p in root.iterdir()
                  if p.is_dir() and fold_run_files(p, "slices.tsv")) if root.is_dir() else []
    if not keys:
        if not section.blocks:
            section.note = ("No slice prediction evaluated or explained yet (`voxplain evaluate "
                            "classification`, `voxplain explain`).")
        return section
    fold, run_index, first = fold_run_files(root / keys[0], "slices.tsv")[0]
    slices = read_tsv(first)
    for participant, session in _sessions_to_show(slices, context.config.max_sessions_2d):
        block = _slice_block(context, view, keys, fold, run_index, slices, participant, session)
        if block is not None:
            section.blocks.append(block)
    return section


def _short_label(context: ReportContext, key: str) -> str:
    """A row label of a figure: the method and, when not the true class, its target."""
    described = context.path("explanations", key, "explanation.json")
    if not described.is_file():
        return key
    record = json.loads(described.read_text())
    target = record.get("target", "true")
    return record["method"] + ("" if target == "true" else f"\n({target})")


def _sessions_to_show(slices: pd.DataFrame, limit: int) -> list[tuple[str, str]]:
    """Per diagnosis, the session with the most misclassified slices (then the first)."""
    counts = (slices.assign(wrong=~slices.correct.astype(bool))
              .groupby(["diagnosis", "participant_id", "session_id"], sort=True).wrong.sum()
              .reset_index().sort_values("wrong", ascending=False, kind="stable"))
    chosen = counts.drop_duplicates("diagnosis")
    return list(zip(chosen.participant_id, chosen.session_id))[:limit]


def _slice_block(context: ReportContext, view: Any, keys: Sequence[str], fold: int,
                 run_index: int, slices: pd.DataFrame, participant: str,
                 session: str) -> Block | None:
    from voxplain.data.cohort import read_cohort_table
    from voxplain.data.images import read_image

    cohort = read_cohort_table(context.run.cohort_file).set_index(
        ["participant_id", "session_id"])
    if (participant, session) not in cohort.index:
        return None
    rows = slices[(slices.participant_id == participant) & (slices.session_id == session)]
    wrong = rows[~rows.correct.astype(bool)]
    right = rows[rows.correct.astype(bool)]
    room = max(0, MAX_SLICE_COLUMNS - min(len(wrong), MAX_SLICE_COLUMNS // 2))
    spread = right.iloc[np.unique(np.linspace(0, len(right) - 1, min(room, len(right)))
                                  .round().astype(int))] if len(right) else right
    shown = pd.concat([wrong.head(MAX_SLICE_COLUMNS // 2), spread]).sort_values("slice")
    factor = int(context.run.read_config().get("train", {}).get("downsample", 1))
    volume = downsample(read_image(Path(cohort.loc[(participant, session), "path"]))[0],
                        factor, spatial_dims=3)[0]
    cut = [np.take(volume, int(k), axis=view.axis) for k in shown.slice]
    maps = {}
    labels = {key: _short_label(context, key) for key in keys}
    for key in sorted(keys, key=lambda k: ("\n" in labels[k], labels[k])):  # true class first
        folder = context.run.explanation_dir(key, fold, run_index)
        index = folder / "index.tsv"
        if not index.is_file():
            continue
        table = read_tsv(index)
        match = table[(table.participant_id == participant) & (table.session_id == session)]
        if match.empty:
            continue
        values = read_map(folder / match.path.iloc[0])[0]
        maps[labels[key]] = [np.take(values, int(k), axis=view.axis) for k in shown.slice]
    if not maps:
        return None
    captions = [f"{k}: {p} {q:.2f}" for k, p, q in zip(shown.slice, shown.predicted,
                                                       shown.predicted_probability)]
    figure = figures.slice_strip(cut, maps, captions, list(~shown.correct.astype(bool)),
                                 f"{participant} {session} ({rows.diagnosis.iloc[0]}), fold "
                                 f"{fold} run {run_index}")
    return context.figure(figure, f"slices_{participant}_{session}",
                          f"{participant} {session}, true class {rows.diagnosis.iloc[0]}: "
                          f"{len(wrong)} of {len(rows)} slices misclassified (framed in red, "
                          "label: slice, predicted class, its probability); rows: the first "
                          "channel, then each explanation's map of that slice.")


# --- robustness ----------------------------------------------------------------------------

def matrix_of(table: pd.DataFrame) -> pd.DataFrame | None:
    """``table`` as a labelled square similarity matrix, or None when it is not one.

    Accepted: a first column of labels equal to the other columns' names, or an all-numeric
    square table (rows labelled like its columns).
    """
    first = table.columns[0]
    if not pd.api.types.is_numeric_dtype(table[first]) and set(table[first].astype(str)) == set(
            map(str, table.columns[1:])):
        matrix = table.set_index(first)
    elif table.shape[0] == table.shape[1]:
        matrix = table.set_axis(table.columns, axis=0)
    else:
        return None
    if not all(pd.api.types.is_numeric_dtype(t) for t in matrix.dtypes):
        return None
    return matrix.astype(float)


def _long_groups(table: pd.DataFrame) -> tuple[str, str] | None:
    """``(group column, value column)`` of a long table that compares a few groups."""
    labels = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])
              and 2 <= table[c].nunique() <= 8 and not c.startswith(("participant", "session"))]
    labels.sort(key=lambda c: c != "kind")
    values = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    return (labels[0], values[0]) if labels and values else None


def robustness_section(context: ReportContext) -> Section:
    section = Section("robustness", "Robustness of the explanations")
    folder = context.path("evaluation", "robustness")
    files = visible(folder.rglob("*.tsv")) if folder.is_dir() else []
    for path in files:
        name = str(path.relative_to(folder).with_suffix(""))
        table = read_tsv(path)
        matrix = matrix_of(table) if len(table.columns) > 1 else None
        if matrix is not None:
            section.blocks.append(context.figure(figures.heatmap(matrix, name),
                                                 f"robustness_{name}", f"{name}.tsv"))
            continue
        groups = _long_groups(table) if path.stem != "summary" else None
        if groups is not None:
            label, value = groups
            section.blocks.append(context.figure(figures.box_plot(
                {str(k): v[value].to_numpy() for k, v in table.groupby(label)}, value, name),
                f"robustness_{name}", f"{name}.tsv: {value} by {label} (e.g. intra- vs "
                "inter-subject pairs).", vector=True))
        section.blocks.append(table_block(table, f"{name}.tsv"))
    if not files:
        section.note = "No evaluation/robustness/*.tsv in the run folder: the robustness step " \
                       "(inter-fold, inter-run, intra- vs inter-subject similarity) writes them."
    return section


# --- statistics ----------------------------------------------------------------------------

def statistics_section(context: ReportContext) -> Section:
    section = Section("statistics", "Statistics")
    root = context.path("stats")
    folders = ([root] if any(root.glob("*.*")) else []) + sorted(
        p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        label = "stats" if folder == root else folder.name
        section.blocks.append(Block("heading", label))
        maps = visible(p for p in folder.iterdir() if p.name.endswith(MAP_SUFFIXES))
        t_maps = [p for p in maps if map_stem(p).endswith("_T")]
        permuted = [p for p in t_maps if map_stem(p).startswith("permutation_")]
        for path in [p for p in t_maps if p not in permuted][: context.config.max_columns]:
            values, affine = read_map(path)
            stem = map_stem(path)
            style = figures.map_style([values], "T", signed=True)
            section.blocks.extend(map_figures(context, f"stats_{label}_{stem}",
                                              f"{label}: {stem} (T statistic)", {stem: values},
                                              affine, style, viewer=False))
        for path in permuted[: context.config.max_columns]:
            section.blocks.extend(_permutation_figure(context, label, path))
        others = [p.name for p in maps if p not in t_maps]
        if others:
            section.blocks.append(Block("text", f"Other maps in stats/{label}: "
                                        f"{', '.join(others)}."))
        for path in visible(folder.glob("*.tsv")):
            table = read_tsv(path)
            percentile = [c for c in table.columns if "percentile" in c.lower() or "p95" in c]
            group = [c for c in table.columns if c in ("group", "diagnosis")]
            if percentile and group and pd.api.types.is_numeric_dtype(table[percentile[0]]):
                section.blocks.append(context.figure(figures.box_plot(
                    {str(k): v[percentile[0]].to_numpy() for k, v in table.groupby(group[0])},
                    percentile[0], f"{label}: {path.stem}"), f"stats_{label}_{path.stem}",
                    f"{label}: {percentile[0]} of each normalised map by {group[0]}.",
                    vector=True))
            section.blocks.append(table_block(table, f"{label}/{path.name}"))
        for path in visible(folder.glob("*.json")):
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                section.blocks.append(table_block(pd.DataFrame(
                    {"key": list(record), "value": [json.dumps(v) if isinstance(v, (list, dict))
                                                    else v for v in record.values()]}),
                    f"{label}/{path.name}"))
    if not section.blocks:
        section.note = "No stats/ in the run folder: the statistics step writes T-maps, " \
                       "clusters.tsv and the 95th-percentile comparison there."
    return section


def _permutation_figure(context: ReportContext, label: str, t_path: Path) -> list[Block]:
    """One figure of a permutation test: its T where the FWE p of each inference written
    beside it (``_logp-TAG`` maps, -log10 p) is below the summary's alpha, a column each."""
    stem = map_stem(t_path)[: -len("_T")]
    summary = t_path.parent / "summary.tsv"
    alpha = 0.05
    if summary.is_file():
        rows = read_tsv(summary)
        rows = rows[rows.test == stem] if "test" in rows else rows.head(0)
        alpha = float(rows.alpha.iloc[0]) if len(rows) and "alpha" in rows else alpha
    t, affine = read_map(t_path)
    columns = {}
    for tag, inference in (("maxt", "max-T"), ("tfce", "TFCE"), ("cluster-size", "cluster-size"),
                           ("cluster-mass", "cluster-mass")):
        path = next(iter(t_path.parent.glob(f"{stem}_logp-{tag}.*")), None)
        if path is not None:
            logp, _ = read_map(path)
            with np.errstate(invalid="ignore"):
                columns[inference] = np.where(logp > -np.log10(alpha), t, 0.0)
    if not columns:
        return []
    style = figures.map_style(list(columns.values()), "T", signed=True)
    title = f"{label}: {stem}, T at the voxels with FWE p < {alpha:g}, one column per inference"
    if affine is None:
        return [context.figure(figures.panels_2d(columns, style), f"stats_{label}_{stem}_panels",
                               f"{title}.")]
    return [context.figure(figures.orthogonal_slices(columns, affine, template_for(t, affine),
                                                     style), f"stats_{label}_{stem}_ortho",
                           f"{title}, over the MNI GM template.")]


# --- ground truth --------------------------------------------------------------------------

def localisation_section(context: ReportContext) -> Section:
    from voxplain.evaluate.localisation import localisation_summary, session_localisation_summary

    section = Section("localisation", "Ground-truth localisation")
    path = context.path("evaluation", "localisation.tsv")
    if path.is_file():
        table = read_tsv(path)
        if {"key", "method", "layer"} <= set(table.columns):  # as the step writes it
            table = table.assign(layer=table.layer.astype(object).fillna(""))  # "" reads as NaN
            shown, caption = localisation_summary(table), "mean over the fold/runs (each: "
        else:
            shown, caption = table, "("
        section.blocks.append(table_block(_baselines_labelled(shown), "How well each "
                                          "explanation points at the known atrophy, beside "
                                          "the baselines that no explanation method made, "
                                          f"{caption}evaluation/localisation.tsv)."))
        section.blocks.extend(_edge_filter_verdict(table, "group maps, mean over fold/runs"))
    sessions = context.path("evaluation", "localisation_sessions.tsv")
    if sessions.is_file():
        table = read_tsv(sessions)
        section.blocks.append(table_block(
            _baselines_labelled(session_localisation_summary(table)), "How well each "
            "explanation points at every session's own ground truth, beside the baselines, "
            "mean per diagnosis (per map: evaluation/localisation_sessions.tsv)."))
        section.blocks.extend(_edge_filter_verdict(table, "session maps with a truth"))
    if not section.blocks:
        section.note = "No evaluation/localisation.tsv or localisation_sessions.tsv: they are " \
                       "written for cohorts with a ground truth (voxplain evaluate " \
                       "localisation --against / --session-truth)."
    return section


def _baselines_labelled(table: pd.DataFrame) -> pd.DataFrame:
    """A localisation table with a first column ``row`` telling the explanations from the
    baselines (``baseline:NAME``, :mod:`voxplain.evaluate.baselines`), these last."""
    from voxplain.evaluate.baselines import is_baseline

    if "method" not in table:
        return table
    baseline = table["method"].astype(str).map(is_baseline)
    labelled = table.assign(row=np.where(baseline, "baseline", "explanation"))
    ordered = pd.concat([labelled[~baseline], labelled[baseline]])
    return ordered[["row", *table.columns]]


def _edge_filter_verdict(table: pd.DataFrame, what: str) -> list[Block]:
    """A sentence naming the explanations whose localisation AUC does not beat the edge filter
    of the input on the same maps (none without baseline rows)."""
    from voxplain.evaluate.baselines import compare_with_baseline

    compared = compare_with_baseline(table, "edge", "auc")
    if compared is None or compared.empty:
        return []
    below = compared[~compared.beats]
    if below.empty:
        return [Block("text", f"Every explanation beats the edge filter of the input "
                              f"(baseline:edge) in localisation AUC ({what}).")]
    named = ", ".join(f"{key} ({row.auc:.3f}, edge filter {row.baseline:.3f})"
                      for key, row in below.iterrows())
    return [Block("warning", f"Not better than an edge filter of the input (baseline:edge) in "
                             f"localisation AUC on the same maps ({what}): {named}.")]


# --- findings ------------------------------------------------------------------------------

def findings_section(context: ReportContext) -> Section:
    """What the reader must know before any figure: which classifiers, maps and masks cannot be
    trusted, and why (:mod:`voxplain.report.trust`)."""
    section = Section("findings", "Can these results be trusted?")
    findings = run_findings(context.run)
    warnings = [f for f in findings if f.verdict == "warning"]
    if not findings:
        section.note = "Nothing to check yet: no trained model in the run folder."
        return section
    section.blocks.append(Block("warning" if warnings else "text", (
        f"{len(warnings)} warning(s): the results marked 'warning' below cannot be taken at "
        "face value." if warnings else "No warning: every check below passed.")))
    section.blocks.append(table_block(findings_table(findings), "Checks of the classifiers, "
                                      "explanations and masks (rules: voxplain.report.trust).",
                                      prose=True))
    return section
