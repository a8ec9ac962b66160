"""Robustness experiments of paper 1 (3.2-3.3) on a run folder, for masks and attributions.

Every experiment compares maps by pairs and reports the mean of the pairs (paper 1, 2.3.3):

- **inter-fold / inter-run** (3.3): group maps of different folds of one run / of different runs
  (training seeds) of one fold; one matrix of all group maps, the pairs picked from it;
- **intra- vs inter-subject** (2.3.4, 3.2.2): session maps of one model; intra-subject = for each
  subject the mean over pairs of its sessions, then the mean (SD) over subjects; inter-subject =
  the mean (SD) over pairs of baseline sessions (first session) of different subjects of one
  diagnosis. Paper 1: 0.94 vs 0.80 (ROI cosine);
- **neighbouring hyperparameters** (3.2.3, tables 2-3): for each eq.-2 hyperparameter and each
  setting of the three others, a square table of the masks obtained with its values (rows and
  columns: the same values, betas ascending, lambdas descending as in the paper; diagonal
  blank); neighbours are consecutive values of that order;
- **across datasets** (3.2.1, fig. 5): group maps of the same fold/run on the run's cohort and
  on another cohort the run's models were applied to (``voxplain mask group --cohort``,
  ``voxplain explain --cohort``), fold by fold in ``METHOD/datasets_cohort-LABEL.tsv``; for
  masks with ``prob_cnn`` also each dataset's mask applied to the other dataset's images (the
  fold's correctly classified validation patients, the other cohort's correctly classified
  patients). Or, with ``other_run``, the group maps of the same fold/run in another run folder.

Metrics: ROI cosine (:func:`~voxplain.evaluate.similarity.roi_cosine_similarity`, AAL2, 3D maps)
for every method; Spearman rank correlation over the brain for attribution maps; prob_CNN
(:func:`~voxplain.evaluate.similarity.symmetric_prob_cnn`, forward passes: on request) for masks.

Writes ``RUN/evaluation/robustness/``: ``METHOD/*.tsv`` matrices and pair tables, and
``summary.tsv`` with a row per method, experiment and metric, so methods compare side by side.
Experiments whose maps the folder does not hold yet are skipped with a logged message.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import GroupMaskConfig, MaskConfig, RobustnessConfig
from voxplain.data.atlas import Atlas
from voxplain.data.template import brain_mask
from voxplain.evaluate.similarity import (cosine_matrix, masked_probabilities, prob_cnn,
                                          rank_correlation_matrix, roi_vectors)
from voxplain.io import write_tsv
from voxplain.run import RunFolder, Unit, fold_unit_name
from voxplain.run.executor import map_units, with_absolute_paths
from voxplain.run.maps import (GRID_PARAMETERS, MASK, available_methods, cohort_methods,
                               converged_session_maps, grid_masks, group_maps, map_grid, map_kind,
                               read_map)
from voxplain.steps.context import RunContext, load_context, release_contexts, shared_context
from voxplain.steps.masks import correctly_classified, reference_for

log = logging.getLogger("voxplain")

SUMMARY_COLUMNS = ["method", "experiment", "diagnosis", "metric", "mean", "sd", "median",
                   "n_pairs", "n_subjects", "n_maps", "table"]
#: Order of each hyperparameter's values in paper 1's tables 2-3.
DESCENDING = {"b1": False, "b2": False, "l1": True, "l2": True}


def run_robustness(config: RobustnessConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Every robustness experiment the run folder holds maps for; returns the summary table.
    Records the settings as ``[evaluate_robustness]`` (replaced at each run)."""
    run = RunFolder(config.run)
    run.record_config("evaluate_robustness", config, replace=True)
    out = run.evaluation_file("robustness")
    methods = config.methods if config.methods is not None else available_methods(run)
    if not methods:
        log.warning("robustness: %s holds no mask and no explanation yet: nothing to compare",
                    run.root)
    rows: list[dict] = []
    contexts = Contexts(run, config.device)
    for method in methods:
        rows += group_experiments(run, method, out, config.include_flagged)
        rows += session_experiments(run, method, out, config.include_flagged)
        rows += cohort_experiments(run, method, out, config, contexts)
        if config.other_run is not None:
            rows += dataset_experiment(run, RunFolder(config.other_run), method, out)
    if config.methods is None or MASK in config.methods:
        rows += grid_experiments(run, out, config.include_flagged)
        if config.prob_cnn:
            rows += prob_cnn_experiments(run, config, out, progress)
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    write_tsv(out / "summary.tsv", summary)
    return summary


