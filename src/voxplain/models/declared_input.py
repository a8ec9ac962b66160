"""The input an imported network declares, applied inside the model (issue 20).

A network trained elsewhere expects its own input: images cropped or padded to its input size,
intensities normalised per image, and it may end in one logit (a sigmoid) where every voxplain
step reads one logit per class. :class:`DeclaredInput` wraps the network so that it takes the
cohort's images as they are, on the cohort's grid, and returns one logit per class:

1. **size** (``size``): each spatial axis is cropped or zero-padded, centred, to the network's
   input size: an axis of ``n`` voxels padded to ``s > n`` gets ``(s - n) // 2`` zeros before and
   the rest after; cropped to ``s < n`` it keeps voxels ``(n - s) // 2`` to ``(n - s) // 2 + s``
   (zero is the background of grey-matter maps and skull-stripped images);
2. **normalisation** (``normalisation``), per image and channel over the spatial axes, after
   the crop or pad: ``zscore`` ``(x - mean) / std`` (std floored at :data:`MIN_SCALE`), ``minmax``
   ``(x - min) / (max - min)`` (range floored alike), ``none``;
3. **output**: a network with one output ``z`` (``single_logit``) returns the two logits
   ``(-z / 2, z / 2)``, whose softmax is ``(1 - sigmoid(z), sigmoid(z))``: the probabilities the
   network means, and a logit per class with a gradient for each (the control's is ``-z / 2``,
   the evidence against the patient class).

Because the steps happen inside ``forward``, every gradient, perturbation and mask is taken with
respect to the cohort's image, so every map lands on the cohort's grid with its affine. The
class activation maps read a layer that sees the network's frame, not the cohort's:
:meth:`DeclaredInput.frame_to_input` puts a map of that frame back on the input grid (the
inverse crop or pad). The declaration is recorded as ``preprocessing`` in ``model.json``
(:meth:`Preprocessing.record`); the weights file holds the network's own tensors, so the names of
its layers gain the prefix ``network.``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Preprocessing", "DeclaredInput", "declared_input", "crop_or_pad", "normalise",
           "NORMALISATIONS", "MIN_SCALE"]

#: Intensity normalisations a model may declare.
NORMALISATIONS = ("none", "zscore", "minmax")
#: Floor of the standard deviation (zscore) and range (minmax) of a constant image.
MIN_SCALE = 1e-6


@dataclass(frozen=True)
class Preprocessing:
    """What a network expects of its input (module docstring)."""

    normalisation: str = "none"
    size: tuple[int, ...] | None = None
    single_logit: bool = False

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; choose one of "
                             f"{', '.join(NORMALISATIONS)}")
        if self.size is not None and (not self.size or min(self.size) < 1):
            raise ValueError(f"input size must be positive voxels per axis, got {self.size}")

    @property
    def is_identity(self) -> bool:
        """Nothing to do: the network reads the images as they are and has a logit per class."""
        return self.normalisation == "none" and self.size is None and not self.single_logit

    def record(self) -> dict[str, Any]:
        """The ``preprocessing`` entry of ``model.json``."""
        return {"normalisation": self.normalisation,
                "size": None if self.size is None else list(self.size),
                "single_logit": self.single_logit}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Preprocessing:
        """From ``model.json``'s ``preprocessing`` (None: nothing declared)."""
        if not record:
            return cls()
        size = record.get("size")
        return cls(str(record.get("normalisation", "none")),
                   None if size is None else tuple(int(n) for n in size),
                   bool(record.get("single_logit", False)))


def crop_or_pad(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(N, C, *spatial)`` centred-cropped or zero-padded to ``(N, C, *size)``."""
    if len(size) != x.ndim - 2:
        raise ValueError(f"input size {tuple(size)} has {len(size)} axes; the images "
                         f"{tuple(x.shape)} have {x.ndim - 2} spatial axes")
    for axis, target in enumerate(size, start=2):
        current = x.shape[axis]
        if current > target:
            x = x.narrow(axis, (current - target) // 2, target)
        elif current < target:
            before = (target - current) // 2
            pad = [0, 0] * (x.ndim - 2)
            position = 2 * (x.ndim - 1 - axis)  # F.pad lists the last axis first
            pad[position:position + 2] = [before, target - current - before]
            x = F.pad(x, pad)
    return x


def normalise(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` ``(N, C, *spatial)`` normalised per image and channel (module docstring)."""
    if how == "none":
        return x
    spatial = tuple(range(2, x.ndim))
    if how == "zscore":
        mean = x.mean(spatial, keepdim=True)
        scale = x.std(spatial, keepdim=True, correction=0).clamp_min(MIN_SCALE)
        return (x - mean) / scale
    if how == "minmax":
        low = x.amin(spatial, keepdim=True)
        return (x - low) / (x.amax(spatial, keepdim=True) - low).clamp_min(MIN_SCALE)
    raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")


class DeclaredInput(nn.Module):
    """``network`` behind its declared :class:`Preprocessing` (module docstring)."""

    def __init__(self, network: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.network = network
        self.preprocessing = preprocessing
        if getattr(network, "voxplain_program", None) is not None:  # still a program inside
            self.voxplain_program = network.voxplain_program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocessing.size is not None:
            x = crop_or_pad(x, self.preprocessing.size)
        output = self.network(normalise(x, self.preprocessing.normalisation))
        if self.preprocessing.single_logit:
            if output.ndim != 2 or output.shape[1] != 1:
                raise ValueError(f"declared single_logit, but the network returns "
                                 f"{tuple(output.shape)}")
            output = torch.cat([-output / 2, output / 2], dim=1)
        return output

    def frame_to_input(self, maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Maps ``(n, 1, *size)`` on the network's frame back on the input grid ``shape``: the
        inverse of the crop or pad (what was cropped away gets 0)."""
        return crop_or_pad(maps, tuple(shape))


def declared_input(network: nn.Module, preprocessing: Preprocessing) -> nn.Module:
    """``network`` wrapped in :class:`DeclaredInput`, or itself when nothing is declared."""
    return network if preprocessing.is_identity else DeclaredInput(network, preprocessing)
