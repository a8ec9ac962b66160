"""Meaningful-perturbation masks in 2D and 3D (paper 1, section 2.3; Fong & Vedaldi 2017).

A mask ``m`` in [0, 1] of the input's spatial size hides parts of an image ``X``:

    X'(u) = m(u) X(u) + (1 - m(u)) mu(u)                                            (eq. 1)

and is optimised (Adam, masks initialised to 1, clamped to [0, 1] after each step) to minimise

    l1 mean_u |1 - m(u)|^b1 + l2 mean_u ||grad m(u)||_b2^b2 + f(X')                  (eq. 2)

where ``f`` is the classifier's softmax probability of the target class and ``grad m`` the
forward finite differences ``d_i m(u) = m(u + e_i) - m(u)`` of ``m`` along every spatial axis,
0 on the grid's last slice along ``i`` (the mask is taken as constant beyond the grid), so every
voxel's gradient is penalised alike. After optimisation values above 0.95 are set to 1.

The smoothness term is the paper's as written: the b2-norm of the gradient to the power b2,
``||grad m(u)||_b2^b2 = sum_i |d_i m(u)|^b2`` ("anisotropic": at b2 = 1 the total variation
``|dx| + |dy| + |dz|``, which favours mask edges along the grid axes). ``smoothness="isotropic"``
keeps the Euclidean form ``(sum_i d_i m(u)^2)^(b2/2)`` that voxplain computed before (rotation
invariant, ``sqrt(dx^2 + dy^2 + dz^2)`` at b2 = 1); the two agree at b2 = 2 only. A run folder
recorded before the option existed has no ``smoothness`` key and reads as isotropic
(:attr:`voxplain.config.MaskConfig.absent_in_records`); the mask steps resume it so unless told
otherwise (:func:`voxplain.steps.masks.as_recorded`), so a resumed step never mixes forms.

Two choices the paper leaves open, stated here:

- ``|x|^b`` with ``b < 1`` has an infinite derivative at 0, and every mask starts at ``m = 1``;
  so does ``||v||_2^b`` (isotropic) at ``v = 0`` for ``b < 2``. Both are computed exactly for
  ``|x| >= eps`` and as the quadratic ``eps^(b-2) x^2`` below (anisotropic: each ``|d_i|`` on
  its own; isotropic: ``||grad m||``): 0 at 0, continuous at ``eps``, with a finite derivative
  everywhere (at most ``2 eps^(b-1)``). An additive smoothing such as ``(x^2+eps^2)^(b/2)`` would
  shift every masked voxel's value by about ``eps^b``, which for ``b = 0.1`` is large (0.5 for
  ``eps = 1e-3``); this form is exact wherever the mask has moved by more than ``eps``.
- The regularisers are means over voxels, not the sums eq. 2 writes: only means reproduce the
  paper's own l1 grid (3.1, fig. 4, table 3.A; l2 = 0.01, b1 = 0.1, b2 = 1), where every mask
  up to l1 = 0.1 still occludes the CNN (validation probability below 1e-6), its surface
  shrinks to "scattered points" as l1 grows, and consecutive values give ROI similarities above
  0.90. With sums, each voxel the thresholded mask hides (m <= 0.95) costs at least
  0.05^0.1 l1 = 0.74 l1 against a probability term of at most 1: at l1 = 0.1 a mask of more
  than about 13 voxels is worse than no mask, and on 121x145x121 the smoothness sum alone of a
  region a few voxels wide exceeds 1 at l2 = 0.01. ``benchmarks/mask_loss.py`` shows it on a
  synthetic cohort (benchmarks/README.md): with means, masks at every l1 from 1e-4 to 0.1
  (validation P(AD) about 1e-5, the hidden fraction falling from 2.3 % to 0.7 %, ROI similarity
  0.96-0.98 between consecutive l1); with sums, no mask at l1 >= 0.01 on that 21x25x21 grid and
  none at any l1 of the grid at the paper's resolution. Means also keep the defaults
  independent of the number of voxels, and are what the reference implementation of the method
  (Fong & Vedaldi's) computes. A sum-based eq. 2 with weights (l1, l2) equals ours with l1
  times the number of voxels and l2 times the number of voxels where ``grad m`` is defined.

Session masks (one per image) are optimised together as one batch: each mask has its own loss,
Adam is element-wise, and the model runs in eval mode, so a mask's trajectory does not depend on
the other masks of the batch. A mask that meets its stopping criterion is frozen at its best value
and leaves the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from voxplain.config import Smoothness

Progress = Callable[[int, int], None]


def power_of_root(squared: torch.Tensor, exponent: float, epsilon: float) -> torch.Tensor:
    """``sqrt(squared)^exponent`` for ``squared >= eps^2``, ``eps^(exponent-2) * squared`` below.

    With ``squared = x^2`` this is ``|x|^exponent``; with ``squared = ||v||^2`` it is
    ``||v||^exponent``, in both cases with a finite derivative at 0.
    """
    floor = epsilon**2
    exact = squared.clamp_min(floor).pow(exponent / 2)  # clamped: no inf in the unused branch
    return torch.where(squared >= floor, exact, epsilon ** (exponent - 2) * squared)


def _forward_differences(mask: torch.Tensor) -> list[torch.Tensor]:
    """``m(u + e_i) - m(u)`` for every spatial axis ``i``, each ``(N, *spatial)``, 0 on the last
    slice along ``i`` (a Neumann boundary: the mask does not change beyond the grid).

    Every voxel has a whole gradient vector. Cropping to the voxels where every component is
    defined, as an earlier version did, left the variation within the grid's last faces
    unpenalised, so masks collected there (20-35 % of the demo's group-mask mass lay on the
    last slice of an axis, outside the brain)."""
    spatial_dims = mask.ndim - 2
    values = mask[:, 0]
    return [torch.diff(values, dim=1 + axis, append=values.narrow(1 + axis, values.shape[1 + axis]
                                                               - 1, 1))
            for axis in range(spatial_dims)]


def spatial_gradient(mask: torch.Tensor) -> torch.Tensor:
    """Forward differences of ``mask`` ``(N, 1, *spatial)`` along every spatial axis.

    Returns ``(N, d, *spatial)``: component ``i`` at voxel ``u`` is ``m(u + e_i) - m(u)``, and 0
    where ``u`` is on the last slice along ``i``.
    """
    return torch.stack(_forward_differences(mask), dim=1)


def sparsity_term(mask: torch.Tensor, b1: float, epsilon: float) -> torch.Tensor:
    """``(N,)``: ``mean_u |1 - m(u)|^b1`` of each mask ``(N, 1, *spatial)`` (smoothed below
    ``epsilon`` as in :func:`power_of_root`)."""
    return _Sparsity.apply(mask, b1, epsilon)


def smoothness_term(mask: torch.Tensor, b2: float, epsilon: float,
                    form: Smoothness = "anisotropic") -> torch.Tensor:
    """``(N,)``: ``mean_u ||grad m(u)||_b2^b2`` of each mask ``(N, 1, *spatial)`` over every
    voxel, with forward differences that are 0 beyond the grid (:func:`spatial_gradient`).

    ``form="anisotropic"`` (eq. 2 as written): ``sum_i |d_i m(u)|^b2``, each ``|d_i|^b2``
    smoothed below ``epsilon``; ``"isotropic"``: ``||grad m(u)||_2^b2``, the Euclidean norm
    smoothed below ``epsilon`` (see :func:`power_of_root`).
    """
    if form not in ("anisotropic", "isotropic"):
        raise ValueError(f"smoothness form {form!r}: expected 'anisotropic' or 'isotropic'")
    return _Smoothness.apply(mask, b2, epsilon, form == "anisotropic")


# The two regularisers are evaluated at every iteration of every mask on the full grid, where
# each elementwise pass over the volume costs milliseconds. Written with autograd they take about
# twenty passes each (forward and backward); with the gradient in closed form, computed in the
# forward pass, about half. Both use ``power_of_root(s, b, eps) = max(s, eps^2)^(b/2 - 1) * s``
# (exact: it is ``s^(b/2)`` above ``eps^2`` and ``eps^(b-2) s`` below) whose derivative is
# ``max(s, eps^2)^(b/2 - 1)`` times ``b/2`` above ``eps^2`` and times 1 below.

class _ClosedForm(torch.autograd.Function):
    """A per-mask term ``(N,)`` whose forward pass saves its gradient ``(N, 1, *spatial)``."""

    @staticmethod
    def backward(ctx, output_gradient: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        shape = (-1,) + (1,) * (gradient.ndim - 1)
        # one None per setting of the longest forward (PyTorch drops the extra trailing Nones)
        return gradient * output_gradient.reshape(shape), None, None, None


class _Sparsity(_ClosedForm):
    @staticmethod
    def forward(ctx, mask: torch.Tensor, exponent: float, epsilon: float) -> torch.Tensor:
        residual = 1 - mask                                          # r = 1 - m, s = r^2
        scale = residual.abs().clamp_min_(epsilon).pow_(exponent - 2)  # max(|r|, eps)^(b-2)
        weighted = scale.mul_(residual)                              # scale * r
        count = residual[0].numel()
        value = torch.linalg.vecdot(weighted.flatten(1), residual.flatten(1)) / count
        if ctx.needs_input_grad[0]:
            # d/dm [scale r^2] = -2 scale r (below eps) or -b scale r (above)
            gradient = weighted.mul_(-2 / count)
            ctx.save_for_backward(_times_below_else(gradient, residual.abs_() < epsilon,
                                                    exponent / 2))
        return value


class _Smoothness(_ClosedForm):
    @staticmethod
    def forward(ctx, mask: torch.Tensor, exponent: float, epsilon: float,
                anisotropic: bool) -> torch.Tensor:
        differences = _forward_differences(mask)
        # anisotropic: one s_i = d_i^2 per axis; isotropic: one s = ||grad m||^2 for all axes
        if anisotropic:
            squares = [difference.square() for difference in differences]
        else:
            squared = differences[0].square()
            for difference in differences[1:]:
                squared.addcmul_(difference, difference)
            squares = [squared]
        count = squares[0][0].numel()
        value = mask.new_zeros(mask.shape[0])
        slopes = []
        for squared in squares:
            scale = squared.clamp_min(epsilon**2).pow_(exponent / 2 - 1)
            value += torch.linalg.vecdot(scale.flatten(1), squared.flatten(1))
            if ctx.needs_input_grad[0]:  # dvalue/ds per voxel
                slope = _times_below_else(scale, squared < epsilon**2, exponent / 2)
                slopes.append(slope.mul_(2 / count))
        if ctx.needs_input_grad[0]:  # then ds/dm through d_i = m(u + e_i) - m(u)
            slopes = slopes if anisotropic else slopes * len(differences)
            ctx.save_for_backward(_difference_adjoint(mask, differences, slopes))
        return value / count


def _times_below_else(values: torch.Tensor, below: torch.Tensor, factor: float) -> torch.Tensor:
    """``values`` times 1 where ``below`` and ``factor`` elsewhere, in place (about half the
    time of ``torch.where`` on the CPU for a mask-sized tensor)."""
    return values.mul_(below.to(values.dtype).mul_(1 - factor).add_(factor))


def _difference_adjoint(mask: torch.Tensor, differences: list[torch.Tensor],
                        slopes: list[torch.Tensor]) -> torch.Tensor:
    """``d/dm sum_u sum_i slope_i(u) * d_i(u)^2 / 2`` for the forward differences ``d_i`` of
    :func:`_forward_differences`, one slope per axis (the same tensor on every axis for a
    function of ``||grad m||^2``): each ``slope_i * d_i`` is added at ``u + e_i`` and subtracted
    at ``u``, for ``u`` before the last slice along ``i`` (the difference is the constant 0
    there)."""
    spatial_dims = mask.ndim - 2
    gradient = torch.zeros_like(mask)
    for axis, (difference, slope) in enumerate(zip(differences, slopes, strict=True)):
        origin = [slice(None)] * (1 + spatial_dims)
        origin[1 + axis] = slice(0, -1)
        shifted = list(origin)
        shifted[1 + axis] = slice(1, None)
        weighted = (slope * difference)[tuple(origin)]
        gradient[:, 0][tuple(shifted)] += weighted
        gradient[:, 0][tuple(origin)] -= weighted
    return gradient


def perturb(images: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``m X + (1 - m) mu``; ``mask`` ``(N or 1, 1, *spatial)`` broadcasts over channels."""
    return reference + mask * (images - reference)


