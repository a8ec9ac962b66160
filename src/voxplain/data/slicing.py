"""Volumes used slice by slice (paper 2, section 2.2): a 2D model of the slices of 3D volumes.

Paper 2 classifies axial slices of T1, T2 and FLAIR volumes stacked as the three channels of
each slice, after dropping the top and bottom slices without brain (135 slices kept). A
:class:`SliceView` states which slices of a grid are used and how: the voxel axis cut across,
the kept voxel indices along it (the same for every session, so slice ``k`` is the same place
in every subject), and an optional in-plane size the slices are resized to.

:meth:`SliceView.to_slices` turns volumes ``(N, C, X, Y, Z)`` into slices ``(N * S, C, H, W)``
(session-major: the ``S`` kept slices of session 0, then of session 1, ...); the in-plane axes
keep their order (cutting axis 2 of an ``(X, Y, Z)`` volume gives ``(X, Y)`` slices).
:meth:`SliceView.to_volume` is its inverse for maps: the slice maps of a session, resized back
to the volume's in-plane size, are put back on the voxels they came from, so a heatmap of slice
``k`` lands on slice ``k`` of the session's volume, with the volume's affine; slices that were
not kept are NaN (no evidence, rather than a false zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

__all__ = ["SLICE_AXES", "SliceAxis", "SliceView", "foreground_slices", "slice_axis_index"]

SliceAxis = Literal["axial", "coronal", "sagittal"]

#: World axes (RAS+ codes of :func:`nibabel.aff2axcodes`) each named slice orientation cuts
#: across: an axial slice is perpendicular to the inferior-superior axis.
SLICE_AXES: dict[str, tuple[str, str]] = {"axial": ("S", "I"), "coronal": ("A", "P"),
                                          "sagittal": ("R", "L")}


def slice_axis_index(axis: SliceAxis, affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) of a volume with ``affine`` that ``axis`` slices cut across:
    the one whose direction is closest to the named world axis (an oblique or permuted volume
    is handled by its affine, not by assuming RAS order)."""
    if axis not in SLICE_AXES:
        raise ValueError(f"unknown slice axis {axis!r}; choose one of {', '.join(SLICE_AXES)}")
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return next(i for i, code in enumerate(codes) if code in SLICE_AXES[axis])


def foreground_slices(mean_image: np.ndarray, axis: int, min_fraction: float = 0.05,
                      level: float = 0.1) -> list[int]:
    """The contiguous range of slices across ``axis`` of ``mean_image`` ``(X, Y, Z)`` that hold
    brain: from the first to the last slice in which at least ``min_fraction`` of the voxels
    exceed ``level`` times the image's maximum (paper 2 drops "the top and bottom slices without
    brain"; slices between two kept ones are kept, so the range has no holes).

    Raises:
        ValueError: no slice qualifies (an empty or constant image).
    """
    image = np.nan_to_num(np.asarray(mean_image, dtype=np.float64))
    peak = image.max()
    if not peak > 0:
        raise ValueError("the mean image has no positive voxel: no slice holds brain")
    moved = np.moveaxis(image > level * peak, axis, 0)
    fraction = moved.reshape(moved.shape[0], -1).mean(1)
    kept = np.flatnonzero(fraction >= min_fraction)
    if kept.size == 0:
        raise ValueError(f"no slice across axis {axis} has {min_fraction:.0%} of its voxels above "
                         f"{level:.0%} of the maximum; lower the threshold or give a slice range")
    return list(range(int(kept[0]), int(kept[-1]) + 1))


