"""``voxplain stats``: paper 2's heatmap statistics (2.4) of one method's session maps in a
run folder; the tests themselves are :mod:`voxplain.evaluate.stats`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import StatsConfig
from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid
from voxplain.data.template import brain_mask
from voxplain.evaluate.permutation import covariate_design, permutation_test
from voxplain.evaluate.stats import (CORRECTIONS, TTest, VoxelMoments, brain_percentile,
                                     cluster_table, normalise_map, one_sample_ttest,
                                     percentile_test, threshold_at, two_sample_ttest)
from voxplain.io import read_tsv, write_tsv
from voxplain.run import RunFolder, RunFolderError
from voxplain.run.maps import (available_methods, converged_session_maps, evidence, map_grid,
                               read_map, session_maps, write_map)

log = logging.getLogger("voxplain")


def run_stats(config: StatsConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Paper 2's statistics of one method's session maps in a run folder.

    Each map (``1 - m`` for a mask) is min-max normalised inside the brain (the MNI brain mask
    for volumes, every pixel for 2D images). The unit of observation is the subject by default
    (``config.unit``): sessions of one subject are not independent samples, so a subject's map
    is the normalised mean of its normalised maps (all sessions, all folds/runs that mapped
    them); with ``unit="session"`` a session's maps are averaged. Then, per diagnosis group:
    the 95th percentile of each map, the group comparison of those percentiles, and the
    voxel-wise t-tests on the maps thresholded at their own percentile.

    With ``config.permutations``, the same tests (and, with ``config.paired_sessions``, a paired
    test per group) again by permutation (:mod:`voxplain.evaluate.permutation`), adjusted for
    ``config.covariates``: ``permutation_TEST_T`` and ``permutation_TEST_logp-{maxt,tfce,
    cluster-size,cluster-mass}`` maps (-log10 FWE p) and one summary row per inference. Their
    unit must be the subject: sessions of one subject are not exchangeable between groups, so
    with ``unit="session"`` they are skipped (with a message).

    Writes ``RUN/stats/METHOD/``: ``percentiles.tsv``, ``percentile_test.tsv``, for each test
    ``TEST_T``, ``TEST_p``, ``TEST_p-bonferroni`` and ``TEST_p-fdr`` maps (NIfTI with the maps'
    affine, NPY for 2D), ``clusters.tsv`` (significant voxels after ``config.correction``, or
    after each permutation inference) and ``summary.tsv`` (returned). Records the settings as
    ``[stats_METHOD]`` (replaced at each run).
    """
    permute = _permutation_tests_apply(config)
    run = RunFolder(config.run)
    cohort = _cohort_covariates(run, config.covariates)
    sessions = converged_session_maps(run, config.method, config.include_flagged)
    if config.folds is not None:
        sessions = sessions[sessions.fold.isin(config.folds)]
    if sessions.empty:
        found = [m for m in available_methods(run) if not session_maps(run, m).empty]
        raise RunFolderError(f"{run.root}: no session map of method {config.method!r} "
                             f"(methods with session maps: {', '.join(found) or 'none'})")
    groups = _chosen_groups(config, sessions)
    if run.config_file.is_file():
        run.record_config(f"stats_{config.method}", config, replace=True)
    grid = map_grid(sessions.path.iloc[0])
    brain = _mapped(_brain(grid), sessions.path.iloc[0])
    out = run.stats_dir(config.method)
    moments = {group: VoxelMoments.start(grid.shape, brain) for group in groups}
    records, kept = [], []
    unit = ["participant_id"] if config.unit == "subject" else ["participant_id", "session_id"]
    for key, rows in sessions.groupby(unit):
        diagnosis = rows.diagnosis.iloc[0]
        if diagnosis not in moments:
            continue
        values = session_map(rows.path, config.method, brain)
        percentile = brain_percentile(values, brain, config.percentile)
        records.append({**dict(zip(unit, key)), "diagnosis": diagnosis,
                        "sessions": rows.session_id.nunique(), "n_maps": len(rows),
                        "percentile": percentile})
        thresholded = threshold_at(values, percentile, brain)
        moments[diagnosis].add(thresholded)
        if permute:
            kept.append(thresholded[brain] if brain is not None else thresholded.ravel())
    percentiles = pd.DataFrame(records)
    write_tsv(out / "percentiles.tsv", percentiles)
    tests = {f"one-sample_{g}": (lambda g=g: one_sample_ttest(moments[g])) for g in groups
             if _enough(moments[g], f"one-sample test of {g}")}
    if len(groups) == 2:
        a, b = groups
        values = [percentiles.loc[percentiles.diagnosis == g, "percentile"] for g in groups]
        if all(len(v) >= 2 for v in values):
            write_tsv(out / "percentile_test.tsv", pd.DataFrame(
                [{"group_a": a, "group_b": b, **percentile_test(*values)}]))
        if _enough(moments[a], f"two-sample test ({a})") and \
                _enough(moments[b], f"two-sample test ({b})"):
            tests[f"two-sample_{a}-{b}"] = lambda: two_sample_ttest(
                moments[a], moments[b], equal_var=config.equal_var)
    atlas = Atlas.aal2(grid) if len(grid.shape) == 3 else None
    summaries, clusters = [], []
    for name, compute in tests.items():
        result = compute()
        summary, table = _write_test(out, name, result, grid, atlas, config)
        summaries.append(summary)
        clusters.append(table.assign(test=name, correction=config.correction))
    for stale in out.glob("permutation_*"):  # of an earlier run with other settings
        stale.unlink()
    if permute:
        designs = _permutation_designs(percentiles, np.asarray(kept), groups)
        if config.paired_sessions:
            designs.update(_paired_designs(sessions, groups, brain, config))
        for name, (units, maps, tested) in designs.items():
            covariates = _unit_covariates(cohort, sessions, units, config.covariates)
            for summary, table in _permutation_test(out, f"permutation_{name}", maps, tested,
                                                    covariates, brain, grid, atlas, config):
                summaries.append(summary)
                clusters.append(table.assign(test=summary["test"],
                                             correction=summary["correction"]))
    clusters_table = (pd.concat(clusters, ignore_index=True) if clusters
                      else pd.DataFrame(columns=["test"]))
    write_tsv(out / "clusters.tsv", clusters_table[["test", *[c for c in clusters_table.columns
                                                              if c != "test"]]])
    summary = pd.DataFrame(summaries)
    write_tsv(out / "summary.tsv", summary)
    return summary


