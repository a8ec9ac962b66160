"""Maps summarised per atlas region (paper 1, 2.4 and 3.2.1: AAL2 regions of a mask).

For a mask ``m`` the quantity of interest is the density of ``1 - m`` per region (how much of the
region the mask hides); for an attribution map it is the mean attribution per region.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from voxplain.data.atlas import Atlas


def region_means(values: np.ndarray, atlas: Atlas) -> pd.Series:
    """Mean of ``values`` (on the atlas grid) in every region, indexed by region name.

    A region with no voxel on the grid gets NaN.
    """
    if values.shape != atlas.labels.shape:
        raise ValueError(f"map shape {values.shape} differs from the atlas grid "
                         f"{atlas.labels.shape}")
    indices = np.array(sorted(atlas.names))
    sums = np.bincount(atlas.labels.ravel(), weights=values.ravel().astype(np.float64),
                       minlength=indices.max() + 1)
    counts = np.bincount(atlas.labels.ravel(), minlength=indices.max() + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[indices] / counts[indices]
    return pd.Series(means, index=[atlas.names[i] for i in indices], name="mean")


def top_regions(values: np.ndarray, atlas: Atlas, k: int = 5) -> list[str]:
    """Names of the ``k`` regions with the highest mean of ``values`` (NaN regions last)."""
    means = region_means(values, atlas).dropna()
    return list(means.sort_values(ascending=False, kind="stable").index[:k])