@dataclass(frozen=True)
class MapSet:
    """Maps compared together: labels, pairwise similarity matrices per metric."""

    labels: list[str]
    matrices: dict[str, np.ndarray]  # metric -> (M, M)


def compare_maps(paths: Sequence[str], labels: Sequence[str], method: str) -> MapSet:
    """Pairwise similarity of the maps in ``paths`` under every metric that applies.

    ROI cosine needs 3D maps on an MNI grid (AAL2); rank correlation is computed for attribution
    maps only (masks are mostly ties at 1).
    """
    maps = np.stack([read_map(path) for path in paths])
    grid = map_grid(paths[0])
    matrices = {}
    kind = map_kind(method)
    if maps.ndim == 4:
        matrices["roi_cosine"] = cosine_matrix(roi_vectors(maps, Atlas.aal2(grid), kind))
    if kind == "attribution":
        brain = brain_mask(grid) if maps.ndim == 4 else None
        matrices["rank_correlation"] = rank_correlation_matrix(
            maps, brain if brain is not None and brain.any() else None)
    return MapSet(list(labels), matrices)


def group_experiments(run: RunFolder, method: str, out: Path,
                      include_flagged: bool = False) -> list[dict]:
    """Inter-fold and inter-run similarity of group maps (paper 1, 3.3), per diagnosis; flagged
    group masks are left out unless ``include_flagged``."""
    table = group_maps(run, method, include_flagged)
    if table.empty:
        log.info("robustness %s: no group map: inter-fold and inter-run skipped", method)
        return []
    rows = []
    for diagnosis, maps in table.groupby("diagnosis", sort=True):
        maps = maps.sort_values(["fold", "run"], ignore_index=True)
        labels = [f"fold-{f}_run-{r}" for f, r in zip(maps.fold, maps.run)]
        compared = compare_maps(maps.path.tolist(), labels, method)
        selections = fold_run_pairs(maps)
        suffix = f"_{diagnosis}" if diagnosis else ""
        for metric, matrix in compared.matrices.items():
            name = f"group{suffix}_{metric}.tsv"
            write_matrix(out / method / name, compared.labels, matrix)
            for experiment, selected in selections.items():
                values = _upper(matrix, selected)
                if not len(values):
                    log.info("robustness %s: %s skipped (one %s only)", method, experiment,
                             "fold per run" if experiment == "inter-fold" else "run per fold")
                    continue
                rows.append(_row(method, experiment, metric, values, len(maps),
                                 f"{method}/{name}", diagnosis=diagnosis))
    return rows


def fold_run_pairs(maps: pd.DataFrame) -> dict[str, np.ndarray]:
    """``(M, M)`` selections of pairs of ``maps`` (fold, run columns): ``inter-fold`` = other
    fold, same run; ``inter-run`` = same fold, other run (paper 1, 3.3)."""
    folds, runs = maps.fold.to_numpy(), maps.run.to_numpy()
    return {"inter-fold": (folds[:, None] != folds) & (runs[:, None] == runs),
            "inter-run": (folds[:, None] == folds) & (runs[:, None] != runs)}


def session_experiments(run: RunFolder, method: str, out: Path,
                        include_flagged: bool = False) -> list[dict]:
    """Intra-subject vs inter-subject similarity of session maps (paper 1, 3.2.2); session masks
    flagged as not converged are left out unless ``include_flagged``."""
    table = converged_session_maps(run, method, include_flagged)
    if table.empty:
        log.info("robustness %s: no session map: intra/inter-subject skipped", method)
        return []
    pairs = []
    for (fold, run_index), maps in table.groupby(["fold", "run"], sort=True):
        maps = maps.reset_index(drop=True)
        labels = [f"{p}_{s}" for p, s in zip(maps.participant_id, maps.session_id)]
        compared = compare_maps(maps.path.tolist(), labels, method)
        for metric, matrix in compared.matrices.items():
            write_matrix(out / method / f"session_fold-{fold}_run-{run_index}_{metric}.tsv",
                         labels, matrix)
        pairs.append(session_pairs(maps, compared).assign(fold=fold, run=run_index))
    pairs_table = pd.concat(pairs, ignore_index=True)
    write_tsv(out / method / "session_pairs.tsv", pairs_table)
    rows = []
    for metric in [c for c in pairs_table.columns if c in ("roi_cosine", "rank_correlation")]:
        for diagnosis, pairs_of in pairs_table.groupby("diagnosis", sort=True):
            rows += intra_inter_rows(pairs_of, method, metric,
                                     int((table.diagnosis == diagnosis).sum()))
    return rows