def session_map(paths: Iterable[str], method: str, brain: np.ndarray | None) -> np.ndarray:
    """One normalised map from several (a session's folds/runs, a subject's sessions): the mean
    of the normalised maps, normalised again."""
    maps = [normalise_map(evidence(read_map(path), method), brain) for path in paths]
    return maps[0] if len(maps) == 1 else normalise_map(np.mean(maps, axis=0), brain)


def _chosen_groups(config: StatsConfig, sessions: pd.DataFrame) -> list[str]:
    present = sorted(sessions.diagnosis.unique())
    if config.groups is None:
        if len(present) > 2:
            raise ValueError(f"maps of {len(present)} diagnoses {present}: choose two with "
                             "--groups")
        return present
    if len(config.groups) not in (1, 2):
        raise ValueError(f"--groups takes one or two diagnoses, got {config.groups}")
    absent = [g for g in config.groups if g not in present]
    if absent:
        raise ValueError(f"no {config.method} session map of diagnosis {absent} "
                         f"(maps exist for {present})")
    return list(config.groups)


def _brain(grid: Grid) -> np.ndarray | None:
    if len(grid.shape) != 3:
        return None
    brain = brain_mask(grid)
    if not brain.any():
        log.warning("the MNI brain mask is empty on this grid: every voxel is tested")
        return None
    return brain


def _mapped(brain: np.ndarray | None, path: str) -> np.ndarray | None:
    """``brain`` without the voxels the maps leave undefined (NaN): the slices a slice model
    did not read (paper 2 drops the slices without brain), which hold no evidence to test."""
    finite = np.isfinite(read_map(path))
    if finite.all():
        return brain
    log.info("%s: %d voxel(s) without a value (slices the model did not read) are not tested",
             path, int((~finite).sum()))
    return finite if brain is None else brain & finite


