"""Optimisation of meaningful-perturbation masks at session and group level (paper 1, 2.3.3-2.3.5).

- :func:`optimise_session_masks`: one mask per image, many images as one batch; l1 and l2
  multiplied by 100; each mask stops on its own (relative tolerance 0.01, patience 200, at most
  5000 iterations) and keeps its lowest-loss value.
- :func:`optimise_group_mask`: one mask for a set of images, mini-batches over them each epoch;
  early stopping on the loss of a validation set (relative tolerance 0.05, patience 5, at most
  150 epochs), best mask by validation loss; resumable from a per-epoch checkpoint; the loss of
  every image each time it is used is recorded for quality-check step 2 (:func:`qc_flags`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import median_abs_deviation
from torch import nn

from voxplain.config import GroupMaskConfig, MaskConfig, SessionMaskConfig
from voxplain.models.folding import fold_batch_norm
from voxplain.models.layout import for_batches
from voxplain.explain.perturbation import (MaskWeights, EarlyStopping, gaussian_blur,
                                           mask_loss, perturb, target_probability,
                                           threshold_mask)
from voxplain.models.checkpoint import (load_state, optimizer_tensors,
                                       restore_optimizer, save_state)

Progress = Callable[[int, int], None]
Reference = Callable[[torch.Tensor], torch.Tensor]


def make_reference(config: MaskConfig, voxel_size: tuple[float, ...] = (),
                   mean_image: torch.Tensor | None = None) -> Reference:
    """The perturbation ``mu`` of eq. 1 as a function of the images ``(N, C, *spatial)``.

    ``constant``: ``config.constant`` everywhere (1: restore grey matter); ``blur``: each image
    blurred with a Gaussian of ``config.blur_mm`` mm (``voxel_size`` in mm per axis); ``mean``:
    ``mean_image`` ``(1, C, *spatial)``, e.g. the mean control image.
    """
    if config.perturbation == "constant":  # a 0-d tensor: broadcast, never materialised
        return lambda images: images.new_tensor(config.constant)
    if config.perturbation == "blur":
        if not voxel_size:
            raise ValueError("the blur perturbation needs the voxel size in mm")
        sigma = tuple(config.blur_mm / size for size in voxel_size)
        return lambda images: gaussian_blur(images, sigma)
    if mean_image is None:
        raise ValueError("the mean perturbation needs a mean image")
    return lambda images: mean_image.to(images.device).expand_as(images)


def weights_of(config: MaskConfig, factor: float = 1.0) -> MaskWeights:
    """Eq. 2 coefficients; session masks multiply l1 and l2 by ``factor`` (paper: 100)."""
    return MaskWeights(config.l1 * factor, config.l2 * factor, config.b1, config.b2,
                       config.epsilon, config.smoothness)


@dataclass(frozen=True)
class SessionMasks:
    """Result of :func:`optimise_session_masks` (``N`` images).

    Attributes:
        masks: ``(N, 1, *spatial)`` lowest-loss masks, thresholded.
        loss: ``(N,)`` lowest loss of each mask (before thresholding).
        iterations: ``(N,)`` iterations run before the mask stopped.
        probability_before: ``(N,)`` target probability of the unmasked image.
        probability_after: ``(N,)`` target probability of the image under its final mask.
    """

    masks: torch.Tensor
    loss: np.ndarray
    iterations: np.ndarray
    probability_before: np.ndarray
    probability_after: np.ndarray


def optimise_session_masks(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                           reference: Reference, config: SessionMaskConfig,
                           progress: Progress | None = None) -> SessionMasks:
    """One mask per image (paper 1, 2.3.4), ``config.batch_size`` images optimised together.

    Args:
        model: classifier, run in eval mode (it is not changed: the masks use a copy with
            batch-norm folded into the convolutions, channels-last for batches on the CPU: the
            same function at a lower cost).
        images: ``(N, C, *spatial)`` on the model's device.
        targets: ``(N,)`` class whose probability each mask minimises.
    """
    # batch-norm folded (a copy), channels-last for batches on the CPU (about 2x, see
    # voxplain.models.layout); Adam below is fused: one pass over the masks per step
    model = for_batches(fold_batch_norm(model), images.ndim - 2,
                        min(config.batch_size, len(images)), images.device)
    parts = []
    for start in range(0, len(images), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        parts.append(_optimise_batch(model, images[chunk], targets[chunk], reference, config))
        if progress:
            progress(min(start + config.batch_size, len(images)), len(images))
    masks = torch.cat([p[0] for p in parts])
    loss, iterations = (np.concatenate([p[i] for p in parts]) for i in (1, 2))
    with torch.no_grad():
        before = target_probability(model, images, targets).cpu().numpy()
        after = target_probability(model, perturb(images, masks, reference(images)),
                                   targets).cpu().numpy()
    return SessionMasks(masks, loss, iterations, before, after)


def _optimise_batch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                    reference: Reference, config: SessionMaskConfig) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Independent masks of one batch; a stopped mask is frozen at its best and leaves the batch."""
    size = len(images)
    weights = weights_of(config, config.regularisation_factor)
    mu = reference(images)
    mask = torch.ones((size, 1, *images.shape[2:]), dtype=images.dtype, device=images.device,
                      requires_grad=True)
    optimizer = torch.optim.Adam([mask], lr=config.learning_rate, fused=True)
    best = mask.detach().clone()
    best_loss = np.full(size, np.inf)
    iterations = np.zeros(size, dtype=np.int64)
    stopping = EarlyStopping(size, config.tolerance, config.patience)
    active = np.arange(size)
    for _ in range(config.max_iterations):
        # while every mask is active the batch is used as it is: no per-iteration copies
        rows = None if len(active) == size else torch.from_numpy(active).to(images.device)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = mask_loss(model, *_rows((images, mask, mu, targets), rows), weights)
        loss.sum().backward()
        losses = loss.detach().cpu().numpy()
        improved = torch.from_numpy(losses < best_loss[active]).to(images.device)
        improved_rows = improved.nonzero()[:, 0] if rows is None else rows[improved]
        best[improved_rows] = mask.detach()[improved_rows]
        best_loss[active] = np.minimum(best_loss[active], losses)
        iterations[active] += 1
        active = active[~stopping.step(losses, active)]
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
            frozen = np.setdiff1d(np.arange(size), active)
            if frozen.size:
                mask[frozen] = best[frozen]
        if not active.size:
            break
    return threshold_mask(best, config.threshold), best_loss, iterations


