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
from voxplain.evaluate.stats import (CORRECTIONS, TTest, VoxelMoments, brain_percentile,
                                     cluster_table, normalise_map, one_sample_ttest,
                                     percentile_test, threshold_at, two_sample_ttest)
from voxplain.io import write_tsv
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

    Writes ``RUN/stats/METHOD/``: ``percentiles.tsv``, ``percentile_test.tsv``, for each test
    ``TEST_T``, ``TEST_p``, ``TEST_p-bonferroni`` and ``TEST_p-fdr`` maps (NIfTI with the maps'
    affine, NPY for 2D), ``clusters.tsv`` (significant voxels after ``config.correction``) and
    ``summary.tsv`` (returned). Records the settings as ``[stats_METHOD]`` (replaced at
    each run).
    """
    run = RunFolder(config.run)
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
    records = []
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
        moments[diagnosis].add(threshold_at(values, percentile, brain))
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
        clusters.append(table.assign(test=name))
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
    with np.errstate(invalid="ignore"):
        significant = np.nan_to_num(p, nan=1.0) < config.alpha
    table = cluster_table(result.t, significant, grid.affine, atlas, config.connectivity)
    tested = np.isfinite(result.p)
    summary = {"test": name, "tested_voxels": int(tested.sum()),
               "significant_voxels": int(significant.sum()), "correction": config.correction,
               "alpha": config.alpha, "clusters": len(table),
               "min_p": float(np.nanmin(p)) if tested.any() else float("nan"),
               "max_abs_t": float(np.nanmax(np.abs(result.t))) if tested.any() else float("nan"),
               "top_region": table.region.iloc[0] if len(table) else ""}
    log.info("%s: %d of %d tested voxels significant (%s p < %g), %d cluster(s)", name,
             summary["significant_voxels"], summary["tested_voxels"], config.correction,
             config.alpha, len(table))
    return summary, table