def _enough(moments: VoxelMoments, test: str) -> bool:
    if moments.n >= 2:
        return True
    log.warning("%s skipped: %d map(s), a t-test needs at least 2", test, moments.n)
    return False


def _write_test(out: Path, name: str, result: TTest, grid: Grid, atlas: Atlas | None,
                config: StatsConfig) -> tuple[dict, pd.DataFrame]:
    corrected = {key: CORRECTIONS[key](result.p) for key in ("bonferroni", "fdr")}
    write_map(out / f"{name}_T", result.t, grid)
    write_map(out / f"{name}_p", result.p, grid)
    for key, values in corrected.items():
        write_map(out / f"{name}_p-{key}", values, grid)
    p = corrected.get(config.correction, result.p)
    return _significance(name, result.t, p, config.correction, grid, atlas, config)


def _significance(name: str, t: np.ndarray, p: np.ndarray, correction: str, grid: Grid,
                  atlas: Atlas | None, config: StatsConfig) -> tuple[dict, pd.DataFrame]:
    """The summary row and cluster table of the voxels whose ``p`` (a corrected map) is below
    ``config.alpha``."""
    with np.errstate(invalid="ignore"):
        significant = np.nan_to_num(p, nan=1.0) < config.alpha
    table = cluster_table(t, significant, grid.affine, atlas, config.connectivity)
    tested = np.isfinite(p)
    summary = {"test": name, "tested_voxels": int(tested.sum()),
               "significant_voxels": int(significant.sum()), "correction": correction,
               "alpha": config.alpha, "clusters": len(table),
               "min_p": float(np.nanmin(p)) if tested.any() else float("nan"),
               "max_abs_t": float(np.nanmax(np.abs(t))) if tested.any() else float("nan"),
               "top_region": table.region.iloc[0] if len(table) else ""}
    log.info("%s: %d of %d tested voxels significant (%s p < %g), %d cluster(s)", name,
             summary["significant_voxels"], summary["tested_voxels"], correction,
             config.alpha, len(table))
    return summary, table


def _permutation_tests_apply(config: StatsConfig) -> bool:
    """Whether the permutation tests run: they need exchangeable units, one map per subject."""
    if config.paired_sessions is not None and (len(set(config.paired_sessions)) != 2 or len(
            config.paired_sessions) != 2 or not config.permutations):
        raise ValueError(f"--paired-sessions takes two different sessions and --permutations, "
                         f"got {config.paired_sessions} and {config.permutations} permutations")
    if config.paired_sessions and config.unit != "subject":
        raise ValueError("paired permutation tests take one map per subject (unit 'subject')")
    if config.permutations and config.unit != "subject":
        log.warning("permutation tests skipped: sessions of one subject are not exchangeable "
                    "between groups (they need unit 'subject')")
        return False
    return config.permutations > 0


#: File-name tags of the permutation inferences.
_INFERENCE_TAGS = {"max-T": "maxt", "TFCE": "tfce", "cluster-size": "cluster-size",
                   "cluster-mass": "cluster-mass"}


def _permutation_designs(units: pd.DataFrame, maps: np.ndarray, groups: list[str],
                         ) -> dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """One-sample per group (sign flips) and two-sample between two groups (label permutations)
    of the subjects' thresholded maps: ``name -> (units, (N, V) maps, (N,) tested variable)``."""
    designs = {}
    for group in groups:
        rows = (units.diagnosis == group).to_numpy()
        designs[f"one-sample_{group}"] = (units[rows], maps[rows], np.ones(rows.sum()))
    if len(groups) == 2:
        a, _ = groups
        designs[f"two-sample_{'-'.join(groups)}"] = (
            units, maps, (units.diagnosis == a).to_numpy(np.float64))
    return designs