def session_pairs(maps: pd.DataFrame, compared: MapSet) -> pd.DataFrame:
    """Intra-subject pairs (sessions of one subject) and inter-subject pairs (baselines of two
    subjects of one diagnosis) of one model's session maps, with every metric."""
    baseline = set(_baselines(maps))
    records = []
    for i, j in itertools.combinations(range(len(maps)), 2):
        a, b = maps.iloc[i], maps.iloc[j]
        if a.participant_id == b.participant_id:
            kind = "intra-subject"
        elif i in baseline and j in baseline and a.diagnosis == b.diagnosis:
            kind = "inter-subject"
        else:
            continue
        records.append({"kind": kind, "participant_a": a.participant_id,
                        "session_a": a.session_id, "participant_b": b.participant_id,
                        "session_b": b.session_id, "diagnosis": a.diagnosis,
                        **{metric: m[i, j] for metric, m in compared.matrices.items()}})
    return pd.DataFrame(records, columns=["kind", "participant_a", "session_a", "participant_b",
                                          "session_b", "diagnosis", *compared.matrices])


def intra_inter_rows(pairs: pd.DataFrame, method: str, metric: str, n_maps: int,
                     table: str = "session_pairs.tsv") -> list[dict]:
    """Summary rows: intra-subject as mean (SD) over subjects of their mean pair similarity,
    inter-subject as mean (SD) over pairs."""
    rows = []
    intra = pairs[pairs.kind == "intra-subject"]
    if intra.empty:
        log.info("robustness %s: no subject with two session maps: intra-subject skipped",
                 method)
    else:
        per_subject = intra.groupby(["fold", "run", "participant_a"])[metric].mean()
        rows.append(_row(method, "intra-subject", metric, per_subject.to_numpy(), n_maps,
                         f"{method}/{table}", n_pairs=len(intra),
                         n_subjects=len(per_subject), diagnosis=intra.diagnosis.iloc[0]))
    inter = pairs[pairs.kind == "inter-subject"]
    if inter.empty:
        log.info("robustness %s: fewer than two subjects per model: inter-subject skipped",
                 method)
    else:
        subjects = len(set(inter.participant_a) | set(inter.participant_b))
        rows.append(_row(method, "inter-subject", metric, inter[metric].to_numpy(), n_maps,
                         f"{method}/{table}", n_subjects=subjects,
                         diagnosis=inter.diagnosis.iloc[0]))
    return rows


def grid_experiments(run: RunFolder, out: Path, include_flagged: bool = False) -> list[dict]:
    """Tables 2-3 of paper 1: ROI similarity of masks across one hyperparameter's values
    (flagged masks left out unless ``include_flagged``)."""
    table = grid_masks(run, include_flagged)
    if table.empty:
        log.info("robustness mask: no mask grid (masks/grid): hyperparameter tables skipped")
        return []
    rows = []
    # masks of one learning rate are compared (the grid's other dimensions at a time); the
    # tables of a grid with several learning rates name theirs
    several_rates = table.learning_rate.nunique() > 1
    for (fold, run_index, rate), masks in table.groupby(["fold", "run", "learning_rate"],
                                                        sort=True):
        masks = masks.reset_index(drop=True)
        labels = [f"l1-{a:g}_l2-{b:g}_b1-{c:g}_b2-{d:g}"
                  for a, b, c, d in masks[list(GRID_PARAMETERS)].itertuples(index=False)]
        similarity = compare_maps(masks.path.tolist(), labels, MASK).matrices.get("roi_cosine")
        if similarity is None:
            log.info("robustness mask: grid masks are not 3D: hyperparameter tables skipped")
            return []
        for parameter in GRID_PARAMETERS:
            others = [p for p in GRID_PARAMETERS if p != parameter]
            for fixed, subset in masks.groupby(others, sort=True):
                if subset[parameter].nunique() < 2:
                    continue
                subset = subset.sort_values(parameter, ascending=not DESCENDING[parameter])
                matrix = grid_table(subset[parameter].tolist(), parameter,
                                    similarity[np.ix_(subset.index, subset.index)])
                setting = "_".join(f"{p}-{v:g}" for p, v in zip(others, fixed))
                setting += f"_lr-{rate:g}" if several_rates else ""
                name = f"grid_fold-{fold}_run-{run_index}_{parameter}_at_{setting}.tsv"
                write_tsv(out / MASK / name, matrix)
                neighbours = np.diag(matrix.iloc[:, 1:].to_numpy(float), k=1)
                rows.append(_row(MASK, f"grid {parameter} neighbours at {setting}",
                                 "roi_cosine", neighbours, len(subset), f"{MASK}/{name}"))
    return rows


