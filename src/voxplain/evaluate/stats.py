"""Heatmap statistics (paper 2, 2.4): percentile test, voxel-wise t-tests, clusters.

Paper 2 compares two patient groups through their explanation maps in three steps:

1. the 95th percentile of each session's normalised whole-brain map, compared between groups
   with an unpaired Student t-test (mean (SD) per group, t, p);
2. each map thresholded at its own 95th percentile (values below it set to 0);
3. voxel-wise t-tests on the thresholded maps, as in fMRI: one-sample within a group (areas that
   the group's maps share) and two-sample between groups, Bonferroni corrected (FDR too here).

The voxel-wise tests stream the maps: one pass keeps a running mean and sum of squared
deviations per voxel (Welford's update, float64), so memory does not grow with the number of
maps. Voxels where every map of a group is equal (e.g. zero everywhere after thresholding) carry
no test: T and p are NaN there, as with scipy, and corrections count only the tested voxels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage, special, stats

from voxplain.data.atlas import Atlas

#: Percentile of paper 2 (thresholds and group comparison).
PERCENTILE = 95.0


def normalise_map(values: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """Min-max normalisation to [0, 1] inside ``brain``; 0 outside it and for a constant map.

    Args:
        values: ``(*spatial)`` map.
        brain: ``(*spatial)`` boolean mask (default: every voxel).
    """
    values = np.asarray(values, dtype=np.float32)
    inside = _inside(values, brain)
    low, high = float(inside.min()), float(inside.max())
    out = np.zeros_like(values)
    if high > low:
        scaled = (values - low) / (high - low)
        if brain is None:
            return scaled
        out[brain] = scaled[brain]
    return out


def brain_percentile(values: np.ndarray, brain: np.ndarray | None = None,
                     q: float = PERCENTILE) -> float:
    """The ``q``-th percentile of ``values`` over the voxels of ``brain`` (linear interpolation)."""
    return float(np.percentile(_inside(values, brain), q))


def threshold_at_percentile(values: np.ndarray, brain: np.ndarray | None = None,
                            q: float = PERCENTILE) -> np.ndarray:
    """``values`` where they reach their own ``q``-th percentile inside ``brain``, else 0."""
    values = np.asarray(values, dtype=np.float32)
    keep = values >= brain_percentile(values, brain, q)
    if brain is not None:
        keep &= brain
    return np.where(keep, values, np.float32(0))


def percentile_test(group_a: Sequence[float], group_b: Sequence[float]) -> dict[str, float]:
    """Unpaired Student t-test (equal variances) of two groups' percentile values.

    Returns:
        ``n_a, mean_a, sd_a, n_b, mean_b, sd_b, t, p`` (SD with ``ddof=1``; two-sided p).
    """
    a, b = np.asarray(group_a, np.float64), np.asarray(group_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a t-test needs at least 2 maps per group, got {len(a)} and {len(b)}")
    result = stats.ttest_ind(a, b, equal_var=True)
    return {"n_a": len(a), "mean_a": a.mean(), "sd_a": a.std(ddof=1),
            "n_b": len(b), "mean_b": b.mean(), "sd_b": b.std(ddof=1),
            "t": float(result.statistic), "p": float(result.pvalue)}


@dataclass
class VoxelMoments:
    """Count, mean and sum of squared deviations (M2) of maps, voxel by voxel.

    Attributes:
        n: number of maps added.
        mean: ``(V,)`` float64 mean of each voxel.
        m2: ``(V,)`` float64 sum of squared deviations from the mean.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, maps: Iterable[np.ndarray], brain: np.ndarray | None = None) -> VoxelMoments:
        """Moments of ``maps`` (an ``(M, *spatial)`` array or an iterable of ``(*spatial)``
        arrays, e.g. read one at a time from disk) over the voxels of ``brain``."""
        moments = None
        for values in maps:
            flat = _inside(values, brain).astype(np.float64)
            if moments is None:
                moments = cls(0, np.zeros_like(flat), np.zeros_like(flat))
            elif flat.shape != moments.mean.shape:
                raise ValueError(f"map {moments.n} has {flat.size} voxels, the first map "
                                 f"{moments.mean.size}: maps must share one grid")
            moments.add(flat)
        if moments is None:
            raise ValueError("no map to test")
        return moments

    def add(self, flat: np.ndarray) -> None:
        """Welford's update with one ``(V,)`` map."""
        self.n += 1
        delta = flat - self.mean
        self.mean += delta / self.n
        delta *= flat - self.mean
        self.m2 += delta

    def variance(self) -> np.ndarray:
        """Unbiased variance (``ddof=1``) of every voxel."""
        return self.m2 / (self.n - 1)


