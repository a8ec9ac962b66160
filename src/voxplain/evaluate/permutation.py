"""Permutation inference for the heatmap statistics: max-T, TFCE and cluster FWE with covariates.

Paper 2's voxel-wise tests are parametric and corrected voxel by voxel (Bonferroni, FDR). The
maps they test (each thresholded at its own 95th percentile: mostly zeros) are far from normal,
and neighbouring voxels are far from independent, which is why neuroimaging uses permutation
inference instead (Winkler et al. 2014, NeuroImage 92). Each test here is one general linear
model per voxel, solved by :func:`nilearn.mass_univariate.permuted_ols`:

    map_i(v) = beta(v) * tested_i + gamma(v) . covariates_i + c(v) + e_i(v)

- two-sample (``tested`` = 1 for group a, 0 for group b): ``beta`` is the difference a - b
  adjusted for the covariates; the null distribution comes from permuting ``tested``
  (the covariates' effect removed first, as in nilearn);
- one-sample or paired (``tested`` all 1, the maps or a subject's session differences): ``beta``
  is the mean (at the covariates' mean: they are centred here); the null distribution comes from
  flipping the sign of each map.

From the same permutations, family-wise error (FWE) corrected p-values of four kinds:
``max-T`` (voxel level: each voxel's \\|T\\| against the maximum \\|T\\| over the mask),
``TFCE`` (threshold-free cluster enhancement, Smith & Nichols 2009, 2D/3D face connectivity),
``cluster-size`` and ``cluster-mass`` (clusters of \\|T\\| above the t value of the two-sided
cluster-forming p ``cluster_threshold``, against the largest cluster of each permutation).
All tests are two-sided; p = (1 + #{null >= observed}) / (1 + n_permutations), so the smallest
p is 1 / (1 + n_permutations).

Voxels whose values are the same in every map carry no test (NaN), as with the parametric
tests; unlike them, a constant non-zero voxel (T = +-inf there) is not tested either.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd

#: Kinds of FWE-corrected p-values, as named in file names and summary rows.
INFERENCES = ("max-T", "TFCE", "cluster-size", "cluster-mass")
_NILEARN_KEYS = {"max-T": "logp_max_t", "TFCE": "logp_max_tfce",
                 "cluster-size": "logp_max_size", "cluster-mass": "logp_max_mass"}

#: What nilearn says of inputs this module makes on purpose (an int mask image, one job, the
#: constant voxels it leaves out anyway).
_NILEARN_NOTICES = ("Data array used to create a new image contains 64-bit ints",
                    "The specified number of permutations",
                    "Some descriptors in 'target_vars' have zeros")


@dataclass(frozen=True)
class PermutationTest:
    """A voxel-wise permutation test: ``t`` and ``-log10`` FWE p-values, each ``(V,)`` over the
    mask's voxels (NaN where no test).

    Attributes:
        t: T statistic of the tested effect (adjusted for the covariates).
        logp: ``-log10`` FWE-corrected p-values by inference (:data:`INFERENCES`), those asked.
        n_permutations: permutations (or sign flips) drawn.
    """

    t: np.ndarray
    logp: dict[str, np.ndarray]
    n_permutations: int

    def p(self, inference: str) -> np.ndarray:
        """FWE-corrected p-values of one inference (``10 ** -logp``)."""
        return 10.0 ** -self.logp[inference]


def permutation_test(maps: np.ndarray, tested: np.ndarray, mask: np.ndarray,
                     covariates: np.ndarray | None = None, n_permutations: int = 1000,
                     tfce: bool = False, cluster_threshold: float | None = None,
                     seed: int = 0, n_jobs: int = 1) -> PermutationTest:
    """Voxel-wise GLM of ``maps`` on ``tested`` (+ covariates + intercept), permutation FWE.

    Args:
        maps: ``(N, V)`` values of N maps at the V voxels of ``mask`` (C order).
        tested: ``(N,)`` tested variable: a group indicator (two-sample, permuted) or all ones
            (one-sample / paired, sign flips).
        mask: ``(*spatial)`` boolean mask with V voxels (2D or 3D), for TFCE and clusters.
        covariates: ``(N, K)`` numeric confounds (e.g. :func:`covariate_design`), fitted but
            not tested; centred here.
        n_permutations: permutations (sign flips); 0 gives T only.
        tfce: also TFCE FWE p-values (slower: TFCE of every permutation).
        cluster_threshold: cluster-forming two-sided p (e.g. 0.001); None: no cluster inference.
        seed: random state of the permutations (same seed, same p-values).
        n_jobs: parallel workers of nilearn (joblib).

    Returns:
        :class:`PermutationTest` over the V voxels.
    """
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    maps = np.asarray(maps, np.float64)
    tested = np.asarray(tested, np.float64).reshape(-1)
    mask = np.asarray(mask, bool)
    if maps.ndim != 2 or maps.shape[1] != mask.sum():
        raise ValueError(f"maps {maps.shape} must be (N, V) with V = {int(mask.sum())} "
                         "voxels of the mask")
    n, size = maps.shape
    if tested.shape != (n,):
        raise ValueError(f"tested variable of {tested.size} values for {n} maps")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask of {mask.ndim} dimensions: 2D or 3D maps only")
    design = _centred(covariates, n)
    free = n - 1 - (0 if design is None else design.shape[1]) - (np.ptp(tested) > 0)
    if free < 1:
        raise ValueError(f"{n} maps leave no degree of freedom for the tested variable and "
                         f"{0 if design is None else design.shape[1]} covariate column(s)")
    varying = np.ptp(maps, axis=0) > 0
    volume = mask.reshape(*mask.shape, 1) if mask.ndim == 2 else mask
    tested_mask = np.zeros(volume.shape, bool)
    tested_mask[volume] = varying
    out = {"t": np.full(size, np.nan), **{k: np.full(size, np.nan) for k in _asked(
        n_permutations, tfce, cluster_threshold)}}
    if varying.any():
        masker = NiftiMasker(nib.Nifti1Image(tested_mask.astype(np.uint8), np.eye(4))).fit()
        with warnings.catch_warnings():
            for message in _NILEARN_NOTICES:
                warnings.filterwarnings("ignore", message=message)
            result = permuted_ols(tested[:, None], maps[:, varying], confounding_vars=design,
                                  model_intercept=True, n_perm=n_permutations,
                                  two_sided_test=True, random_state=seed, n_jobs=n_jobs,
                                  masker=masker if tfce or cluster_threshold is not None
                                  else None, tfce=tfce, threshold=cluster_threshold,
                                  output_type="dict")
        out["t"][varying] = result["t"][0]
        for inference in out.keys() - {"t"}:
            out[inference][varying] = result[_NILEARN_KEYS[inference]][0] + 0.0  # no -0
    t = out.pop("t")
    return PermutationTest(t, {k: out[k] for k in INFERENCES if k in out}, n_permutations)


def covariate_design(table: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Numeric design columns of cohort ``columns``: numbers as they are, anything else (sex,
    site) dummy-coded with its first level (sorted) left out as reference.

    Returns:
        ``(N, K)`` float array and the K column names (``sex[M]`` for a dummy).
    """
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"covariates {missing} are not columns of the cohort "
                         f"({', '.join(map(str, table.columns))})")
    parts, names = [], []
    for column in columns:
        values = table[column]
        if values.isna().any():
            raise ValueError(f"covariate {column!r} is missing for {int(values.isna().sum())} "
                             f"map(s)")
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            parts.append(values.to_numpy(np.float64)[:, None])
            names.append(column)
            continue
        levels = sorted(values.astype(str).unique())
        for level in levels[1:]:
            parts.append((values.astype(str) == level).to_numpy(np.float64)[:, None])
            names.append(f"{column}[{level}]")
    if not parts:
        return np.empty((len(table), 0)), names
    return np.hstack(parts), names


def _centred(covariates: np.ndarray | None, n: int) -> np.ndarray | None:
    """Covariates centred (the one-sample mean is then the mean at the covariates' mean),
    constant columns dropped (the intercept covers them)."""
    if covariates is None:
        return None
    covariates = np.asarray(covariates, np.float64).reshape(n, -1)
    covariates = covariates[:, np.ptp(covariates, axis=0) > 0]
    if not covariates.shape[1]:
        return None
    return np.ascontiguousarray(covariates - covariates.mean(axis=0))


def _asked(n_permutations: int, tfce: bool, cluster_threshold: float | None) -> list[str]:
    if n_permutations <= 0:
        return []
    return ["max-T", *(["TFCE"] if tfce else []),
            *(["cluster-size", "cluster-mass"] if cluster_threshold is not None else [])]