def grid_table(values: Sequence[float], parameter: str, similarity: np.ndarray) -> pd.DataFrame:
    """Paper 1's table layout: rows and columns ``PARAM = value`` in the given order, blank
    diagonal."""
    names = [f"{parameter} = {v:g}" for v in values]
    matrix = np.array(similarity, dtype=float)
    np.fill_diagonal(matrix, np.nan)
    table = pd.DataFrame(matrix, columns=names)
    table.insert(0, parameter, names)
    return table


def dataset_experiment(run: RunFolder, other: RunFolder, method: str, out: Path) -> list[dict]:
    """Group maps of one fold/run in two run folders (the same models on two cohorts)."""
    ours, theirs = group_maps(run, method), group_maps(other, method)
    pairs = ours.merge(theirs, on=["fold", "run", "diagnosis"], suffixes=("", "_other"))
    if pairs.empty:
        log.info("robustness %s: no group map of a common fold/run in %s: across datasets "
                 "skipped", method, other.root)
        return []
    records = []
    for row in pairs.itertuples():
        if _model_digest(run, row.fold, row.run) != _model_digest(other, row.fold, row.run):
            log.warning("robustness %s: fold %d run %d: the models of %s and %s differ; the "
                        "comparison mixes datasets and models", method, row.fold, row.run,
                        run.root, other.root)
        compared = compare_maps([row.path, row.path_other], ["this", "other"], method)
        records.append({"fold": row.fold, "run": row.run, "diagnosis": row.diagnosis,
                        **{metric: m[0, 1] for metric, m in compared.matrices.items()}})
    table = pd.DataFrame(records)
    write_tsv(out / method / "datasets.tsv", table)
    return [_row(method, "across datasets", metric, rows[metric].to_numpy(), 2 * len(rows),
                 f"{method}/datasets.tsv", diagnosis=diagnosis)
            for diagnosis, rows in table.groupby("diagnosis", sort=True)
            for metric in table.columns if metric in ("roi_cosine", "rank_correlation")]


class Contexts:
    """The run's cohort and other cohorts on the training grid, each loaded once when first
    needed (forward passes of prob_CNN)."""

    def __init__(self, run: RunFolder, device: str) -> None:
        self.run, self.device = run, device
        self._loaded: dict[str | None, RunContext] = {}

    def __call__(self, cohort: str | None = None) -> RunContext:
        """The run's own cohort (None) or the cohort TSV ``cohort``."""
        if cohort not in self._loaded:
            self._loaded[cohort] = load_context(self.run, self.device, None,
                                                None if cohort is None else Path(cohort))
        return self._loaded[cohort]


