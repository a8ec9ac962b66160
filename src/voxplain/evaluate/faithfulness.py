"""Faithfulness of an attribution map: deletion and insertion curves (Petsiuk et al. 2018, RISE).

Voxels are ranked by attribution, highest first (``absolute=True``: by ``|a|``; ties keep
voxel order). For ``k = 0 .. S`` with ``S = ceil(1 / step)``, the ``n_k = min(round(k step V),
V)`` highest-ranked voxels of the ``V`` voxels considered (all, or those of ``brain``):

- **deletion**: are replaced by the baseline in the image; a faithful map makes the target
  probability fall fast (low area under the curve);
- **insertion**: are restored into the baseline image (every other voxel holds the baseline); a
  faithful map makes the probability rise fast (high area).

A voxel is a spatial position: all channels of it change together. The baseline is a constant
(0: remove signal; 1: restore grey matter, the mask perturbation of paper 1), an image
``(N or 1, C, *spatial)`` or a function of the images (e.g. a blur, as
:func:`~voxplain.explain.masks.make_reference` returns). The x axis of a curve is the fraction
``n_k / V`` of voxels changed; the area is the trapezoid rule over it.

Choose the baseline for the data: on grey-matter probability maps a baseline of 0 *imitates
atrophy*, so deleting voxels can raise the patient probability instead of lowering it; use 1
(restored grey matter, paper 1's ``mu``) there. On the demo run (fold 0, its 8 AD validation
images, ranking = ``1 - group mask``, step 0.05) the deletion area was 0.28 with baseline 1 vs
0.50 for a random ranking, while with baseline 0 both stayed above 0.9.

The ``N x (S + 1)`` perturbed images are built on the fly and classified ``max_batch`` at a
time (copies of several images share a forward pass). Beyond the images and the model, memory
holds one int32 rank per voxel and image and ``max_batch`` perturbed copies. 2D and 3D share one
code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from voxplain.explain.perturbation import target_probability

Baseline = float | torch.Tensor | np.ndarray | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Curves of ``N`` images.

    Attributes:
        fractions: ``(S + 1,)`` fraction of the considered voxels changed, from 0 to 1.
        probabilities: ``(N, S + 1)`` softmax probability of each image's target class.
        mode: ``"deletion"`` or ``"insertion"``.
    """

    fractions: np.ndarray
    probabilities: np.ndarray
    mode: str

    @property
    def auc(self) -> np.ndarray:
        """``(N,)`` area under each curve (:func:`area_under_curve`)."""
        return area_under_curve(self.fractions, self.probabilities)


def area_under_curve(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoid-rule area of ``values`` ``(..., S + 1)`` over ``fractions`` ``(S + 1,)``."""
    fractions, values = np.asarray(fractions, np.float64), np.asarray(values, np.float64)
    widths = np.diff(fractions)
    return ((values[..., 1:] + values[..., :-1]) / 2 * widths).sum(axis=-1)


def deletion_curve(model: nn.Module, images: torch.Tensor | np.ndarray,
                   attributions: torch.Tensor | np.ndarray, target: int | np.ndarray, **options
                   ) -> FaithfulnessCurves:
    """Deletion curves of ``images`` ``(N, C, *spatial)`` ranked by ``attributions``
    (``(N, 1, *spatial)`` or ``(N, *spatial)``); options of :func:`faithfulness_curves`."""
    return faithfulness_curves(model, images, attributions, target, "deletion", **options)


def insertion_curve(model: nn.Module, images: torch.Tensor | np.ndarray,
                    attributions: torch.Tensor | np.ndarray, target: int | np.ndarray, **options
                    ) -> FaithfulnessCurves:
    """Insertion curves; arguments as :func:`deletion_curve`."""
    return faithfulness_curves(model, images, attributions, target, "insertion", **options)


@torch.no_grad()
def faithfulness_curves(model: nn.Module, images: torch.Tensor | np.ndarray,
                        attributions: torch.Tensor | np.ndarray, target: int | np.ndarray,
                        mode: Literal["deletion", "insertion"] = "deletion", *,
                        step: float = 0.05, baseline: Baseline = 0.0,
                        brain: np.ndarray | torch.Tensor | None = None, absolute: bool = False,
                        max_batch: int = 16, device: str | torch.device = "cpu"
                        ) -> FaithfulnessCurves:
    """Deletion or insertion curves (see the module docstring).

    Args:
        model: classifier returning logits; evaluated in eval mode.
        images: ``(N, C, *spatial)``.
        attributions: ``(N, 1, *spatial)`` or ``(N, *spatial)``: the ranking of the voxels.
        target: class whose probability is followed: one index or ``(N,)`` per image.
        mode: ``"deletion"`` or ``"insertion"``.
        step: fraction of the considered voxels changed per step (``0 < step <= 1``).
        baseline: value of removed voxels: constant, image or function of the images.
        brain: ``spatial`` boolean mask of the voxels to rank and change (default: all).
        absolute: rank by ``|attribution|``.
        max_batch: perturbed images per forward pass (bounds memory).
        device: where the model runs.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    device = torch.device(device)
    images = torch.as_tensor(images, dtype=torch.float32)
    spatial = tuple(images.shape[2:])
    ranks, considered = _ranks(attributions, images, brain, absolute)
    targets = torch.as_tensor(np.broadcast_to(np.asarray(target), (len(images),)).copy(),
                              dtype=torch.int64)
    base = _baseline(baseline, images)
    steps = math.ceil(round(1 / step, 9))
    counts = np.minimum(np.round(np.arange(steps + 1) * step * considered).astype(np.int64),
                        considered)
    counts[-1] = considered
    pairs = [(i, k) for i in range(len(images)) for k in range(steps + 1)]
    probabilities = np.empty((len(images), steps + 1))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), max_batch):
            chunk = np.array(pairs[start:start + max_batch])
            rows, columns = torch.as_tensor(chunk[:, 0]), chunk[:, 1]
            changed = (ranks[rows] < torch.as_tensor(counts[columns], dtype=torch.int32)[:, None])
            changed = changed.reshape(len(chunk), 1, *spatial)
            original = images[rows]
            replaced = base[rows] if base.shape[0] > 1 else base.expand_as(original)
            perturbed = (torch.where(changed, replaced, original) if mode == "deletion"
                         else torch.where(changed, original, replaced))
            values = target_probability(model, perturbed.to(device), targets[rows].to(device))
            probabilities[chunk[:, 0], columns] = values.double().cpu().numpy()
    finally:
        model.train(was_training)
    return FaithfulnessCurves(counts / considered, probabilities, mode)


