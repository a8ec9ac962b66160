"""``voxplain evaluate localisation``: explanations of a run folder scored against a known
truth (synthetic cohorts, lesion masks); the scores are :mod:`voxplain.evaluate.localisation`.

- ``against``: the patient-class group map of every explanation and fold/run against one
  ground-truth map (e.g. ``ground_truth.nii.gz``) -> ``evaluation/localisation.tsv``;
- ``session_truth``: every session map against that session's own truth, named by a column of
  the explained cohort (e.g. ``mask_path``) -> ``evaluation/localisation_sessions.tsv``.

Both tables hold, beside the methods, the baselines of :mod:`voxplain.evaluate.baselines` (method
and key ``baseline:NAME``; ``baselines = false`` leaves them out), scored by the same function
on the same sessions, so that a score can be read against what no explanation method achieves:

- group level (one row per baseline and fold/run): the random map (seeded by ``seed``, the fold
  and the run); the input and the edge map averaged over the sessions of the scored group maps
  of the run's own cohort in that fold/run (their union, should the methods' groups differ;
  the fold's validation patients when no explanation of the run's cohort is scored), as a
  method's group map averages its session maps; the t-map and the linear weights and pattern
  of the fold's training sessions (patient class vs the others). ``n_sessions`` counts the
  sessions a map was computed from;
- session level (one row per baseline and session map scored, fold/run and session): the
  random map (seeded by ``seed``, fold, run and the session's place in its cohort), the
  session's image and its edge map; the fold's training-set maps, the same for every session
  of the fold (a classical analysis of the training set has no per-session map).

Records its settings as ``[evaluate_localisation]`` (replaced at each run: the tables are
rewritten whole), apart from the explanations' own settings (``[explain_KEY]``), so scoring
never stops an explanation from being resumed or extended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import LocalisationConfig, LocalisationStepConfig
from voxplain.data.atlas import Atlas
from voxplain.data.classes import patient_class
from voxplain.data.grid import Grid
from voxplain.data.template import brain_mask
from voxplain.evaluate.baselines import BASELINE_PREFIX, SIGNED, baseline_method
from voxplain.evaluate.localisation import (SESSION_SCORES, atrophied_regions, scored_voxels,
                                            localisation_scores, resolution_ceiling, true_region,
                                            truth_on_grid)
from voxplain.io import read_tsv, write_tsv
from voxplain.models.serialization import read_model_json
from voxplain.run import RunFolder, RunFolderError
from voxplain.run.maps import read_map_on_grid
from voxplain.steps.baselines import BaselineMaps, baseline_names, explanations
from voxplain.steps.context import IDS

log = logging.getLogger("voxplain")

__all__ = ["run_localisation", "evaluate_localisation", "evaluate_session_localisation"]


def run_localisation(config: LocalisationStepConfig,
                     progress: Progress | None = None) -> dict[str, pd.DataFrame]:
    """Score the run's explanations against ``config.against`` (group maps) and/or
    ``config.session_truth`` (session maps); returns the tables by name (``group``,
    ``sessions``).

    Raises:
        RunFolderError: neither truth is given.
    """
    if config.against is None and config.session_truth is None:
        raise RunFolderError("evaluate localisation: give --against FILE (a ground-truth map) "
                             "and/or --session-truth COLUMN (a cohort column naming each "
                             "session's truth)")
    run = RunFolder(config.run)
    run.train_config()
    run.record_config("evaluate_localisation", config, replace=True)
    scores = LocalisationConfig.model_validate(
        {name: getattr(config, name) for name in LocalisationConfig.model_fields})
    tables = {}
    if config.against is not None:
        tables["group"] = evaluate_localisation(config.run, config.against, config.methods,
                                                config.diagnosis, scores, config.baselines,
                                                config.seed)
    if config.session_truth is not None:
        tables["sessions"] = evaluate_session_localisation(config.run, config.session_truth,
                                                           config.methods, scores,
                                                           config.baselines, config.seed)
    return tables


def evaluate_localisation(run: Path, truth_path: Path, methods: Sequence[str] | None = None,
                          diagnosis: str | None = None,
                          config: LocalisationConfig | None = None, baselines: bool = True,
                          seed: int = 0) -> pd.DataFrame:
    """Score the patient-class group map of every explanation in ``run`` against ``truth_path``.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        truth_path: ground-truth map of the cohort (e.g. ``ground_truth.nii.gz``).
        methods: only these method names (default: every explanation found, and every
            baseline); a ``baseline:NAME`` among them selects that baseline.
        diagnosis: the class whose group map is scored (default: the non-control class).
        config: truth fraction, pointing-game tolerance, k of the region hit rate.
        baselines: score the baselines too (module docstring), seeded by ``seed``.

    Returns:
        One row per explanation (then baseline) and fold/run (method, layer, fold, run,
        diagnosis, n_sessions, auc, mass_inside, chance_mass, pointing_game, top{k}_hit,
        auc_at_layer_resolution, key); also written to ``RUN/evaluation/localisation.tsv``.
        ``auc_at_layer_resolution``: for a method that reads a layer (the CAM family), the AUC
        of the truth itself seen at that layer's grid
        (:func:`~voxplain.evaluate.localisation.resolution_ceiling`), what its AUC can
        hardly exceed; NaN for other methods and the baselines.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows, explained = [], {}
    for key, record in explanations(folder, methods):
        for fold, run_index, model_dir in folder.model_dirs():
            patient = patient_class(read_model_json(model_dir)["classes"], diagnosis)
            scored = _score_group_map(folder.explanation_dir(key, fold, run_index), patient,
                                      record, truth_path, train.downsample, config)
            if scored is not None:
                row, sessions = scored
                rows.append({"key": key, "fold": fold, "run": run_index, **row})
                if not record.get("cohort"):  # the baselines read the run's own cohort
                    explained.setdefault((fold, run_index), []).append(sessions)
    if not rows and not _only_baselines(methods):
        raise ValueError(f"{folder.root}: no group map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    names = baseline_names(methods) if baselines else []
    if names:
        rows += _group_baseline_rows(BaselineMaps(folder, names, seed), truth_path, explained,
                                     diagnosis, config)
    columns = ["method", "layer", "fold", "run", "diagnosis", "n_sessions", "auc", "mass_inside",
               "chance_mass", "pointing_game", f"top{config.top_k}_hit",
               "auc_at_layer_resolution", "key"]
    table = pd.DataFrame(rows, columns=columns)
    write_tsv(folder.evaluation_file("localisation.tsv"), table)
    return table


def _only_baselines(methods: Sequence[str] | None) -> bool:
    return bool(methods) and all(method.startswith(BASELINE_PREFIX) for method in methods)


def _score_group_map(folder: Path, patient: str, record: dict, truth_path: Path, factor: int,
                     config: LocalisationConfig) -> tuple[dict, pd.DataFrame] | None:
    """Scores of ``folder``'s ``group_<patient>`` map and the sessions it averages (None when
    the fold/run has none)."""
    found = [path for path in (folder / f"group_{patient}.nii.gz", folder / f"group_{patient}.npy")
             if path.is_file()]
    if not found or not (folder / "index.tsv").is_file():
        return None
    values, grid = read_map_on_grid(found[0])
    truth = truth_on_grid(truth_path, grid, factor)
    three_d = values.ndim == 3
    atlas = Atlas.aal2(grid) if three_d else None
    regions = atrophied_regions(truth_path, truth, atlas) if three_d else None
    index = read_tsv(folder / "index.tsv")
    kept = index[index.diagnosis == patient]
    if record.get("group", "correct") == "correct":
        kept = kept[kept.correct.astype(bool)]
    scores = localisation_scores(
        values, truth, signed=record["signed"], brain=brain_mask(grid) if three_d else None,
        fraction=config.truth_fraction, tolerance=config.tolerance, atlas=atlas,
        regions=regions, k=config.top_k)
    layer = str(index.layer.iloc[0]) if "layer" in index and index.layer.notna().any() else ""
    ceiling = float("nan")
    if layer and "layer_shape" in index and isinstance(index.layer_shape.iloc[0], str):
        ceiling = resolution_ceiling(truth, [int(n) for n in index.layer_shape.iloc[0].split("x")],
                                     brain_mask(grid) if three_d else None,
                                     config.truth_fraction)
    return ({"method": record["method"], "layer": layer, "diagnosis": patient,
             "n_sessions": len(kept), **scores, "auc_at_layer_resolution": ceiling},
            kept[IDS[:2]])


def _group_baseline_rows(maps: BaselineMaps, truth_path: Path,
                         explained: dict[tuple[int, int], list[pd.DataFrame]],
                         diagnosis: str | None, config: LocalisationConfig) -> list[dict]:
    """Rows of the baselines' "group maps" of every fold/run (module docstring)."""
    context = maps.context(None)
    grid = context.grid
    truth = truth_on_grid(truth_path, grid, context.train.downsample)
    three_d = len(grid.shape) == 3
    atlas = Atlas.aal2(grid) if three_d else None
    regions = atrophied_regions(truth_path, truth, atlas) if three_d else None
    brain = brain_mask(grid) if three_d else None
    rows = []
    for fold, run_index, model_dir in maps.folder.model_dirs():
        patient = patient_class(read_model_json(model_dir)["classes"], diagnosis)
        sessions = explained.get((fold, run_index))
        if sessions:
            rows_of = context.rows(pd.concat(sessions).drop_duplicates())
        else:
            rows_of = context.split_rows(fold, "validation")
            rows_of = rows_of[rows_of.diagnosis == patient]
        for name, (values, n_sessions) in maps.group(fold, run_index, patient, rows_of).items():
            scores = localisation_scores(
                values, truth, signed=SIGNED[name], brain=brain, fraction=config.truth_fraction,
                tolerance=config.tolerance, atlas=atlas, regions=regions, k=config.top_k)
            method = baseline_method(name)
            rows.append({"key": method, "method": method, "layer": "", "fold": fold,
                         "run": run_index, "diagnosis": patient, "n_sessions": n_sessions,
                         **scores})
    return rows


def evaluate_session_localisation(run: Path, column: str, methods: Sequence[str] | None = None,
                                  config: LocalisationConfig | None = None,
                                  baselines: bool = True, seed: int = 0) -> pd.DataFrame:
    """Score every session map in ``run`` against that session's own ground truth.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        column: the column of the explained cohort's TSV that names each session's truth file
            (NPY or NIfTI on the image grid, e.g. ``mask_path`` of a lesion cohort); a relative
            path is relative to the folder of the cohort TSV given to ``voxplain train`` (or to
            ``voxplain explain --cohort``).
        methods: only these method names (default: every explanation found, and every
            baseline); a ``baseline:NAME`` among them selects that baseline.
        config: truth fraction and pointing-game tolerance.
        baselines: score the baselines too on every session scored (module docstring), seeded
            by ``seed``.

    Returns:
        One row per map (key, method, layer, fold, run, participant_id, session_id, diagnosis,
        target, correct, truth_voxels, auc, mass_inside, chance_mass, pointing_game; the scores
        are NaN where the truth is empty, e.g. a control's zero atrophy), the baselines' after
        the explanations'; also written to ``RUN/evaluation/localisation_sessions.tsv``.

    Raises:
        ValueError: no explained cohort has the column (explanations of a cohort without it
            are skipped, with a log message), a session has no truth file named, or no session
            map was found.
        FileNotFoundError: a named truth file is missing.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows, without, explained = [], {}, {}
    for key, record in explanations(folder, methods):
        source = Path(record["cohort"]) if record.get("cohort") else folder.cohort_file
        table = read_tsv(source)
        if column not in table.columns:
            without[source] = list(table.columns)
            log.info("%s: not scored, its cohort %s has no column %r", key, source, column)
            continue
        base = Path(record.get("cohort") or train.cohort).parent
        truths = _session_truths(source, table, column, base)
        for fold, run_index, _ in folder.model_dirs():
            maps = folder.explanation_dir(key, fold, run_index)
            if not (maps / "index.tsv").is_file():
                continue
            index = read_tsv(maps / "index.tsv")
            layer = (str(index.layer.iloc[0]) if "layer" in index and index.layer.notna().any()
                     else "")
            for session in index.itertuples():
                values, grid = read_map_on_grid(maps / session.path)
                truth = truth_on_grid(truths[(session.participant_id, session.session_id)], grid,
                                      train.downsample)
                scores, voxels = _session_scores(values, truth, grid, record["signed"], config)
                rows.append({"key": key, "method": record["method"], "layer": layer,
                             "fold": fold, "run": run_index,
                             "participant_id": session.participant_id,
                             "session_id": session.session_id, "diagnosis": session.diagnosis,
                             "target": session.target, "correct": bool(session.correct),
                             "truth_voxels": voxels, **scores})
            explained.setdefault((record.get("cohort") or None, fold, run_index), {
                "truths": truths, "sessions": []})["sessions"].append(index)
    if not rows and without:
        raise ValueError("; ".join(f"{source}: no column {column!r} naming each session's ground "
                                   f"truth; columns are {columns}"
                                   for source, columns in without.items()))
    if not rows:
        raise ValueError(f"{folder.root}: no session map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    names = baseline_names(methods) if baselines else []
    if names:
        rows += _session_baseline_rows(BaselineMaps(folder, names, seed), explained, config)
    scored = pd.DataFrame(rows)
    write_tsv(folder.evaluation_file("localisation_sessions.tsv"), scored)
    return scored


def _session_scores(values: np.ndarray, truth: np.ndarray, grid: Grid, signed: bool,
                    config: LocalisationConfig) -> tuple[dict[str, float], int]:
    """The :data:`SESSION_SCORES` of a session map against its truth (on the map's grid) and
    the number of true voxels scored; NaN scores where the truth is empty (a control's zero
    atrophy has nothing to point at)."""
    brain = brain_mask(grid) if values.ndim == 3 else None
    voxels = int(true_region(truth, config.truth_fraction)[scored_voxels(truth, brain)].sum())
    if not voxels:
        return dict.fromkeys(SESSION_SCORES, float("nan")), 0
    scores = localisation_scores(values, truth, signed=signed, brain=brain,
                                 fraction=config.truth_fraction, tolerance=config.tolerance)
    return {name: scores[name] for name in SESSION_SCORES}, voxels


def _session_baseline_rows(maps: BaselineMaps, explained: dict, config: LocalisationConfig
                           ) -> list[dict]:
    """Rows of the baselines of every session scored, fold/run by fold/run (module
    docstring): the explained cohort's images, the fold's training-set maps."""
    rows = []
    models = {(fold, run_index): model_dir for fold, run_index, model_dir
              in maps.folder.model_dirs()}
    for (cohort, fold, run_index), found in explained.items():
        context = maps.context(None if cohort is None else Path(cohort))
        sessions = pd.concat(found["sessions"]).drop_duplicates(IDS[:2])
        cohort_rows = context.rows(sessions).merge(
            sessions[[*IDS[:2], "target", "correct"]], on=IDS[:2])
        patient = patient_class(read_model_json(models[(fold, run_index)])["classes"], None)
        training, _ = maps.training(fold, run_index, patient)
        for row in cohort_rows.itertuples():
            truth = truth_on_grid(found["truths"][(row.participant_id, row.session_id)],
                                  context.grid, context.train.downsample)
            for name, values in {**maps.session(context, row.image_index, fold, run_index),
                                 **training}.items():
                scores, voxels = _session_scores(values, truth, context.grid, SIGNED[name],
                                                 config)
                method = baseline_method(name)
                rows.append({"key": method, "method": method, "layer": "", "fold": fold,
                             "run": run_index, "participant_id": row.participant_id,
                             "session_id": row.session_id, "diagnosis": row.diagnosis,
                             "target": row.target, "correct": bool(row.correct),
                             "truth_voxels": voxels, **scores})
    return rows


def _session_truths(source: Path, table: pd.DataFrame, column: str,
                    base: Path) -> dict[tuple[str, str], Path]:
    """``(participant, session) -> truth file`` from ``column`` of the cohort ``table`` read from
    ``source``; relative paths are relative to ``base``."""
    truths = {}
    for participant, session, value in zip(table.participant_id, table.session_id, table[column]):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: {participant} {session}: no ground truth in {column!r}")
        path = Path(value)
        truths[(participant, session)] = path if path.is_absolute() else base / path
    return truths