@dataclass(frozen=True)
class SliceView:
    """Which slices of a volume grid a 2D model reads.

    Attributes:
        axis: the voxel axis cut across (0, 1 or 2 of the spatial axes).
        indices: the kept voxel indices along ``axis``, in increasing order.
        volume_shape: the spatial shape ``(X, Y, Z)`` of the volumes.
        size: the in-plane size ``(H, W)`` slices are resized to, or None (kept as they are).
    """

    axis: int
    indices: tuple[int, ...]
    volume_shape: tuple[int, int, int]
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.volume_shape) != 3:
            raise ValueError(f"slices are cut from 3D volumes, got a grid {self.volume_shape}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {self.axis}")
        extent = self.volume_shape[self.axis]
        if not self.indices or list(self.indices) != sorted(set(self.indices)) or \
                self.indices[0] < 0 or self.indices[-1] >= extent:
            raise ValueError(f"slice indices must be increasing and within 0..{extent - 1}, got "
                             f"{_compact(self.indices)}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"slice size must be two positive numbers, got {self.size}")

    @property
    def plane_shape(self) -> tuple[int, int]:
        """The in-plane shape of a slice of the volume, before resizing."""
        shape = [n for i, n in enumerate(self.volume_shape) if i != self.axis]
        return shape[0], shape[1]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the slices the model reads."""
        return self.size or self.plane_shape

    @property
    def n_slices(self) -> int:
        return len(self.indices)

    def to_slices(self, volumes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Slices ``(N * S, C, H, W)`` float32 of volumes ``(N, C, X, Y, Z)``, session-major."""
        x = torch.as_tensor(np.asarray(volumes) if not torch.is_tensor(volumes) else volumes,
                            dtype=torch.float32)
        if x.ndim != 5 or tuple(x.shape[2:]) != tuple(self.volume_shape):
            raise ValueError(f"expected volumes (N, C, {', '.join(map(str, self.volume_shape))}),"
                             f" got {tuple(x.shape)}")
        n, channels = x.shape[:2]
        picked = x.index_select(2 + self.axis, torch.as_tensor(self.indices))
        slices = picked.movedim(2 + self.axis, 1).reshape(n * self.n_slices, channels,
                                                          *self.plane_shape)
        return self._resize(slices, self.slice_shape).contiguous()

    def to_volume(self, maps: np.ndarray | torch.Tensor) -> np.ndarray:
        """Volumes ``(N, X, Y, Z)`` float32 of slice maps ``(N * S, H, W)`` (session-major, as
        :meth:`to_slices` gives them): each map resized back to the volume's in-plane size and
        put on the slice it came from; slices that were not kept are NaN."""
        m = torch.as_tensor(np.asarray(maps) if not torch.is_tensor(maps) else maps,
                            dtype=torch.float32).detach().cpu()
        if m.ndim != 3 or m.shape[0] % self.n_slices or tuple(m.shape[1:]) != self.slice_shape:
            raise ValueError(f"expected slice maps (N x {self.n_slices}, "
                             f"{', '.join(map(str, self.slice_shape))}), got {tuple(m.shape)}")
        n = m.shape[0] // self.n_slices
        planes = self._resize(m[:, None], self.plane_shape)[:, 0]
        out = torch.full((n, *self.volume_shape), float("nan"))
        moved = out.movedim(1 + self.axis, 1)  # a view: writing it fills ``out``
        moved[:, torch.as_tensor(self.indices)] = planes.reshape(n, self.n_slices,
                                                                  *self.plane_shape)
        return out.numpy()

    def record(self) -> dict[str, Any]:
        """JSON-ready description (``grid.json``'s ``slices``)."""
        return {"axis": self.axis, "indices": list(self.indices),
                "volume_shape": list(self.volume_shape),
                "size": None if self.size is None else list(self.size)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SliceView:
        size = record.get("size")
        return cls(int(record["axis"]), tuple(int(i) for i in record["indices"]),
                   tuple(int(n) for n in record["volume_shape"]),  # type: ignore[arg-type]
                   None if size is None else (int(size[0]), int(size[1])))

    @staticmethod
    def _resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(images.shape[2:]) == tuple(size):
            return images
        shrinking = any(s < n for s, n in zip(size, images.shape[2:]))
        return torch.nn.functional.interpolate(images, size=tuple(size), mode="bilinear",
                                               align_corners=False, antialias=shrinking)


def _compact(indices: Sequence[int]) -> str:
    values = list(indices)
    return str(values) if len(values) <= 6 else f"[{values[0]}, ..., {values[-1]}] ({len(values)})"
