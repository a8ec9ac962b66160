"""Similarity of two maps (paper 1, 2.4): prob_CNN, ROI-based cosine, rank correlation.

**prob_CNN.** The softmax probability of the target (true) class given by model A to images
masked (eq. 1, :func:`~voxplain.explain.perturbation.perturb`) by a mask optimised in another
context B, averaged over the images. Close to 1: A is not perturbed by B's mask, the two
contexts are dissimilar; close to 0: B's mask hides what A relies on. The paper compares two
contexts through it without saying which model sees which mask; :func:`symmetric_prob_cnn`
averages the two cross terms, ``(prob(A | mask B) + prob(B | mask A)) / 2``, so that the value
does not depend on the order of the pair.

**ROI vectors.** Per region of an atlas (AAL2: 120 regions):

- ``kind="mask"``: the density of ``1 - m``, i.e. the mean of ``1 - m`` over the region's
  voxels: 0 where the mask leaves the region untouched, 1 where it replaces all of it. (Paper 1
  writes "1 minus the sum of the values in the ROI" and calls it a density; the sum would make
  large regions dominate the cosine by their size alone, so the mean, which is a density, is
  used.)
- ``kind="attribution"``: the region mean of the map after a per-map normalisation:
  ``absolute=True`` (default, for unsigned comparisons) takes ``|a|`` first; ``normalise="max"``
  (default) divides by the largest ``|a|`` over the atlas's labelled voxels, so the vector lies
  in [0, 1] (or [-1, 1] when signed) and does not depend on the method's scale. ``"sum"``
  divides by the sum of ``|a|`` over labelled voxels (a share of relevance mass), ``"minmax"``
  maps the labelled voxels to [0, 1], ``"none"`` keeps the values. A positive scale does not
  change a cosine; ``"minmax"`` shifts values and does.

The ROI similarity of two maps is the cosine of their ROI vectors: 1 = same densities up to a
factor, 0 = no region in common. A region that has no voxel on the grid (lost by resampling) is
NaN in a vector and left out of the cosine; a vector of zeros (a mask that hides nothing) has no
direction and its cosines are NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from voxplain.config import MaskConfig
from voxplain.data.atlas import Atlas
from voxplain.data import regions
from voxplain.explain.masks import make_reference
from voxplain.explain.perturbation import perturb, target_probability

Kind = Literal["mask", "attribution"]
Normalisation = Literal["max", "sum", "minmax", "none"]
Perturbation = float | MaskConfig | Callable[[torch.Tensor], torch.Tensor]


def roi_vectors(maps: np.ndarray, atlas: Atlas, kind: Kind = "mask", *,
                absolute: bool = True, normalise: Normalisation = "max") -> np.ndarray:
    """ROI vectors ``(M, R)`` of ``maps`` ``(M, *grid)`` (a channel axis of 1 is allowed).

    Regions in atlas label order (``atlas.region_names``). See the module docstring for the
    two kinds and the normalisations.

    Raises:
        ValueError: the maps are not on the atlas grid, a mask leaves [0, 1], an unknown kind.
    """
    maps = _stack(maps, atlas)
    if kind == "mask":
        low, high = float(maps.min(initial=0.0)), float(maps.max(initial=1.0))
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(f"a mask takes values in [0, 1]; found values in [{low:.3g}, "
                             f"{high:.3g}] (use kind='attribution' for other maps)")
        return 1.0 - regions.region_means_batch(maps, atlas)
    if kind != "attribution":
        raise ValueError(f"kind must be 'mask' or 'attribution', got {kind!r}")
    values = np.abs(maps) if absolute else maps
    offset, scale = _normalisation(values, atlas, normalise)
    # region means are linear: normalising the means equals averaging the normalised map
    return (regions.region_means_batch(values, atlas) - offset[:, None]) / scale[:, None]


def roi_vector(map_: np.ndarray, atlas: Atlas, kind: Kind = "mask", **options) -> np.ndarray:
    """ROI vector ``(R,)`` of one map on the atlas grid (see :func:`roi_vectors`)."""
    return roi_vectors(np.asarray(map_)[None], atlas, kind, **options)[0]


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(M, M)`` cosine similarities of the rows of ``vectors`` ``(M, R)``.

    NaN entries (regions absent from the grid) count as 0; a zero row gives NaN cosines.
    """
    unit = _unit_rows(np.nan_to_num(np.asarray(vectors, dtype=np.float64), nan=0.0))
    return np.clip(unit @ unit.T, -1.0, 1.0)


