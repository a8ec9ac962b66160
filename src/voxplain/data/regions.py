"""Maps summarised per atlas region (paper 1, 2.4 and 3.2.1: AAL2 regions of a mask).

For a mask ``m`` the quantity of interest is the density of ``1 - m`` per region (how much of the
region the mask hides); for an attribution map it is the mean attribution per region.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy import sparse

from voxplain.data.atlas import Atlas

#: maps x voxels converted to float64 at a time by :func:`region_means_batch` (~64 MB).
_CHUNK_ELEMENTS = 8_000_000


def region_means(values: np.ndarray, atlas: Atlas) -> pd.Series:
    """Mean of ``values`` (on the atlas grid) in every region, indexed by region name.

    A region with no voxel on the grid gets NaN.
    """
    return pd.Series(region_means_batch(np.asarray(values)[None], atlas)[0],
                     index=atlas.region_names, name="mean")


def region_means_batch(maps: np.ndarray, atlas: Atlas) -> np.ndarray:
    """``(M, R)`` mean of each of ``maps`` ``(M, *grid)`` in every region (label order).

    The labelled voxels are gathered (in float64, a few maps at a time) and multiplied by one
    sparse averaging matrix, instead of a loop over regions; a region with no voxel on the grid
    gets NaN.
    """
    maps = np.asarray(maps)
    if maps.shape[1:] != atlas.labels.shape:
        raise ValueError(f"map shape {maps.shape[1:]} differs from the {atlas.title} grid "
                         f"{atlas.labels.shape}")
    voxels, averaging, empty = _averaging_matrix(atlas)
    flat = maps.reshape(len(maps), -1)
    chunk = max(1, _CHUNK_ELEMENTS // max(len(voxels), 1))
    means = np.zeros((len(maps), len(empty)))
    for start in range(0, len(maps), chunk):
        labelled = flat[start:start + chunk, voxels].astype(np.float64)
        means[start:start + chunk] = np.asarray(labelled @ averaging)
    means[:, empty] = np.nan
    return means


@functools.lru_cache(maxsize=8)
def _averaging_matrix(atlas: Atlas) -> tuple[np.ndarray, sparse.csr_matrix, np.ndarray]:
    """Labelled voxels (flat indices), the ``(labelled, R)`` matrix with ``1 / |region|`` at
    (voxel, its region), and which regions are empty."""
    indices = np.array(sorted(atlas.names))
    column = np.full(max(int(atlas.labels.max()), int(indices.max())) + 1, -1)
    column[indices] = np.arange(len(indices))
    labels = atlas.labels.ravel()
    voxels = np.flatnonzero(column[labels] >= 0)
    regions = column[labels[voxels]]
    counts = np.bincount(regions, minlength=len(indices))
    matrix = sparse.csr_matrix((1.0 / counts[regions], (np.arange(len(voxels)), regions)),
                               shape=(len(voxels), len(indices)))
    return voxels, matrix, counts == 0


def top_regions(values: np.ndarray, atlas: Atlas, k: int = 5) -> list[str]:
    """Names of the ``k`` regions with the highest mean of ``values`` (NaN regions last)."""
    means = region_means(values, atlas).dropna()
    return list(means.sort_values(ascending=False, kind="stable").index[:k])