def _rows(tensors: tuple[torch.Tensor, ...], rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The ``rows`` of each batched tensor (0-d tensors, e.g. a constant ``mu``, stay as they are)."""
    if rows is None:
        return tensors
    return tuple(tensor if tensor.ndim == 0 else tensor[rows] for tensor in tensors)


@dataclass(frozen=True)
class GroupMask:
    """Result of :func:`optimise_group_mask`.

    Attributes:
        mask: ``(1, 1, *spatial)`` best mask (lowest validation loss), thresholded.
        history: per epoch: ``epoch``, ``train_loss``, ``validation_loss``, ``sparsity``,
            ``smoothness``, ``validation_probability`` (mean target probability).
        image_losses: ``image`` (row of the training images), ``epoch``, ``loss``: the loss of
            every image each time it was used.
        best_epoch: epoch of the kept mask.
    """

    mask: torch.Tensor
    history: pd.DataFrame
    image_losses: pd.DataFrame
    best_epoch: int


def optimise_group_mask(model: nn.Module, images: np.ndarray, targets: np.ndarray,
                        validation_images: np.ndarray | None, validation_targets: np.ndarray | None,
                        reference: Reference, config: GroupMaskConfig, device: torch.device,
                        checkpoint: Path | None = None, progress: Progress | None = None) -> GroupMask:
    """One mask for all ``images`` ``(N, C, *spatial)`` (paper 1, 2.3.3).

    Each epoch visits the images in a seeded random order, ``config.batch_size`` at a time; the
    mask is updated on the mean loss of the batch. Early stopping and the choice of the best mask
    use the validation loss (the mean training loss of the epoch when there is no validation set).
    With ``checkpoint`` (a folder) the state is saved after every epoch and resumed from there;
    the caller removes it (:func:`voxplain.models.checkpoint.remove_state`) once its own final
    files are written, so a kill in between resumes from the last epoch, not from the start.
    The model runs in eval mode with batch-norm folded into the convolutions (a copy; the same
    function at a lower cost).
    """
    model = fold_batch_norm(model)
    weights = weights_of(config)
    mask = torch.ones((1, 1, *images.shape[2:]), dtype=torch.from_numpy(images[:1]).dtype,
                      device=device, requires_grad=True)
    optimizer = torch.optim.Adam([mask], lr=config.learning_rate, fused=True)
    state = {"epoch": 0, "best_epoch": -1, "history": [], "image_losses": [],
             "lowest": float("inf"), "above_lowest": 0}
    best = mask.detach().clone()
    restored = load_state(checkpoint) if checkpoint else None
    if restored:
        tensors, state = restored
        with torch.no_grad():
            mask.copy_(tensors["mask"].to(device))
        best = tensors["best"].to(device)
        restore_optimizer(optimizer, tensors, state.pop("param_groups"))
    stopping = EarlyStopping(1, config.tolerance, config.patience)
    stopping.lowest[0], stopping.above_lowest[0] = state["lowest"], state["above_lowest"]
    while state["epoch"] < config.max_epochs and state["above_lowest"] < config.patience:
        epoch = state["epoch"]
        order = np.random.default_rng([config.seed, epoch]).permutation(len(images))
        train_losses = []
        for start in range(0, len(order), config.batch_size):
            rows = np.sort(order[start:start + config.batch_size])
            x, y = _tensors(images, targets, rows, device)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = mask_loss(model, x, mask, reference(x), y, weights)
            loss.mean().backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
            train_losses += loss.detach().cpu().tolist()
            state["image_losses"] += [[int(r), epoch, float(v)] for r, v in zip(rows, loss.tolist())]
        train_loss = float(np.mean(train_losses))
        has_validation = validation_images is not None and len(validation_images) > 0
        terms = (_evaluate(model, mask.detach(), validation_images, validation_targets, reference,
                           weights, config.batch_size, device) if has_validation else
                 {"loss": train_loss, "probability": float("nan"), "sparsity": float("nan"),
                  "smoothness": float("nan")})
        if terms["loss"] < state["lowest"]:
            best, state["best_epoch"] = mask.detach().clone(), epoch
        stopping.step(np.array([terms["loss"]]))
        state["lowest"] = float(stopping.lowest[0])
        state["above_lowest"] = int(stopping.above_lowest[0])
        state["history"].append({"epoch": epoch, "train_loss": train_loss,
                                 "validation_loss": terms["loss"],
                                 "sparsity": terms["sparsity"], "smoothness": terms["smoothness"],
                                 "validation_probability": terms["probability"]})
        state["epoch"] = epoch + 1
        if checkpoint:
            tensors, param_groups = optimizer_tensors(optimizer)
            save_state(checkpoint, {**tensors, "mask": mask, "best": best},
                       {**state, "param_groups": param_groups})
        if progress:
            progress(state["epoch"], config.max_epochs)
    return GroupMask(threshold_mask(best, config.threshold), pd.DataFrame(state["history"]),
                     pd.DataFrame(state["image_losses"], columns=["image", "epoch", "loss"]),
                     state["best_epoch"])


def _tensors(images: np.ndarray, targets: np.ndarray, rows: np.ndarray,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)
    return x, torch.from_numpy(np.asarray(targets)[rows]).to(device)


@torch.no_grad()
def _evaluate(model: nn.Module, mask: torch.Tensor, images: np.ndarray, targets: np.ndarray,
              reference: Reference, weights: MaskWeights, batch_size: int,
              device: torch.device) -> dict[str, float]:
    """Eq. 2 of a fixed mask averaged over ``images`` (the regularisers do not depend on them)."""
    probabilities, terms = [], {}
    for start in range(0, len(images), max(batch_size, 8)):
        rows = np.arange(start, min(start + max(batch_size, 8), len(images)))
        x, y = _tensors(images, targets, rows, device)
        _, terms = mask_loss(model, x, mask, reference(x), y, weights)
        probabilities.append(terms["probability"].cpu())
    probability = float(torch.cat(probabilities).mean())
    sparsity, smoothness = float(terms["sparsity"][0]), float(terms["smoothness"][0])
    loss = weights.l1 * sparsity + weights.l2 * smoothness + probability
    return {"loss": loss, "probability": probability, "sparsity": sparsity,
            "smoothness": smoothness}


def qc_flags(image_losses: pd.DataFrame, z_threshold: float = 3.5,
             min_excess: float = 0.1) -> pd.DataFrame:
    """Quality check step 2 (paper 1, 2.3.1): images that make the group-mask loss jump.

    Paper 1 removed one image among hundreds after training a group mask: "this session led to
    a significant increase of the loss" (its eyes had been segmented as grey matter). Each time
    an image is used, its loss is compared with the median loss of the images of that epoch
    (the mask is shared, so images met in the same epoch saw nearly the same mask); an image's
    *excess* is the median of these differences over the epochs after the first (during the
    first epoch the mask is still near 1 and the images met first keep their whole class
    probability, whatever they look like). The image is flagged when its excess is an outlier
    *relative* to the other images', a robust z-score ``(x - median) / MAD`` above
    ``z_threshold`` (MAD scaled to a normal standard deviation, Iglewicz & Hoaglin), *and* an
    *absolute* jump, ``x - median > min_excess``. The loss is dominated by the masked class's
    probability (the regularisers are shared by every image), so ``min_excess = 0.1`` asks that
    the mask leaves the image about 10 percentage points more of it than the typical image. The
    relative test alone flags clean images: once the mask works, most losses are nearly equal
    and their MAD is tiny, so any spread looks extreme (robust z of 222 to 3140 on the clean
    demo cohort).

    Returns one row per image: ``image``, ``mean_loss``, ``excess``, ``robust_z``, ``flagged``.
    """
    losses = image_losses[["image", "epoch", "loss"]]
    later = losses[losses.epoch > losses.epoch.min()]
    later = later if len(later) else losses  # one epoch only: use it
    excess = later.loss - later.groupby("epoch").loss.transform("median")
    per_image = (later.assign(excess=excess).groupby("image", as_index=False)
                 .agg(mean_loss=("loss", "mean"), excess=("excess", "median")))
    per_image["robust_z"], per_image["flagged"] = outliers(
        per_image["excess"].to_numpy(), z_threshold, min_excess)
    return per_image


def outliers(values: np.ndarray, z_threshold: float,
             min_excess: float) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-scores of ``values`` and which are high outliers: ``robust_z > z_threshold``
    and ``value - median > min_excess`` (a jump relative to the others and in absolute terms)."""
    values = np.asarray(values, dtype=float)
    z = robust_z(values)
    return z, (z > z_threshold) & (values - np.median(values) > min_excess)


def robust_z(values: np.ndarray) -> np.ndarray:
    """``(x - median) / MAD``, the MAD scaled to a normal standard deviation. When more than half
    of the values are equal the MAD is 0, and the mean absolute deviation from the median
    (scaled by sqrt(pi/2), IBM's fallback for the modified z-score) is used instead; all values
    equal give 0."""
    values = np.asarray(values, dtype=float)
    deviations = values - np.median(values)
    spread = median_abs_deviation(values, scale="normal")
    if spread == 0:
        spread = np.abs(deviations).mean() * np.sqrt(np.pi / 2)
    return deviations / spread if spread > 0 else np.zeros_like(values)