def roi_cosine_similarity(a: np.ndarray, b: np.ndarray, atlas: Atlas, kind: Kind = "mask",
                          **options) -> float:
    """Paper 1's ROI-based similarity of two maps: cosine of their ROI vectors."""
    return float(cosine_matrix(roi_vectors(np.stack([np.asarray(a), np.asarray(b)]), atlas,
                                           kind, **options))[0, 1])


def rank_correlation(a: np.ndarray, b: np.ndarray,
                     brain: np.ndarray | Atlas | None = None) -> float:
    """Spearman correlation of two maps over the brain voxels (all voxels when ``brain`` is None;
    an :class:`Atlas` means its labelled voxels). Ties get their average rank.

    A constant map has no ranks: the pair counts 1 when both maps are constant (nothing
    differs) and 0 when only one is (a map that went flat kept nothing of the other), the
    convention of the model-randomisation test (:mod:`voxplain.evaluate.sanity`).
    :func:`rank_correlation_matrix` leaves such pairs NaN for the caller to decide.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    rho = float(rank_correlation_matrix(np.stack([a, b]), brain)[0, 1])
    if np.isnan(rho):
        inside = _brain_voxels(np.stack([a, b]), brain)
        constant_a, constant_b = (np.ptp(row) == 0 for row in inside)
        return float(constant_a and constant_b)
    return rho


def rank_correlation_matrix(maps: np.ndarray,
                            brain: np.ndarray | Atlas | None = None) -> np.ndarray:
    """``(M, M)`` Spearman correlations of ``maps`` ``(M, *spatial)`` over the brain voxels: each
    map is ranked once (average ranks for ties); a constant map gives NaN."""
    ranks = rankdata(_brain_voxels(maps, brain), axis=1)
    unit = _unit_rows(ranks - ranks.mean(axis=1, keepdims=True))
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _brain_voxels(maps: np.ndarray, brain: np.ndarray | Atlas | None) -> np.ndarray:
    """``(M, V)``: the values of ``maps`` ``(M, *spatial)`` at the brain voxels."""
    maps = np.asarray(maps)
    flat = maps.reshape(len(maps), -1)
    if brain is None:
        return flat
    inside = brain.labels > 0 if isinstance(brain, Atlas) else np.asarray(brain, dtype=bool)
    if inside.shape != maps.shape[1:]:
        raise ValueError(f"brain mask shape {inside.shape} differs from the maps' "
                         f"{maps.shape[1:]}")
    return flat[:, inside.ravel()]


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their norm; a zero row (no direction) becomes NaN."""
    norms = np.linalg.norm(rows, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = rows / norms[:, None]
    unit[norms == 0] = np.nan
    return unit


@torch.no_grad()
def masked_probabilities(model: nn.Module, mask: np.ndarray | torch.Tensor,
                         images: np.ndarray | torch.Tensor, target: int | np.ndarray = 1, *,
                         perturbation: Perturbation = 1.0, voxel_size: tuple[float, ...] = (),
                         mean_image: torch.Tensor | None = None, batch_size: int = 8,
                         device: str | torch.device = "cpu") -> np.ndarray:
    """``(N,)`` probability of ``target`` given by ``model`` to each image masked by ``mask``.

    Args:
        model: classifier returning logits; evaluated in eval mode.
        mask: ``spatial``, ``(1, *spatial)`` or ``(1, 1, *spatial)`` values in [0, 1].
        images: ``(N, C, *spatial)``.
        target: one class index for all images or ``(N,)`` per image (the true classes).
        perturbation: ``mu`` of eq. 1: a constant (1.0: restore grey matter), a
            :class:`~voxplain.config.MaskConfig` (read by
            :func:`~voxplain.explain.masks.make_reference`, with ``voxel_size`` / ``mean_image``),
            or a function of the images batch.
        batch_size: images per forward pass.
    """
    images = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images,
                             dtype=torch.float32)
    spatial = tuple(images.shape[2:])
    mask = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask,
                           dtype=torch.float32)
    if tuple(mask.shape[-len(spatial):]) != spatial or mask.numel() != int(np.prod(spatial)):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the images' spatial "
                         f"shape {spatial}")
    reference = _reference(perturbation, voxel_size, mean_image)
    targets = torch.as_tensor(np.broadcast_to(np.asarray(target), (len(images),)).copy(),
                              dtype=torch.int64)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    mask = mask.reshape(1, 1, *spatial).to(device)
    probabilities = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            masked = perturb(batch, mask, reference(batch))
            probabilities.append(target_probability(model, masked,
                                                    targets[start:start + batch_size].to(device)))
    finally:
        model.train(was_training)
    return torch.cat(probabilities).cpu().numpy().astype(np.float64)


