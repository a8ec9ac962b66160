"""Voxel grids: the SPM/Clinica MNI grid and anti-aliased downsampling that keeps the affine.

A grid is a spatial shape plus a 4x4 voxel-to-world affine (mm), in 2D as in 3D: a 2D grid
``(H, W)`` keeps its pixel spacing on the first two axes of the affine, the third being the unit
normal of the plane, as a 2D map's NIfTI header stores it (:func:`voxplain.io.save_nifti`).

Downsampling by an integer factor averages blocks of ``factor**d`` voxels, so it is anti-aliased
by construction, and moves the affine so that each coarse voxel sits at the centre of the block
it averages: a coarse map overlays the fine one in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from voxplain.io import nifti_affine

#: Grid of Clinica's t1-volume outputs (SPM12 "Ixi549Space"): 121x145x121 voxels of 1.5 mm.
SPM_SHAPE: tuple[int, int, int] = (121, 145, 121)
SPM_AFFINE: np.ndarray = np.array(
    [[-1.5, 0.0, 0.0, 90.0],
     [0.0, 1.5, 0.0, -126.0],
     [0.0, 0.0, 1.5, -72.0],
     [0.0, 0.0, 0.0, 1.0]]
)


@dataclass(frozen=True)
class Grid:
    """A spatial shape, 2D or 3D, and its ``(4, 4)`` voxel-to-world affine (mm).

    A 2D grid's affine may be given ``(3, 3)``; it is kept ``(4, 4)``
    (:func:`voxplain.io.nifti_affine`), so there is one convention for every grid.
    """

    shape: tuple[int, ...]
    affine: np.ndarray

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3):
            raise ValueError(f"a grid is 2D or 3D, got shape {tuple(self.shape)}")
        object.__setattr__(self, "affine", nifti_affine(self.affine))

    @property
    def key(self) -> tuple[tuple[int, ...], bytes]:
        """Hashable identity (shape and exact affine), e.g. for in-process caches."""
        return tuple(int(s) for s in self.shape), np.asarray(self.affine, np.float64).tobytes()

    @classmethod
    def from_key(cls, key: tuple[tuple[int, ...], bytes]) -> Grid:
        """The grid whose :attr:`key` is ``key``."""
        shape, affine = key
        return cls(shape, np.frombuffer(affine, np.float64).reshape(4, 4).copy())

    @property
    def voxel_size(self) -> tuple[float, ...]:
        """Voxel edge lengths in mm, one per spatial axis (the pixel spacing in 2D)."""
        spatial = len(self.shape)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :spatial], axis=0))


def spm_grid() -> Grid:
    """The 121x145x121, 1.5 mm MNI grid of SPM12 / Clinica t1-volume."""
    return Grid(SPM_SHAPE, SPM_AFFINE.copy())


def downsampled_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Shape after :func:`downsample`: every axis is divided by ``factor``, rounded up."""
    return tuple(-(-size // factor) for size in shape)


def downsample_affine(affine: np.ndarray, factor: int, spatial_dims: int = 3) -> np.ndarray:
    """Affine of the grid downsampled by ``factor`` on its first ``spatial_dims`` axes.

    Coarse voxel ``i`` averages fine voxels ``i*factor .. i*factor + factor - 1``; its centre is
    fine voxel ``i*factor + (factor - 1) / 2``.
    """
    scale = np.eye(4)
    for axis in range(spatial_dims):
        scale[axis, axis] = factor
        scale[axis, 3] = (factor - 1) / 2
    return affine @ scale


def downsample(array: np.ndarray, factor: int, spatial_dims: int | None = None) -> np.ndarray:
    """Average non-overlapping blocks of ``factor`` voxels along the last ``spatial_dims`` axes.

    Args:
        array: ``(..., *spatial)`` image(s); leading axes (batch, channel) are kept.
        factor: integer block size; 1 returns the array unchanged.
        spatial_dims: number of trailing spatial axes (default: all axes).

    Returns:
        ``(..., *ceil(spatial / factor))`` float32. A block cut by the border is averaged over
        the voxels it holds, so edges are not darkened by padding.
    """
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    spatial_dims = array.ndim if spatial_dims is None else spatial_dims
    if factor == 1:
        return array.astype(np.float32, copy=False)
    lead = array.shape[: array.ndim - spatial_dims]
    spatial = array.shape[array.ndim - spatial_dims:]
    padded = tuple(-(-s // factor) * factor for s in spatial)
    pad = [(0, 0)] * len(lead) + [(0, p - s) for s, p in zip(spatial, padded)]
    values = np.pad(array.astype(np.float64), pad)
    counts = np.pad(np.ones(spatial), [(0, p - s) for s, p in zip(spatial, padded)])
    blocks = lead + tuple(dim for p in padded for dim in (p // factor, factor))
    block_axes = tuple(len(lead) + 2 * i + 1 for i in range(spatial_dims))
    summed = values.reshape(blocks).sum(axis=block_axes)
    count_blocks = tuple(dim for p in padded for dim in (p // factor, factor))
    count = counts.reshape(count_blocks).sum(axis=tuple(2 * i + 1 for i in range(spatial_dims)))
    return (summed / count).astype(np.float32)


def resample_to_grid(
    array: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Resample a 3D volume defined on ``affine`` onto ``grid`` (world coordinates in mm).

    ``order=0`` is nearest neighbour (labels, atlases); ``order=1`` trilinear (intensities).
    Voxels of ``grid`` outside the source volume get ``cval``.
    """
    source_from_target = np.linalg.inv(affine) @ grid.affine
    return ndimage.affine_transform(
        array, source_from_target[:3, :3], offset=source_from_target[:3, 3],
        output_shape=grid.shape, order=order, mode="constant", cval=cval,
    ).astype(array.dtype if order == 0 else np.float32)
