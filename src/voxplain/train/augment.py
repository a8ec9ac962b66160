"""Random symmetries of the training images (data augmentation), 2D and 3D.

- ``none``: images are used as they are (the default: brain volumes registered to a template
  are not symmetric under flips, and paper 1 trains without augmentation).
- ``flip``: every spatial axis of every image is mirrored with probability 1/2, independently.
- ``dihedral``: ``flip``, then the spatial axes of equal size are permuted at random (uniform over
  the permutations). For a square 2D image this draws uniformly from its 8 symmetries (the
  dihedral group D4: rotations by multiples of 90 degrees and reflections); it suits images with
  no preferred orientation, such as lesion patches (paper 3's LIDC nodules).

Draws come from a generator the caller seeds (the trainer seeds one per fold, run and epoch), so
training with augmentation is reproducible and resumes with the same draws.
"""

from __future__ import annotations

from itertools import permutations
from typing import get_args

import numpy as np
import torch

from voxplain.config import Augmentation

AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)


def augment(images: torch.Tensor, kind: Augmentation, rng: np.random.Generator) -> torch.Tensor:
    """``images`` ``(N, C, *spatial)`` with a random symmetry of ``kind`` applied to each image.

    Raises:
        ValueError: ``kind`` is not one of :data:`AUGMENTATIONS`.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return images
    spatial = tuple(range(1, images.ndim - 1))  # axes of one image (C, *spatial)
    orders = _axis_orders(images.shape[2:]) if kind == "dihedral" else [spatial]
    out = torch.empty_like(images)
    for index, image in enumerate(images):
        flipped = [axis for axis in spatial if rng.random() < 0.5]
        image = image.flip(flipped) if flipped else image
        out[index] = image.permute(0, *orders[rng.integers(len(orders))])
    return out


def _axis_orders(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every order of an image's spatial axes (numbered from 1, after the channel axis) that
    moves axes only among axes of equal size."""
    axes = range(1, 1 + len(shape))
    return [order for order in permutations(axes)
            if all(shape[a - 1] == shape[b - 1] for a, b in zip(order, axes))]