def target_probability(model: nn.Module, images: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """``(N,)`` softmax probability of ``targets[i]`` for ``images[i]``."""
    return torch.softmax(model(images), dim=1).gather(1, targets[:, None])[:, 0]


@dataclass(frozen=True)
class MaskWeights:
    """Coefficients of eq. 2."""

    l1: float
    l2: float
    b1: float
    b2: float
    epsilon: float
    smoothness: Smoothness = "anisotropic"


def mask_loss(model: nn.Module, images: torch.Tensor, mask: torch.Tensor,
              reference: torch.Tensor, targets: torch.Tensor,
              weights: MaskWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2 for each image, with its terms.

    Args:
        images: ``(N, C, *spatial)``.
        mask: ``(N, 1, *spatial)`` one mask per image, or ``(1, 1, *spatial)`` shared.
        reference: ``mu``, broadcastable to ``images``.
        targets: ``(N,)`` class whose probability is minimised.

    Returns:
        ``(N,)`` total loss and ``{"sparsity", "smoothness", "probability"}`` (each ``(N,)``,
        the regularisers unweighted, broadcast when the mask is shared).
    """
    probability = target_probability(model, perturb(images, mask, reference), targets)
    sparsity = sparsity_term(mask, weights.b1, weights.epsilon).expand_as(probability)
    smoothness = smoothness_term(mask, weights.b2, weights.epsilon,
                                 weights.smoothness).expand_as(probability)
    total = weights.l1 * sparsity + weights.l2 * smoothness + probability
    return total, {"sparsity": sparsity, "smoothness": smoothness, "probability": probability}


def threshold_mask(mask: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """Values above ``threshold`` set to 1 (paper 1, 2.3): only the found zones perturb."""
    return torch.where(mask > threshold, torch.ones_like(mask), mask)


class EarlyStopping:
    """Per-sample early stopping as paper 1 states it (2.3.5, the rule of its classifiers in
    2.2.3 with a relative tolerance).

    Training "does not stop until the relative difference between the validation loss and the
    lowest validation loss is superior to a tolerance for a patience of N epochs": a step counts
    against a sample when ``loss > lowest + tolerance * |lowest|`` (``lowest`` = the lowest loss
    so far, this step's included), any other step resets its count, and the sample stops after
    ``patience`` counting steps in a row. A loss that keeps falling, however slowly, never
    counts, so it runs to the maximum; a loss that stays more than the tolerance above its
    lowest (it rose and settled higher, or oscillates well above its best) stops after
    ``patience`` steps. A loss that stays flat at its lowest does not count either: the rule
    stops divergence, not convergence (the kept mask is the lowest-loss one in any case).

    An earlier version counted every step that did not *improve* on the lowest by more than
    the tolerance; a slow steady decrease then stopped after ``patience`` steps, e.g. a group
    mask of the demo at epoch 6 with half of the volume masked.
    """

    def __init__(self, size: int, tolerance: float, patience: int) -> None:
        self.tolerance = tolerance
        self.patience = patience
        self.lowest = np.full(size, np.inf)
        self.above_lowest = np.zeros(size, dtype=np.int64)

    def step(self, losses: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """Record ``losses`` of samples ``index`` (default all); return which of them stop."""
        index = np.arange(len(self.lowest)) if index is None else index
        lowest = np.minimum(self.lowest[index], losses)
        above = losses > lowest + self.tolerance * np.abs(lowest)
        self.above_lowest[index] = np.where(above, self.above_lowest[index] + 1, 0)
        self.lowest[index] = lowest
        return self.above_lowest[index] >= self.patience


def gaussian_blur(images: torch.Tensor, sigma_voxels: tuple[float, ...]) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)`` (reflecting borders), sigma per axis."""
    spatial_dims = images.ndim - 2
    conv = {2: nn.functional.conv2d, 3: nn.functional.conv3d}[spatial_dims]
    channels = images.shape[1]
    blurred = images
    for axis, sigma in enumerate(sigma_voxels):
        radius = max(1, math.ceil(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).reshape([1, 1] + [-1 if i == axis else 1
                                                         for i in range(spatial_dims)])
        padding = [0, 0] * spatial_dims
        padding[2 * (spatial_dims - 1 - axis)] = padding[2 * (spatial_dims - 1 - axis) + 1] = radius
        padded = nn.functional.pad(blurred, padding, mode="reflect")
        blurred = conv(padded, kernel.repeat(channels, 1, *[1] * spatial_dims), groups=channels)
    return blurred
