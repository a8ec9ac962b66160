"""Cost of the evaluation metrics that touch every voxel of many maps (issue 5), in one run.

Sections (``--sections``, each a function below returning table rows):

- ``roi``: ROI-based similarity of paper 1 (2.4) for M masks at the full SPM grid
  (121x145x121) with AAL2: :func:`~voxplain.evaluate.similarity.roi_vectors` (density of
  ``1 - m`` in 120 regions) + :func:`~voxplain.evaluate.similarity.cosine_matrix` (all M x M
  pairs). Target: under 10 s for M = 100 on 2 cores. Reported against two references measured in
  the same run: the floor, one float32 pass over every voxel of every mask (``masks.max()``: what
  checking that the masks lie in [0, 1] costs, and a lower bound for anything that reads them),
  and the naive per-region loop (a boolean mask and a mean per region and map), timed on 3
  masks and scaled to M.

The voxel-wise t-tests of the heatmap statistics (issue 5, item 4) get their own section
function here (``SECTIONS["ttest"]``), added by that module's author, and so do their
permutation tests (``SECTIONS["permutation"]``, issue 22).

Run: ``.venv/bin/python benchmarks/evaluation.py [--sections roi] [--maps 100] [--grid full|demo]``
(``--sections permutation --maps 50 --grid demo`` for the permutation tests, not run by default).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import numpy as np

from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid, downsampled_shape, spm_grid
from voxplain.data.regions import _averaging_matrix
from voxplain.evaluate.similarity import cosine_matrix, roi_vectors


def grid_of(name: str) -> Grid:
    """``full``: the SPM grid; ``demo``: the SPM grid downsampled by 4 (31x37x31)."""
    full = spm_grid()
    if name == "full":
        return full
    return Grid(downsampled_shape(full.shape, 4), full.affine @ np.diag([4.0, 4.0, 4.0, 1.0]))


def random_masks(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``(n, *shape)`` float32 masks: 1 except ~10% of voxels in [0, 1) (a masked zone)."""
    rng = np.random.default_rng(seed)
    masks = np.ones((n, *shape), dtype=np.float32)
    for mask in masks:
        flat = mask.reshape(-1)
        hidden = rng.random(flat.size, dtype=np.float32) < 0.1
        flat[hidden] = rng.random(int(hidden.sum()), dtype=np.float32)
    return masks


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def roi_section(n_maps: int, grid_name: str) -> list[str]:
    """ROI vectors + cosine matrix of ``n_maps`` masks vs the read floor and the naive loop."""
    grid = grid_of(grid_name)
    atlas_seconds = seconds(lambda: Atlas.aal2(grid))
    atlas = Atlas.aal2(grid)
    operator_seconds = seconds(lambda: _averaging_matrix(atlas))
    masks = random_masks(n_maps, grid.shape)

    def ours() -> np.ndarray:
        return cosine_matrix(roi_vectors(masks, atlas, "mask"))

    ours()  # warm-up
    runs = [seconds(ours) for _ in range(3)]
    floor = min(seconds(masks.max) for _ in range(3))
    sample = min(n_maps, 3)
    regions = [atlas.labels == index for index in sorted(atlas.names)]
    naive = seconds(lambda: [[1 - masks[m][region].mean() for region in regions]
                             for m in range(sample)]) * n_maps / sample
    best = min(runs)
    shape = "x".join(map(str, grid.shape))
    return [
        f"| roi: {n_maps} masks, {shape}, AAL2 | {best:.2f} (median {np.median(runs):.2f}) "
        f"| {floor:.2f} | {best / floor:.1f} | {naive:.1f} ({naive / best:.0f}x slower) "
        f"| {_peak_mb():.0f} |",
        f"| roi: one-off AAL2 resampling / averaging matrix | {atlas_seconds:.2f} / "
        f"{operator_seconds:.2f} | | | | |",
    ]