def cohort_experiments(run: RunFolder, method: str, out: Path, config: RobustnessConfig,
                       contexts: Contexts) -> list[dict]:
    """Across datasets in one run folder (paper 1, 3.2.1, fig. 5): each fold/run's group map
    on the run's cohort against its group map on every other cohort the folder holds maps of.

    Writes ``METHOD/datasets_cohort-LABEL.tsv``: fold, run, diagnosis, the similarity metrics
    and, for masks with ``config.prob_cnn``, ``prob_cnn_cohort_mask`` (the model's probability
    of the masked class on its correctly classified validation patients masked by the other
    cohort's mask), ``prob_cnn_run_mask`` (the other cohort's correctly classified patients
    masked by the run's mask) and ``prob_cnn``, their mean. Flagged masks are left out unless
    ``config.include_flagged``."""
    rows = []
    ours = group_maps(run, method, config.include_flagged)
    for label, key in cohort_methods(run, method).items():
        theirs = group_maps(run, key, config.include_flagged,
                            cohort=label if method == MASK else None)
        pairs = ours.merge(theirs, on=["fold", "run", "diagnosis"], suffixes=("", "_other"))
        if pairs.empty:
            log.info("robustness %s: no group map of one fold/run on both the run's cohort and "
                     "cohort %s: across datasets skipped", method, label)
            continue
        records = []
        for row in pairs.itertuples():
            compared = compare_maps([row.path, row.path_other], ["this", "other"], method)
            record = {"fold": row.fold, "run": row.run, "diagnosis": row.diagnosis,
                      **{metric: m[0, 1] for metric, m in compared.matrices.items()}}
            if method == MASK and config.prob_cnn:
                record.update(_cross_dataset_prob_cnn(contexts, row, config))
            records.append(record)
        table = pd.DataFrame(records)
        name = f"{method}/datasets_cohort-{label}.tsv"
        write_tsv(out / name, table)
        rows += [_row(method, f"across datasets ({label})", metric, frame[metric].to_numpy(),
                      2 * len(frame), name, diagnosis=diagnosis)
                 for diagnosis, frame in table.groupby("diagnosis", sort=True)
                 for metric in table.columns
                 if metric in ("roi_cosine", "rank_correlation", "prob_cnn")]
    return rows


def _cross_dataset_prob_cnn(contexts: Contexts, pair, config: RobustnessConfig) -> dict:
    """prob_CNN of one fold/run's masks on the run's cohort and on another cohort, each applied
    to the other dataset's correctly classified images of the masked diagnosis."""
    summary = Path(pair.path_other).parent / "summary.json"
    source = json.loads(summary.read_text()).get("cohort") if summary.is_file() else None
    if source is None or not Path(source).is_file():
        log.warning("prob_CNN across datasets: %s names no readable cohort TSV: skipped", summary)
        return {}
    own, other = contexts(), contexts(source)
    model, classes = next((fitted.model, fitted.classes) for fold, run_index, fitted
                          in own.models([pair.fold]) if run_index == pair.run)
    target = classes.index(pair.diagnosis)
    own_images = correctly_classified(own, model, own.run.read_split(pair.fold, "validation"),
                                      classes, pair.diagnosis)
    other_images = correctly_classified(other, model, other.table, classes, pair.diagnosis)
    if own_images.empty or other_images.empty:
        return {}
    reference = reference_for(own, _mask_settings(own.run, "mask_group"), classes,
                              own.run.read_split(pair.fold, "train"))
    options = {"perturbation": reference, "batch_size": config.batch_size, "device": own.device}
    on_own = prob_cnn(model, read_map(pair.path_other), own.images_of(own_images), target,
                      **options)
    on_other = prob_cnn(model, read_map(pair.path), other.images_of(other_images), target,
                        **options)
    return {"prob_cnn_cohort_mask": on_own, "prob_cnn_run_mask": on_other,
            "prob_cnn": (on_own + on_other) / 2}


