"""``voxplain evaluate localisation``: explanations of a run folder scored against a known
truth (synthetic cohorts, lesion masks); the scores are :mod:`voxplain.evaluate.localisation`.

- ``against``: the patient-class group map of every explanation and fold/run against one
  ground-truth map (e.g. ``ground_truth.nii.gz``) -> ``evaluation/localisation.tsv``;
- ``session_truth``: every session map against that session's own truth, named by a column of
  the explained cohort (e.g. ``mask_path``) -> ``evaluation/localisation_sessions.tsv``.

Records its settings as ``[evaluate_localisation]`` (replaced at each run: the tables are
rewritten whole), apart from the explanations' own settings (``[explain_KEY]``), so scoring
never stops an explanation from being resumed or extended.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from rich.progress import Progress

from voxplain.config import LocalisationConfig, LocalisationStepConfig
from voxplain.data.atlas import Atlas
from voxplain.data.classes import patient_class
from voxplain.data.template import brain_mask
from voxplain.evaluate.localisation import (SESSION_SCORES, atrophied_regions, scored_voxels,
                                            localisation_scores, true_region, truth_on_grid)
from voxplain.io import read_tsv, write_tsv
from voxplain.models.serialization import read_model_json
from voxplain.run import RunFolder, RunFolderError
from voxplain.run.maps import read_map_on_grid

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
                                                config.diagnosis, scores)
    if config.session_truth is not None:
        tables["sessions"] = evaluate_session_localisation(config.run, config.session_truth,
                                                           config.methods, scores)
    return tables


def evaluate_localisation(run: Path, truth_path: Path, methods: Sequence[str] | None = None,
                          diagnosis: str | None = None,
                          config: LocalisationConfig | None = None) -> pd.DataFrame:
    """Score the patient-class group map of every explanation in ``run`` against ``truth_path``.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        truth_path: ground-truth map of the cohort (e.g. ``ground_truth.nii.gz``).
        methods: only these method names (default: every explanation found).
        diagnosis: the class whose group map is scored (default: the non-control class).
        config: truth fraction, pointing-game tolerance, k of the region hit rate.

    Returns:
        One row per explanation and fold/run (method, layer, fold, run, diagnosis, n_sessions,
        auc, mass_inside, chance_mass, pointing_game, top{k}_hit, key); also written to
        ``RUN/evaluation/localisation.tsv``.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows = []
    for key, record in _explanations(folder, methods):
        for fold, run_index, model_dir in folder.model_dirs():
            patient = patient_class(read_model_json(model_dir)["classes"], diagnosis)
            row = _score_group_map(folder.explanation_dir(key, fold, run_index), patient,
                                   record, truth_path, train.downsample, config)
            if row is not None:
                rows.append({"key": key, "fold": fold, "run": run_index, **row})
    if not rows:
        raise ValueError(f"{folder.root}: no group map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    columns = ["method", "layer", "fold", "run", "diagnosis", "n_sessions", "auc", "mass_inside",
               "chance_mass", "pointing_game", f"top{config.top_k}_hit", "key"]
    table = pd.DataFrame(rows)[columns]
    write_tsv(folder.evaluation_file("localisation.tsv"), table)
    return table


def _explanations(folder: RunFolder, methods: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    """``(key, explanation.json)`` of every explanation in the run (of ``methods`` only)."""
    for record_file in sorted(folder.explanations_dir.glob("*/explanation.json")):
        record = json.loads(record_file.read_text())
        if methods is None or record["method"] in methods:
            yield record_file.parent.name, record


def _score_group_map(folder: Path, patient: str, record: dict, truth_path: Path, factor: int,
                     config: LocalisationConfig) -> dict | None:
    """Scores of ``folder``'s ``group_<patient>`` map (None when the fold/run has none)."""
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
    return {"method": record["method"], "layer": layer, "diagnosis": patient,
            "n_sessions": len(kept), **scores}


def evaluate_session_localisation(run: Path, column: str, methods: Sequence[str] | None = None,
                                  config: LocalisationConfig | None = None) -> pd.DataFrame:
    """Score every session map in ``run`` against that session's own ground truth.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        column: the column of the explained cohort's TSV that names each session's truth file
            (NPY or NIfTI on the image grid, e.g. ``mask_path`` of a lesion cohort); a relative
            path is relative to the folder of the cohort TSV given to ``voxplain train`` (or to
            ``voxplain explain --cohort``).
        methods: only these method names (default: every explanation found).
        config: truth fraction and pointing-game tolerance.

    Returns:
        One row per map (key, method, layer, fold, run, participant_id, session_id, diagnosis,
        target, correct, truth_voxels, auc, mass_inside, chance_mass, pointing_game; the scores
        are NaN where the truth is empty, e.g. a control's zero atrophy); also written to
        ``RUN/evaluation/localisation_sessions.tsv``.

    Raises:
        ValueError: no explained cohort has the column (explanations of a cohort without it
            are skipped, with a log message), a session has no truth file named, or no session
            map was found.
        FileNotFoundError: a named truth file is missing.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows, without = [], {}
    for key, record in _explanations(folder, methods):
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
                brain = brain_mask(grid) if values.ndim == 3 else None
                voxels = int(true_region(truth, config.truth_fraction)[scored_voxels(truth, brain)]
                             .sum())
                scores = dict.fromkeys(SESSION_SCORES, float("nan"))
                if voxels:  # a session without truth (a control's zero atrophy) has no score
                    scores = localisation_scores(
                        values, truth, signed=record["signed"], brain=brain,
                        fraction=config.truth_fraction, tolerance=config.tolerance)
                    scores.pop(f"top{config.top_k}_hit")
                rows.append({"key": key, "method": record["method"], "layer": layer,
                             "fold": fold, "run": run_index,
                             "participant_id": session.participant_id,
                             "session_id": session.session_id, "diagnosis": session.diagnosis,
                             "target": session.target, "correct": bool(session.correct),
                             "truth_voxels": voxels, **scores})
    if not rows and without:
        raise ValueError("; ".join(f"{source}: no column {column!r} naming each session's ground "
                                   f"truth; columns are {columns}"
                                   for source, columns in without.items()))
    if not rows:
        raise ValueError(f"{folder.root}: no session map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    scored = pd.DataFrame(rows)
    write_tsv(folder.evaluation_file("localisation_sessions.tsv"), scored)
    return scored


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