@dataclass(frozen=True)
class TTest:
    """A voxel-wise t-test: ``t`` and two-sided ``p`` maps (NaN where no test), degrees of
    freedom (scalar, or a map for Welch's test)."""

    t: np.ndarray
    p: np.ndarray
    df: float | np.ndarray


def one_sample_ttest(maps: Iterable[np.ndarray], brain: np.ndarray | None = None,
                     popmean: float = 0.0) -> TTest:
    """Voxel-wise one-sample t-test of ``maps`` against ``popmean`` (paper 2: within a group).

    Args:
        maps: ``(M, *spatial)`` array or an iterable of ``(*spatial)`` maps, M >= 2.
        brain: voxels to test (default: all); the others get NaN.
        popmean: mean under the null hypothesis.

    Returns:
        :class:`TTest` with ``(*spatial)`` maps.
    """
    moments, shape = _moments(maps, brain)
    _need_two(moments.n, "one-sample")
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(moments.variance() / moments.n)
        t = (moments.mean - popmean) / se
    t[se == 0] = np.nan
    df = moments.n - 1
    return TTest(*_spread((t, _two_sided_p(t, df)), shape, brain), df=df)


def two_sample_ttest(maps_a: Iterable[np.ndarray], maps_b: Iterable[np.ndarray],
                     brain: np.ndarray | None = None, equal_var: bool = True) -> TTest:
    """Voxel-wise unpaired t-test, group a minus group b (paper 2: between groups).

    Args:
        maps_a, maps_b: each an ``(M, *spatial)`` array or an iterable of maps, M >= 2.
        brain: voxels to test (default: all); the others get NaN.
        equal_var: Student's test (pooled variance, paper 2); False for Welch's test.
    """
    a, shape = _moments(maps_a, brain)
    b, shape_b = _moments(maps_b, brain)
    if shape != shape_b:
        raise ValueError(f"groups have maps of shapes {shape} and {shape_b}")
    _need_two(a.n, "two-sample")
    _need_two(b.n, "two-sample")
    with np.errstate(divide="ignore", invalid="ignore"):
        if equal_var:
            df = float(a.n + b.n - 2)
            pooled = (a.m2 + b.m2) / df
            se = np.sqrt(pooled * (1 / a.n + 1 / b.n))
        else:
            va, vb = a.variance() / a.n, b.variance() / b.n
            se = np.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
        t = (a.mean - b.mean) / se
    t[se == 0] = np.nan
    p = _two_sided_p(t, df)
    if not equal_var:
        df = _spread((df,), shape, brain)[0]
    return TTest(*_spread((t, p), shape, brain), df=df)