def ttest_section(n_maps: int, grid_name: str) -> list[str]:
    """Voxel-wise t-tests of paper 2 (2.4) over the MNI brain voxels: one-sample on ``2 n``
    maps, two-sample on two groups of ``n`` (200 maps in all at the default ``--maps 100``).

    The tests stream maps one at a time (as ``voxplain stats`` reads them from disk); the maps
    cycle through a pool of 16 random float32 maps so the benchmark holds 16 volumes, not 200
    (the arithmetic per map is the same). References in the same run: the floor, one float32
    pass over every voxel of every map (``max``), and scipy.stats.ttest_ind on an in-memory
    ``(2n, V)`` array, timed on 1/20 of the brain voxels and scaled to all of them. The paper-2
    preprocessing of every map (normalise in the brain, 95th percentile, threshold) is timed too.
    """
    from scipy import stats

    from voxplain.data.template import brain_mask
    from voxplain.evaluate.stats import (brain_percentile, normalise_map, one_sample_ttest,
                                         threshold_at, two_sample_ttest)

    grid = grid_of(grid_name)
    brain = brain_mask(grid)
    rng = np.random.default_rng(0)
    pool = [rng.random(grid.shape, dtype=np.float32) for _ in range(16)]

    def maps(count: int, offset: int = 0):
        return (pool[(offset + i) % len(pool)] for i in range(count))

    one = seconds(lambda: one_sample_ttest(maps(2 * n_maps), brain))
    two = seconds(lambda: two_sample_ttest(maps(n_maps), maps(n_maps, 7), brain))
    floor = seconds(lambda: [m.max() for m in maps(2 * n_maps)])
    inside = np.flatnonzero(brain.ravel())[::20]
    stacked = np.stack([m.ravel()[inside] for m in maps(2 * n_maps)])
    scipy_two = seconds(lambda: stats.ttest_ind(stacked[:n_maps], stacked[n_maps:])) * 20

    def preprocess() -> None:
        for m in maps(2 * n_maps):
            normalised = normalise_map(m, brain)
            threshold_at(normalised, brain_percentile(normalised, brain), brain)

    prep = seconds(preprocess)
    shape = "x".join(map(str, grid.shape))
    voxels = f"{int(brain.sum())} brain voxels"
    return [
        f"| ttest: one-sample, {2 * n_maps} maps, {shape} ({voxels}) | {one:.2f} | {floor:.2f} "
        f"| {one / floor:.1f} | | {_peak_mb():.0f} |",
        f"| ttest: two-sample, {n_maps} vs {n_maps} maps, {shape} | {two:.2f} | {floor:.2f} "
        f"| {two / floor:.1f} | scipy ttest_ind in memory: {scipy_two:.2f} | {_peak_mb():.0f} |",
        f"| ttest: normalise + 95th percentile + threshold of {2 * n_maps} maps | {prep:.2f} "
        f"| {floor:.2f} | {prep / floor:.1f} | | {_peak_mb():.0f} |",
    ]


def permutation_section(n_maps: int, grid_name: str) -> list[str]:
    """Permutation tests of the heatmap statistics (issue 22, item 3) over the MNI brain voxels:
    max-T with 1000 permutations, two-sample ``n`` vs ``n`` maps and one-sample on ``2 n``, and
    the two-sample test with TFCE, timed on 20 permutations and scaled to 1000 (TFCE of every
    permutation dominates). The maps are random, each thresholded at its own 95th percentile as
    ``voxplain stats`` does, so nearly every brain voxel varies over the maps: an upper bound on
    maps that share their bright regions. Floor: one float64 pass over the ``(2n, V)`` maps.
    """
    from voxplain.data.template import brain_mask
    from voxplain.evaluate.permutation import permutation_test
    from voxplain.evaluate.stats import threshold_at_percentile

    grid = grid_of(grid_name)
    brain = brain_mask(grid)
    rng = np.random.default_rng(0)
    maps = np.stack([threshold_at_percentile(rng.random(grid.shape, dtype=np.float32),
                                             brain)[brain] for _ in range(2 * n_maps)])
    group = np.r_[np.ones(n_maps), np.zeros(n_maps)]
    two = seconds(lambda: permutation_test(maps, group, brain, n_permutations=1000))
    one = seconds(lambda: permutation_test(maps, np.ones(2 * n_maps), brain,
                                           n_permutations=1000))
    tfce = seconds(lambda: permutation_test(maps, group, brain, n_permutations=20,
                                            tfce=True)) * 50
    floor = seconds(lambda: maps.astype(np.float64).max())
    shape = "x".join(map(str, grid.shape))
    voxels = f"{int(brain.sum())} brain voxels"
    return [
        f"| permutation max-T: two-sample, {n_maps} vs {n_maps} maps, {shape} ({voxels}), "
        f"1000 permutations | {two:.2f} | {floor:.3f} | {two / floor:.0f} | | {_peak_mb():.0f} |",
        f"| permutation max-T: one-sample, {2 * n_maps} maps, 1000 sign flips | {one:.2f} "
        f"| {floor:.3f} | {one / floor:.0f} | | {_peak_mb():.0f} |",
        f"| permutation TFCE: two-sample, 1000 permutations (20 timed x 50) | {tfce:.1f} "
        f"| {floor:.3f} | {tfce / floor:.0f} | | {_peak_mb():.0f} |",
    ]


#: Sections by name. Each takes (number of maps, grid name) and returns Markdown table rows.
SECTIONS: dict[str, Callable[[int, str], list[str]]] = {"roi": roi_section,
                                                        "ttest": ttest_section,
                                                        "permutation": permutation_section}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # permutation only when asked: TFCE at the full grid takes hours
    parser.add_argument("--sections", default="roi,ttest")
    parser.add_argument("--maps", type=int, default=100, help="maps per section")
    parser.add_argument("--grid", default="full", choices=["full", "demo"])
    arguments = parser.parse_args()
    print("| what | seconds | floor s (one pass over every voxel) | ratio | naive loop s | "
          "peak MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in arguments.sections.split(","):
        for row in SECTIONS[name](arguments.maps, arguments.grid):
            print(row, flush=True)


if __name__ == "__main__":
    main()
