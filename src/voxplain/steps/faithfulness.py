"""``voxplain evaluate faithfulness``: deletion and insertion curves (Petsiuk et al. 2018,
:mod:`voxplain.evaluate.faithfulness`) of a run's explanations, masks and baselines, on the
same sessions, fold by fold.

A localisation score needs a ground truth; faithfulness asks the model itself: delete the
voxels a map ranks highest and the explained class's probability should fall fast (low
deletion area), insert them into an image where everything is deleted and it should rise fast
(high insertion area). A map that does no better than a random ranking (``baseline:random``)
tells nothing about the model.

Sessions: each fold/run's first ``sessions`` validation sessions of ``diagnosis`` (default: the
patient class, the class the masks explain), in cohort order, each explained for that class
(its true class). Rankings of the voxels, each scored on those sessions where it exists:

- every explanation of the run's own cohort (``explanations/KEY``; the maps of another cohort
  are left out), its session map ranked by the relevance convention of the localisation scores
  (:func:`voxplain.evaluate.localisation.relevance`: ``|map|`` for a signed method, the map
  for an unsigned one);
- ``group_mask``: the fold/run's group mask (``masks/group``), the same ranking ``1 - mask`` for
  every session (what the mask hides first); ``session_mask``: the session's own mask
  (``masks/session``), where one was made;
- the baselines (:mod:`voxplain.evaluate.baselines`): ``baseline:random``, ``input`` and
  ``edge`` of each session, the fold's training-set ``t_map``, ``linear_weights`` and
  ``linear_pattern`` (on their magnitude).

Deletion replaces the ranked voxels (inside the brain, for 3D images on the MNI grid) by the
perturbation of the masks (``perturbation``: a constant, 1 by default, i.e. restored grey
matter, or the blurred image), ``step`` of the voxels per point; insertion restores them into
the perturbed image.

Writes ``RUN/evaluation/faithfulness/``: ``fold-K/run-R.tsv`` (one row per ranking and session:
key, method, fold, run, participant_id, session_id, diagnosis, target, deletion_auc,
insertion_auc), ``sessions.tsv`` (all of them), ``summary.tsv`` (one row per ranking: mean areas,
number of sessions, and whether it beats the random ranking on the same sessions in deletion,
in insertion, and in both) and
``curves.tsv`` (the mean curves: key, mode, fraction, probability). A fold/run whose file holds
every ranking asked, computed with the same settings (``settings.json``), is not computed
again. Records its settings as ``[evaluate_faithfulness]``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from voxplain.config import FaithfulnessStepConfig, MaskConfig
from voxplain.data.classes import patient_class
from voxplain.data.template import brain_mask
from voxplain.evaluate.baselines import SIGNED, baseline_method, compare_with_baseline
from voxplain.evaluate.faithfulness import faithfulness_curves
from voxplain.explain.masks import make_reference
from voxplain.io import read_tsv, write_json, write_tsv
from voxplain.run import RunFolder
from voxplain.run.maps import read_map_on_grid
from voxplain.steps.baselines import BaselineMaps, baseline_names, explanations
from voxplain.steps.context import IDS, FoldModel, RunContext, load_context

log = logging.getLogger("voxplain")

__all__ = ["run_faithfulness", "GROUP_MASK", "SESSION_MASK"]

#: Method names of the masks' rows.
GROUP_MASK, SESSION_MASK = "group_mask", "session_mask"
#: Settings that do not change the scores (a fold/run file computed with others is reused).
_NOT_SCORES = {"run", "folds", "device", "methods", "baselines", "masks", "batch_size"}
SCORES = ("deletion_auc", "insertion_auc")
#: Columns of a fold/run's file: a row per ranking and session, with both curves (JSON lists).
_COLUMNS = ["key", "method", "fold", "run", *IDS[:2], "diagnosis", "target", *SCORES,
            "curve_deletion", "curve_insertion"]


@dataclass(frozen=True)
class Ranking:
    """One ranking of the voxels of some of the scored sessions.

    Attributes:
        key: its row name (the explanation key, ``group_mask``, ``baseline:edge``).
        method: the method name (the key without settings).
        values: ``(n, *spatial)`` the scores of the voxels (higher: deleted first).
        rows: positions, among the scored sessions, of the ``n`` sessions it ranks.
    """

    key: str
    method: str
    values: np.ndarray
    rows: np.ndarray


def run_faithfulness(config: FaithfulnessStepConfig,
                     progress: Progress | None = None) -> pd.DataFrame:
    """Deletion and insertion areas of every ranking (module docstring); returns the summary.

    Raises:
        RunFolderError: the run has no trained model, or slice models (maps per slice).
        ValueError: nothing to score (no explanation, mask or baseline selected).
    """
    run = RunFolder(config.run)
    run.train_config()
    run.refuse_slice_models("[evaluate_faithfulness]")
    run.record_config("evaluate_faithfulness", config, replace=True)
    out = run.evaluation_file("faithfulness")
    _forget_other_settings(out, config)
    context = load_context(run, config.device, progress)
    keys = [(key, record) for key, record in explanations(run, config.methods)
            if not record.get("cohort")]
    names = baseline_names(config.methods) if config.baselines else []
    baselines = BaselineMaps(run, names, config.seed, context)
    selected = list(context.run.selected_models(config.folds))
    task = (progress.add_task("faithfulness", total=len(selected)) if progress else None)
    tables = []
    for fold, run_index, _ in selected:
        path = out / f"fold-{fold}" / f"run-{run_index}.tsv"
        candidates = _candidates(run, keys, names, config, fold, run_index)
        considered = path.with_suffix(".json")
        if path.is_file() and considered.is_file() and set(candidates) <= set(
                json.loads(considered.read_text())):
            log.info("faithfulness fold %d run %d already computed: skipped", fold, run_index)
            done = read_tsv(path)
            tables.append(done[done.key.isin(candidates)])
        else:
            table = _fold_scores(context, context.model(fold, run_index), fold, run_index, keys,
                                 baselines, config)
            write_tsv(path, table)
            write_json(considered, candidates)
            tables.append(table)
        if task is not None:
            progress.update(task, advance=1)
    sessions = pd.concat(tables, ignore_index=True)
    if sessions.empty:
        raise ValueError(f"{run.root}: nothing to score for faithfulness"
                         f"{' among ' + ', '.join(config.methods) if config.methods else ''}; "
                         "run `voxplain explain` or `voxplain mask` first")
    write_tsv(out / "sessions.tsv", sessions.drop(columns=["curve_deletion", "curve_insertion"]))
    write_tsv(out / "curves.tsv", mean_curves(sessions, config.step))
    summary = faithfulness_summary(sessions)
    write_tsv(out / "summary.tsv", summary)
    return summary


def _forget_other_settings(out: Path, config: FaithfulnessStepConfig) -> None:
    """Remove the fold/run files computed with other scoring settings."""
    settings = config.model_dump(mode="json", exclude=_NOT_SCORES)
    record = out / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        for old in [*out.glob("fold-*/run-*.tsv"), *out.glob("fold-*/run-*.json")]:
            old.unlink()
    write_json(record, settings)


def _candidates(run: RunFolder, keys: list[tuple[str, dict]], names: list[str],
                config: FaithfulnessStepConfig, fold: int, run_index: int) -> list[str]:
    """The rankings a fold/run may have (those on disk and selected): its file is reused when
    it considered all of them (a map added since, e.g. a new explanation, makes it stale)."""
    found = [key for key, _ in keys
             if (run.explanation_dir(key, fold, run_index) / "index.tsv").is_file()]
    for name, path in ((GROUP_MASK, run.mask_dir("group", fold, run_index) / "mask.nii.gz"),
                       (SESSION_MASK, run.mask_dir("session", fold, run_index) / "index.tsv")):
        if _masks_wanted(config, name) and path.is_file():
            found.append(name)
    return found + [baseline_method(name) for name in names]


def _masks_wanted(config: FaithfulnessStepConfig, name: str) -> bool:
    return config.masks and (config.methods is None or name in config.methods)


def _fold_scores(context: RunContext, fitted: FoldModel, fold: int, run_index: int,
                 keys: list[tuple[str, dict]], baselines: BaselineMaps,
                 config: FaithfulnessStepConfig) -> pd.DataFrame:
    """One row per ranking and scored session of a fold/run, with both curves."""
    diagnosis = patient_class(fitted.classes, config.diagnosis)
    rows = context.split_rows(fold, "validation")
    rows = rows[rows.diagnosis == diagnosis].iloc[:config.sessions].reset_index(drop=True)
    if rows.empty:
        log.warning("faithfulness fold %d run %d: no %s validation session; skipped", fold,
                    run_index, diagnosis)
        return pd.DataFrame(columns=_COLUMNS)
    images = torch.from_numpy(context.images_of(rows))
    target = fitted.classes.index(diagnosis)
    three_d = context.spatial_dims == 3
    brain = brain_mask(context.grid) if three_d else None
    reference = make_reference(MaskConfig(perturbation=config.perturbation,
                                          constant=config.constant, blur_mm=config.blur_mm),
                               context.grid.voxel_size)
    records = []
    for ranking in _rankings(context, rows, keys, baselines, config, fold, run_index, diagnosis):
        curves = {mode: faithfulness_curves(
            fitted.model, images[torch.as_tensor(ranking.rows)], ranking.values, target, mode, step=config.step,
            baseline=reference, brain=brain, max_batch=config.batch_size, device=context.device)
            for mode in ("deletion", "insertion")}
        for place, row in enumerate(rows.iloc[ranking.rows].itertuples()):
            records.append({"key": ranking.key, "method": ranking.method, "fold": fold,
                            "run": run_index, "participant_id": row.participant_id,
                            "session_id": row.session_id, "diagnosis": row.diagnosis,
                            "target": diagnosis,
                            "deletion_auc": float(curves["deletion"].auc[place]),
                            "insertion_auc": float(curves["insertion"].auc[place]),
                            **{f"curve_{mode}": json.dumps(
                                [round(float(v), 6) for v in curve.probabilities[place]])
                               for mode, curve in curves.items()}})
        log.info("faithfulness fold %d run %d %s: deletion %.3f, insertion %.3f", fold,
                 run_index, ranking.key, float(curves["deletion"].auc.mean()),
                 float(curves["insertion"].auc.mean()))
    return pd.DataFrame(records, columns=_COLUMNS)


def _rankings(context: RunContext, rows: pd.DataFrame, keys: list[tuple[str, dict]],
              baselines: BaselineMaps, config: FaithfulnessStepConfig, fold: int,
              run_index: int, diagnosis: str):
    """Every :class:`Ranking` of the scored sessions ``rows`` of a fold/run (module
    docstring), explanations first, then masks and baselines."""
    run = context.run
    for key, record in keys:
        folder = run.explanation_dir(key, fold, run_index)
        if not (folder / "index.tsv").is_file():
            continue
        index = read_tsv(folder / "index.tsv")
        index = index[index.target == diagnosis] if "target" in index else index
        found = _session_files(rows, index, folder)
        if found:
            yield _ranking(key, record["method"], found, signed=bool(record["signed"]))
    if _masks_wanted(config, GROUP_MASK):
        path = run.mask_dir("group", fold, run_index) / "mask.nii.gz"
        if path.is_file():
            mask, _ = read_map_on_grid(path)
            yield Ranking(GROUP_MASK, GROUP_MASK, np.repeat((1 - mask)[None], len(rows), 0),
                          np.arange(len(rows)))
    if _masks_wanted(config, SESSION_MASK):
        folder = run.mask_dir("session", fold, run_index)
        if (folder / "index.tsv").is_file():
            found = _session_files(rows, read_tsv(folder / "index.tsv"), folder)
            if found:
                masks = _ranking(SESSION_MASK, SESSION_MASK, found, signed=False)
                yield Ranking(SESSION_MASK, SESSION_MASK, 1 - masks.values, masks.rows)
    if baselines.names:
        yield from _baseline_rankings(context, rows, baselines, fold, run_index, diagnosis)


def _session_files(rows: pd.DataFrame, index: pd.DataFrame, folder: Path) -> dict[int, Path]:
    """``position in rows -> map file`` of the scored sessions that ``index`` lists."""
    files = {(p, s): folder / name for p, s, name
             in zip(index.participant_id, index.session_id, index.path)}
    return {place: files[(p, s)] for place, (p, s)
            in enumerate(zip(rows.participant_id, rows.session_id)) if (p, s) in files}


def _ranking(key: str, method: str, found: dict[int, Path], signed: bool) -> Ranking:
    """The maps of ``found`` as a ranking: ``|map|`` when ``signed`` (the localisation's
    relevance convention; an unsigned map ranks as it is)."""
    values = np.stack([read_map_on_grid(path)[0] for path in found.values()])
    values = np.nan_to_num(values, nan=0.0)  # a voxel without a value ranks as no relevance
    return Ranking(key, method, np.abs(values) if signed else values,
                   np.fromiter(found, dtype=np.int64))


def _baseline_rankings(context: RunContext, rows: pd.DataFrame, baselines: BaselineMaps,
                       fold: int, run_index: int, diagnosis: str):
    """The baselines as rankings of every scored session (on their magnitude when signed)."""
    per_session = [baselines.session(context, int(index), fold, run_index)
                   for index in rows.image_index]
    training, _ = baselines.training(fold, run_index, diagnosis)
    everywhere = np.arange(len(rows))
    for name in per_session[0]:
        yield Ranking(baseline_method(name), baseline_method(name),
                      np.stack([maps[name] for maps in per_session]), everywhere)
    for name, values in training.items():
        values = np.abs(values) if SIGNED[name] else values
        yield Ranking(baseline_method(name), baseline_method(name),
                      np.repeat(np.nan_to_num(values)[None], len(rows), 0), everywhere)


def mean_curves(sessions: pd.DataFrame, step: float) -> pd.DataFrame:
    """The mean deletion and insertion curve of every ranking: key, method, mode, fraction
    (of the voxels changed, ``step`` apart), probability (mean over its sessions),
    n_sessions."""
    frames = []
    for (key, method), rows in sessions.groupby(["key", "method"], sort=False):
        for mode in ("deletion", "insertion"):
            curves = np.array([json.loads(curve) for curve in rows[f"curve_{mode}"]])
            fractions = np.minimum(np.arange(curves.shape[1]) * step, 1.0)
            frames.append(pd.DataFrame({"key": key, "method": method, "mode": mode,
                                        "fraction": fractions,
                                        "probability": curves.mean(axis=0),
                                        "n_sessions": len(rows)}))
    return pd.concat(frames, ignore_index=True)


def faithfulness_summary(sessions: pd.DataFrame) -> pd.DataFrame:
    """One row per ranking: mean deletion and insertion areas, n_sessions, and against the
    random ranking on the same sessions (NaN without a random baseline, and for the baselines):
    ``deletion_beats_random`` (a lower deletion area), ``insertion_beats_random`` (a higher
    insertion area) and ``beats_random`` (both)."""
    grouped = sessions.groupby(["key", "method"], sort=False)
    summary = grouped[list(SCORES)].mean().assign(n_sessions=grouped.size()).reset_index()
    deletion = compare_with_baseline(sessions, "random", "deletion_auc")
    insertion = compare_with_baseline(sessions, "random", "insertion_auc")
    if deletion is None or insertion is None:
        return summary.assign(deletion_beats_random=np.nan, insertion_beats_random=np.nan,
                              beats_random=np.nan)
    verdicts = {"deletion_beats_random": deletion["deletion_auc"] < deletion["baseline"],
                "insertion_beats_random": insertion["beats"]}
    verdicts["beats_random"] = verdicts["deletion_beats_random"] & verdicts[
        "insertion_beats_random"]
    return summary.assign(**{name: summary.key.map(verdict).astype(object)
                             for name, verdict in verdicts.items()})