def bonferroni(p: np.ndarray) -> np.ndarray:
    """Bonferroni-adjusted p-values: ``min(1, p * m)``, m = the number of finite p-values."""
    p = np.asarray(p, dtype=np.float64)
    tested = np.isfinite(p)
    out = np.full_like(p, np.nan)
    out[tested] = np.minimum(1.0, p[tested] * tested.sum())
    return out


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over the finite p-values (NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    tested = np.isfinite(p)
    values = p[tested]
    m = values.size
    order = np.argsort(values, kind="stable")
    scaled = values[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    flat = np.empty(m)
    flat[order] = adjusted
    out = np.full_like(p, np.nan)
    out[tested] = flat
    return out


CORRECTIONS = {"bonferroni": bonferroni, "fdr": fdr_bh, "none": lambda p: np.asarray(p, float)}


def cluster_table(t: np.ndarray, significant: np.ndarray, affine: np.ndarray,
                  atlas: Atlas | None = None, connectivity: int = 1) -> pd.DataFrame:
    """Connected clusters of significant voxels, positive and negative T apart.

    Args:
        t: ``(*spatial)`` T map.
        significant: ``(*spatial)`` boolean map of the voxels to cluster.
        affine: voxel-to-world matrix (4x4) of the grid, for peak coordinates in mm.
        atlas: region names at the peaks (an atlas on the same grid); None leaves them out.
        connectivity: neighbours that join voxels (1: faces, up to ``t.ndim``: corners).

    Returns:
        One row per cluster, largest first: ``sign`` (+/-), ``size`` (voxels), ``size_mm3``,
        ``peak_t`` (largest \\|T\\|, signed), ``peak_voxel`` (indices), ``x, y, z`` (mm) and
        ``region`` (atlas name at the peak, "outside atlas" on background).
    """
    t = np.asarray(t)
    if significant.shape != t.shape:
        raise ValueError(f"significance map {significant.shape} differs from T map {t.shape}")
    if atlas is not None and atlas.labels.shape != t.shape:
        raise ValueError(f"atlas grid {atlas.labels.shape} differs from the T map {t.shape}")
    structure = ndimage.generate_binary_structure(t.ndim, connectivity)
    voxel_volume = float(abs(np.linalg.det(affine[:t.ndim, :t.ndim]))) if t.ndim == 3 else 1.0
    rows = []
    for sign, side in (("+", significant & (t > 0)), ("-", significant & (t < 0))):
        labels, count = ndimage.label(side, structure)
        if not count:
            continue
        index = np.arange(1, count + 1)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        peaks = ndimage.maximum_position(np.abs(np.nan_to_num(t)), labels, index)
        for size, peak in zip(sizes, peaks):
            world = affine @ np.array([*peak, *[0] * (3 - t.ndim), 1.0])
            region = (atlas.names.get(int(atlas.labels[peak]), "outside atlas")
                      if atlas is not None else "")
            rows.append({"sign": sign, "size": int(size), "size_mm3": size * voxel_volume,
                         "peak_t": float(t[peak]), "peak_voxel": ",".join(map(str, peak)),
                         "x": world[0], "y": world[1], "z": world[2], "region": region})
    columns = ["sign", "size", "size_mm3", "peak_t", "peak_voxel", "x", "y", "z", "region"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["size", "peak_t"], ascending=[False, False],
                             key=lambda c: c.abs() if c.name == "peak_t" else c,
                             ignore_index=True)


def _inside(values: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    values = np.asarray(values)
    if brain is None:
        return values.ravel()
    if brain.shape != values.shape:
        raise ValueError(f"brain mask {brain.shape} differs from the map {values.shape}")
    return values[brain]


def _moments(maps: Iterable[np.ndarray], brain: np.ndarray | None
             ) -> tuple[VoxelMoments, tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def checked() -> Iterable[np.ndarray]:
        for values in maps:
            shape = np.shape(values)
            if shapes and shape != shapes[0]:
                raise ValueError(f"map {len(shapes)} has shape {shape}, the first {shapes[0]}")
            shapes.append(shape)
            yield values

    moments = VoxelMoments.of(checked(), brain)
    return moments, shapes[0]


def _need_two(n: int, test: str) -> None:
    if n < 2:
        raise ValueError(f"a {test} t-test needs at least 2 maps per group, got {n}")


def _two_sided_p(t: np.ndarray, df: float | np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return 2 * special.stdtr(df, -np.abs(t))


def _spread(flats: Sequence[np.ndarray], shape: tuple[int, ...],
            brain: np.ndarray | None) -> list[np.ndarray]:
    """Brain-voxel vectors back onto the grid, NaN outside the brain."""
    if brain is None:
        return [np.asarray(f).reshape(shape) for f in flats]
    out = []
    for flat in flats:
        full = np.full(shape, np.nan)
        full[brain] = flat
        out.append(full)
    return out