def _paired_designs(sessions: pd.DataFrame, groups: list[str], brain: np.ndarray | None,
                    config: StatsConfig,
                    ) -> dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """Per group, the subjects' second-minus-first session differences of their thresholded
    session maps (each map at its own percentile), tested by sign flips: a paired test."""
    first, second = config.paired_sessions
    designs = {}
    for group in groups:
        units, maps = [], []
        for participant, rows in sessions[sessions.diagnosis == group].groupby("participant_id"):
            pair = [rows[rows.session_id == s] for s in (first, second)]
            if any(p.empty for p in pair):
                continue
            values = []
            for session_rows in pair:
                mapped = session_map(session_rows.path, config.method, brain)
                thresholded = threshold_at(mapped, brain_percentile(
                    mapped, brain, config.percentile), brain)
                values.append(thresholded[brain] if brain is not None else thresholded.ravel())
            units.append({"participant_id": participant, "diagnosis": group})
            maps.append(values[1] - values[0])
        name = f"paired_{group}_{second}-{first}"
        if not units:
            log.warning("%s skipped: no %s subject has both sessions", name, group)
            continue
        designs[name] = (pd.DataFrame(units), np.asarray(maps), np.ones(len(units)))
    return designs


def _cohort_covariates(run: RunFolder, columns: list[str]) -> pd.DataFrame:
    """``participant_id, session_id`` and the covariate ``columns`` of the run's cohort."""
    if not columns:
        return pd.DataFrame(columns=["participant_id", "session_id"])
    if not run.cohort_file.is_file():
        raise RunFolderError(f"{run.cohort_file}: no cohort table to read covariates "
                             f"{columns} from")
    cohort = read_tsv(run.cohort_file)
    missing = [c for c in columns if c not in cohort.columns]
    if missing:
        raise ValueError(f"covariates {missing} are not columns of {run.cohort_file} "
                         f"({', '.join(map(str, cohort.columns))})")
    return cohort[["participant_id", "session_id", *columns]]


def _unit_covariates(cohort: pd.DataFrame, sessions: pd.DataFrame, units: pd.DataFrame,
                     columns: list[str]) -> np.ndarray:
    """``(N, K)`` covariate design of the subjects in ``units``: each cohort column over the
    sessions mapped (numbers averaged, text the same in every session), text dummy-coded."""
    if not columns:
        return np.empty((len(units), 0))
    used = sessions[["participant_id", "session_id"]].drop_duplicates()
    table = used.merge(cohort, how="left", on=["participant_id", "session_id"])
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(table[c])
               and not pd.api.types.is_bool_dtype(table[c])]
    for column in sorted(set(columns) - set(numeric)):
        differing = table.groupby("participant_id")[column].nunique() > 1
        if differing.any():
            raise ValueError(f"covariate {column!r} differs between the sessions of "
                             f"{', '.join(differing.index[differing])}")
    per_subject = table.groupby("participant_id").agg(
        {c: "mean" if c in numeric else "first" for c in columns})
    design, names = covariate_design(per_subject.loc[units.participant_id.to_numpy()], columns)
    log.info("permutation covariates: %s", ", ".join(names))
    return design


def _permutation_test(out: Path, name: str, maps: np.ndarray, tested: np.ndarray,
                      covariates: np.ndarray, brain: np.ndarray | None, grid: Grid,
                      atlas: Atlas | None, config: StatsConfig,
                      ) -> list[tuple[dict, pd.DataFrame]]:
    """Runs one permutation test and writes its ``NAME_T`` and ``NAME_logp-TAG`` maps; a summary
    row and cluster table per inference (none when the model has too few maps)."""
    needed = 2 + covariates.shape[1] + int(np.ptp(tested) > 0)
    if len(maps) < needed:
        log.warning("%s skipped: %d map(s), the model with %d covariate column(s) needs %d",
                    name, len(maps), covariates.shape[1], needed)
        return []
    mask = brain if brain is not None else np.ones(grid.shape, bool)
    result = permutation_test(maps, tested, mask, covariates, config.permutations, config.tfce,
                              config.cluster_threshold, config.seed)
    t = _spread(result.t, mask)
    write_map(out / f"{name}_T", t, grid)
    rows = []
    for inference, logp in result.logp.items():
        write_map(out / f"{name}_logp-{_INFERENCE_TAGS[inference]}", _spread(logp, mask), grid)
        summary, table = _significance(name, t, _spread(result.p(inference), mask),
                                       f"permutation {inference}", grid, atlas, config)
        rows.append(({**summary, "permutations": result.n_permutations,
                      "covariates": ",".join(config.covariates)}, table))
    return rows


def _spread(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    full = np.full(mask.shape, np.nan)
    full[mask] = values
    return full