def prob_cnn_experiments(run: RunFolder, config: RobustnessConfig, out: Path,
                         progress: Progress | None = None) -> list[dict]:
    """prob_CNN dissimilarity of group masks (inter-fold/run) and session masks (intra/inter).

    Matrix entry ``[i, j]``: mean probability of the masked class given by model ``i`` to its
    images masked by mask ``j`` (group: model i's correctly classified validation patients;
    session: session i's image, model of the fold). A pair's value is the mean of its two cross
    entries, as :func:`~voxplain.evaluate.similarity.symmetric_prob_cnn`.

    The forward passes run as units of ``config.executor``: a row of the group matrix (one
    model on every group mask) and one fold/run's session matrix each
    (:class:`ProbCNNUnit`); the matrices and tables are written here from their results.
    """
    groups = group_maps(run, MASK, config.include_flagged)
    sessions = converged_session_maps(run, MASK, config.include_flagged)
    if groups.empty and sessions.empty:
        log.info("robustness mask: no mask: prob_CNN skipped")
        return []
    trained = {(fold, run_index) for fold, run_index, _ in run.selected_models(None)}
    groups, sessions = (maps[[(f, r) in trained for f, r in zip(maps.fold, maps.run)]]
                        .sort_values(["fold", "run"], kind="stable", ignore_index=True)
                        if len(maps) else maps
                        for maps in (groups, sessions))
    shipped = with_absolute_paths(config)
    masks = tuple(str(path) for path in groups.path)
    units = [Unit(f"group masks on {fold_unit_name(row.fold, row.run)}",
                  ProbCNNUnit(shipped, "group", row.fold, row.run, row.diagnosis, masks))
             for row in groups.itertuples()]
    session_folds = [(int(fold), int(run_index), maps.reset_index(drop=True))
                     for (fold, run_index), maps in sessions.groupby(["fold", "run"], sort=True)]
    units += [Unit(f"session masks of {fold_unit_name(fold, run_index)}",
                   ProbCNNUnit(shipped, "session", fold, run_index, "", tuple(maps.path),
                               tuple(maps.participant_id), tuple(maps.session_id),
                               tuple(maps.diagnosis)))
              for fold, run_index, maps in session_folds]
    try:
        results = map_units(units, prob_cnn_unit, config.executor, "prob_CNN", progress)
    finally:
        release_contexts()
    rows = []
    if not groups.empty:
        rows += _group_prob_cnn(groups, results[:len(groups)], out)
    if session_folds:
        rows += _session_prob_cnn(sessions, session_folds, results[len(groups):], out)
    return rows


def _mask_settings(run: RunFolder, section: str) -> GroupMaskConfig:
    """The perturbation settings the masks were made with (defaults if not recorded)."""
    values = dict(run.read_config().get(section, {}).get("mask", {}))
    return GroupMaskConfig.model_validate({k: v for k, v in values.items()
                                           if k in MaskConfig.model_fields})


@dataclass(frozen=True)
class ProbCNNUnit:
    """One unit of prob_CNN (:mod:`voxplain.run.executor`): the model of ``fold``/``run`` on
    masked images. ``level`` "group": its correctly classified validation images of
    ``diagnosis``, masked by each of ``masks`` (a row of the group matrix); "session": the
    sessions ``participants``/``sessions`` (of ``diagnoses``), each masked by each of their
    masks ``masks`` (the fold/run's session matrix). Small and picklable: a Ray worker reloads
    the run's context (once per worker) and the model."""

    config: RobustnessConfig
    level: str
    fold: int
    run: int
    diagnosis: str
    masks: tuple[str, ...]
    participants: tuple[str, ...] = ()
    sessions: tuple[str, ...] = ()
    diagnoses: tuple[str, ...] = ()


def prob_cnn_unit(unit: ProbCNNUnit) -> np.ndarray:
    """The probabilities of one :class:`ProbCNNUnit`: a row ``(masks,)`` of the group matrix
    (NaN where the model has no correctly classified image), or the ``(sessions, masks)``
    matrix of a fold/run; here or in a Ray task."""
    config = unit.config
    context = shared_context(config.run, config.device)
    fitted = context.model(unit.fold, unit.run)
    model, classes = fitted.model, fitted.classes
    masks = [read_map(path) for path in unit.masks]
    options = {"batch_size": config.batch_size, "device": context.device}
    train = context.run.read_split(unit.fold, "train")
    if unit.level == "group":
        validation = context.run.read_split(unit.fold, "validation")
        images = correctly_classified(context, model, validation, classes, unit.diagnosis)
        if images.empty:
            log.info("prob_CNN: fold %d run %d has no correctly classified %s validation image",
                     unit.fold, unit.run, unit.diagnosis)
            return np.full(len(masks), np.nan)
        reference = reference_for(context, _mask_settings(context.run, "mask_group"), classes,
                                  train)
        stack = context.images[images.image_index.to_numpy()]
        return np.array([prob_cnn(model, mask, stack, classes.index(unit.diagnosis),
                                  perturbation=reference, **options) for mask in masks])
    index = context.table.reset_index(names="image_index")
    rows = pd.DataFrame({"participant_id": unit.participants, "session_id": unit.sessions})
    rows = rows.merge(index[["participant_id", "session_id", "image_index"]], how="left")
    stack = context.images[rows.image_index.to_numpy()]
    targets = np.array([classes.index(d) for d in unit.diagnoses])
    reference = reference_for(context, _mask_settings(context.run, "mask_session"), classes,
                              train)
    return np.column_stack([masked_probabilities(model, mask, stack, targets,
                                                 perturbation=reference, **options)
                            for mask in masks])