def prob_cnn(model: nn.Module, mask: np.ndarray | torch.Tensor, images: np.ndarray | torch.Tensor,
             target: int | np.ndarray = 1, **options) -> float:
    """Paper 1's prob_CNN: mean probability of ``target`` given by ``model`` to ``images`` masked
    by ``mask`` (optimised in another context). Options of :func:`masked_probabilities`."""
    return float(masked_probabilities(model, mask, images, target, **options).mean())


def symmetric_prob_cnn(model_a: nn.Module, mask_a: np.ndarray | torch.Tensor,
                       model_b: nn.Module, mask_b: np.ndarray | torch.Tensor,
                       images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor,
                       target_a: int | np.ndarray = 1, target_b: int | np.ndarray | None = None,
                       **options) -> float:
    """prob_CNN of a pair of contexts: ``(prob_cnn(A, mask B, images A) + prob_cnn(B, mask A,
    images B)) / 2``. Each model sees its own context's images (e.g. its validation patients)
    with the other context's mask. ``target_b`` defaults to ``target_a``."""
    target_b = target_a if target_b is None else target_b
    return 0.5 * (prob_cnn(model_a, mask_b, images_a, target_a, **options)
                  + prob_cnn(model_b, mask_a, images_b, target_b, **options))


def _reference(perturbation: Perturbation, voxel_size: tuple[float, ...],
               mean_image: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(perturbation, MaskConfig):
        return make_reference(perturbation, voxel_size, mean_image)
    if callable(perturbation):
        return perturbation
    value = float(perturbation)
    return lambda images: images.new_tensor(value)


def _stack(maps: np.ndarray, atlas: Atlas) -> np.ndarray:
    maps = np.asarray(maps)
    grid = atlas.labels.shape
    if maps.ndim == len(grid) + 2 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape[1:] != grid:
        raise ValueError(f"maps of shape {maps.shape} are not (M, *{grid}), the "
                         f"{atlas.title} grid")
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps hold NaN or infinite values")
    return maps


def _normalisation(values: np.ndarray, atlas: Atlas,
                   normalise: Normalisation) -> tuple[np.ndarray, np.ndarray]:
    """Per-map ``(offset, scale)`` ``(M,)`` of the normalisation over the labelled voxels."""
    zero = np.zeros(len(values))
    if normalise == "none":
        return zero, np.ones(len(values))
    labelled = values.reshape(len(values), -1)[:, atlas.labels.ravel() > 0]
    if normalise == "max":
        offset, scale = zero, np.abs(labelled).max(axis=1, initial=0.0)
    elif normalise == "sum":
        offset, scale = zero, np.abs(labelled).sum(axis=1, dtype=np.float64)
    elif normalise == "minmax":
        offset = labelled.min(axis=1, initial=np.inf).astype(np.float64)
        scale = labelled.max(axis=1, initial=-np.inf) - offset
    else:
        raise ValueError(f"normalise must be max, sum, minmax or none, got {normalise!r}")
    return offset, np.where(scale > 0, scale, 1.0)