def _ranks(attributions: torch.Tensor | np.ndarray, images: torch.Tensor,
           brain: np.ndarray | torch.Tensor | None, absolute: bool) -> tuple[torch.Tensor, int]:
    """``(N, V)`` int32 rank of every voxel (0 = highest attribution; voxels outside ``brain``
    rank last) and the number of voxels considered."""
    scores = torch.as_tensor(attributions, dtype=torch.float32)
    spatial = tuple(images.shape[2:])
    if scores.ndim == images.ndim and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (len(images), *spatial):
        raise ValueError(f"attributions of shape {tuple(attributions.shape)} do not match images "
                         f"{tuple(images.shape)}: expected (N, 1, *spatial) or (N, *spatial)")
    if not torch.isfinite(scores).all():
        raise ValueError("attributions hold NaN or infinite values")
    scores = scores.abs() if absolute else scores
    scores = scores.reshape(len(images), -1)
    considered = scores.shape[1]
    if brain is not None:
        inside = torch.as_tensor(np.array(brain, dtype=bool))
        if tuple(inside.shape) != spatial:
            raise ValueError(f"brain mask shape {tuple(inside.shape)} differs from the images' "
                             f"{spatial}")
        considered = int(inside.sum())
        if considered == 0:
            raise ValueError("the brain mask holds no voxel")
        scores = torch.where(inside.reshape(1, -1), scores, torch.tensor(-torch.inf))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    ranks.scatter_(1, order, torch.arange(order.shape[1], dtype=torch.int32).expand_as(order))
    return ranks, considered


def _baseline(baseline: Baseline, images: torch.Tensor) -> torch.Tensor:
    """The baseline as ``(N or 1, C, *spatial)``-broadcastable tensor."""
    if callable(baseline):
        value = baseline(images)
    elif isinstance(baseline, (torch.Tensor, np.ndarray)):
        value = torch.as_tensor(baseline, dtype=torch.float32)
    else:
        value = torch.tensor(float(baseline))
    value = value.to(torch.float32)
    if value.ndim == 0:
        return value.reshape(1, *[1] * (images.ndim - 1))
    try:
        torch.broadcast_shapes(value.shape, images.shape)
    except RuntimeError as error:
        raise ValueError(f"baseline of shape {tuple(value.shape)} does not broadcast to the "
                         f"images {tuple(images.shape)}") from error
    if value.ndim != images.ndim or value.shape[0] not in (1, len(images)):
        raise ValueError(f"baseline of shape {tuple(value.shape)}: expected (N or 1, C, "
                         f"*spatial) for images {tuple(images.shape)}")
    return value