def _group_prob_cnn(groups: pd.DataFrame, rows_of: list[np.ndarray], out: Path) -> list[dict]:
    matrix = np.vstack(rows_of)
    labels = [f"fold-{f}_run-{r}" for f, r in zip(groups.fold, groups.run)]
    write_matrix(out / MASK / "group_prob_cnn.tsv", labels, matrix)
    pair = (matrix + matrix.T) / 2
    rows = []
    for experiment, selected in fold_run_pairs(groups).items():
        values = _upper(pair, selected)
        if len(values):
            rows.append(_row(MASK, experiment, "prob_cnn", values, len(groups),
                             f"{MASK}/group_prob_cnn.tsv", diagnosis=groups.diagnosis.iloc[0]))
    return rows


def _session_prob_cnn(sessions: pd.DataFrame, folds: list[tuple[int, int, pd.DataFrame]],
                      matrices: list[np.ndarray], out: Path) -> list[dict]:
    pairs = []
    for (fold, run_index, maps), matrix in zip(folds, matrices):
        labels = [f"{p}_{s}" for p, s in zip(maps.participant_id, maps.session_id)]
        write_matrix(out / MASK / f"session_fold-{fold}_run-{run_index}_prob_cnn.tsv", labels,
                     matrix)
        compared = MapSet(labels, {"prob_cnn": (matrix + matrix.T) / 2})
        pairs.append(session_pairs(maps, compared).assign(fold=fold, run=run_index))
    table = pd.concat(pairs, ignore_index=True)
    write_tsv(out / MASK / "session_pairs_prob_cnn.tsv", table)
    return [row for diagnosis, rows in table.groupby("diagnosis", sort=True)
            for row in intra_inter_rows(rows, MASK, "prob_cnn",
                                        int((sessions.diagnosis == diagnosis).sum()),
                                        "session_pairs_prob_cnn.tsv")]


def write_matrix(path: Path, labels: Sequence[str], matrix: np.ndarray) -> None:
    """A square similarity matrix as TSV, first column ``map`` naming the rows."""
    table = pd.DataFrame(matrix, columns=list(labels))
    table.insert(0, "map", list(labels))
    write_tsv(path, table)


def natural_key(text: str) -> tuple:
    """Sort key that orders ``ses-M6`` before ``ses-M12``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _baselines(maps: pd.DataFrame) -> list[int]:
    """Row of each subject's first session (natural order of session ids)."""
    return [min(rows.index, key=lambda i: natural_key(maps.session_id[i]))
            for _, rows in maps.groupby("participant_id")]


def _upper(matrix: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Values of the selected pairs above the diagonal (each pair once), NaN left out."""
    upper = np.triu(selected, k=1)
    values = matrix[upper]
    return values[np.isfinite(values)]


def _row(method: str, experiment: str, metric: str, values: np.ndarray, n_maps: int,
         table: str, n_pairs: int | None = None, n_subjects: int | None = None,
         diagnosis: str = "") -> dict:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return {"method": method, "experiment": experiment, "diagnosis": diagnosis, "metric": metric,
            "mean": float(values.mean()) if len(values) else float("nan"),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "median": float(np.median(values)) if len(values) else float("nan"),
            "n_pairs": len(values) if n_pairs is None else n_pairs,
            "n_subjects": n_subjects, "n_maps": n_maps, "table": table}


def _model_digest(run: RunFolder, fold: int, run_index: int) -> str | None:
    weights = run.model_dir(fold, run_index) / "model.safetensors"
    return hashlib.sha1(weights.read_bytes()).hexdigest() if weights.is_file() else None

