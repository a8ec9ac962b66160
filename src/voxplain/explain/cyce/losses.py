"""CyCE generator losses (paper 3, eq. 1-4), 2D and 3D.

- ``dssim(x, y) = (1 - MS-SSIM(x, y)) / 2`` (structural dissimilarity, in [0, 1]), computed by
  torchmetrics' multiscale SSIM. The paper's stabilising constants ``c1 = .01, c2 = .03`` are the
  ``k1, k2`` of the usual definition ``c_i = (k_i L)^2`` (as in keras-contrib's DSSIMObjective,
  the Keras loss of the time, and torchmetrics' defaults); ``L`` is the data range (1 for images
  in [0, 1]).
- ``cycle(x, x') = 1/2 (mean |x - x'| + dssim(x, x'))`` (eq. 2), applied to
  ``x`` vs ``G-(G+(x))`` and ``x`` vs ``G+(G-(x))``.
- ``similarity(x, G(x)) = dssim(x, G(x)) + w_1 mean |x - G(x)|`` with ``w_1 = 0`` by default
  (paper 3, 2.2: ``L_sim = L_DSSIM``). Option ``similarity_l1_weight``: near ``G(x) = x`` DSSIM
  grows only quadratically with the change, and MS-SSIM looks at luminance at its coarsest scale
  only and weights the finest scale by ~7 % (3 scales), so a small change spread over the whole
  image (a global gain or offset, texture or noise) costs almost nothing; an L1 term charges it
  linearly, as eq. 2 does for the cycle for the paper's own reason ("to preserve the average
  intensity, and DSSIM mainly accounts for covariances").
- The constants: eq. 1 writes ``c1 = .01, c2 = .03`` into the formula, which read literally
  would be ``c1 = 0.01, c2 = 0.03``; we read them as ``k1, k2`` (see above), the values every
  SSIM implementation of the time defaults to. Read literally (``k1 = 0.1, k2 = 0.173``) they
  change nothing measurable on the 2D lesion cohort (R mass in lesions 0.140 vs 0.142 after
  300 steps), so no option beyond ``ssim_k1``/``ssim_k2`` is offered.
- ``activation_maximisation = CE(C(G(x)), l)``: the frozen classifier's cross-entropy towards
  ``l = 1`` for G+ and ``l = 0`` for G-. Eq. 4 writes ``C(x_a)``, which has no gradient with
  respect to the generator; the text (2.4: "the classifier's prediction for the current
  sample") and the method need ``C(G(x_a))``, which is what is computed.

Window and scales (left open by the paper, whose 64x64 patches cannot take the standard 5
scales with an 11-pixel window). :func:`ssim_settings` picks, for the smallest spatial side
``n``: the largest window ``k`` in (11, 7, 5, 3) with ``n >= 8 k`` (room for 3 scales), else
with ``n >= 4 k``, else 3; then the most scales ``s <= 5`` whose coarsest image (``n // 2^(s-1)``)
still holds two windows, within torchmetrics' own size check. The Gaussian's sigma is
``1.5 k / 11`` (1.5 at the standard 11), which makes torchmetrics' Gaussian exactly ``k`` wide.
The scale weights are the standard ``betas`` of Wang et al. (2003), the first ``s``
renormalised to sum to 1. Negative contrast terms are clipped at 0 (torchmetrics'
``normalize="relu"``) so fractional powers stay real during training. Examples: 64x64 -> window
7, 3 scales; 32^3 -> 3, 3; 20x24x20 -> 5, 2; 121x145x121 -> 11, 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

#: Scale weights of MS-SSIM (Wang, Simoncelli & Bovik 2003), finest first.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOWS = (11, 7, 5, 3)


@dataclass(frozen=True)
class SSIMSettings:
    """Window, scales and constants of the (MS-)SSIM used by every CyCE loss."""

    kernel_size: int
    scales: int
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0

    @property
    def sigma(self) -> float:
        """Gaussian sigma whose torchmetrics window is exactly ``kernel_size`` wide."""
        return 1.5 * self.kernel_size / 11

    @property
    def betas(self) -> tuple[float, ...]:
        weights = MS_SSIM_BETAS[:self.scales]
        return tuple(w / sum(weights) for w in weights)


def ssim_settings(spatial_shape: Sequence[int], kernel_size: int | None = None,
                  scales: int | None = None, k1: float = 0.01, k2: float = 0.03,
                  data_range: float = 1.0) -> SSIMSettings:
    """SSIM settings for images of ``spatial_shape``; ``None`` picks the window/scales as the
    module docstring says. Raises ValueError when the images are too small for them."""
    side = min(spatial_shape)
    if kernel_size is None:
        kernel_size = next((k for k in WINDOWS if side >= 8 * k), None) or next(
            (k for k in WINDOWS if side >= 4 * k), 3)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"the SSIM window must be odd and positive, got {kernel_size}")
    if scales is None:
        scales = max([s for s in range(1, len(MS_SSIM_BETAS) + 1)
                      if side // 2 ** (s - 1) >= 2 * kernel_size and _fits(side, kernel_size, s)],
                     default=1)
    if not 1 <= scales <= len(MS_SSIM_BETAS):
        raise ValueError(f"MS-SSIM takes 1 to {len(MS_SSIM_BETAS)} scales, got {scales}")
    if side < kernel_size or not _fits(side, kernel_size, scales):
        raise ValueError(f"images of spatial shape {tuple(spatial_shape)} are too small for an "
                         f"SSIM window of {kernel_size} at {scales} scale(s)")
    return SSIMSettings(kernel_size, scales, k1, k2, data_range)


def _fits(side: int, kernel_size: int, scales: int) -> bool:
    """torchmetrics' size checks of multiscale SSIM."""
    return side >= 2 ** scales and side // max(1, scales - 1) ** 2 > kernel_size - 1


def dssim(x: torch.Tensor, y: torch.Tensor, settings: SSIMSettings) -> torch.Tensor:
    """Mean structural dissimilarity ``(1 - MS-SSIM) / 2`` of ``(N, C, *spatial)`` batches."""
    similarity = multiscale_structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=settings.sigma, kernel_size=settings.kernel_size,
        reduction="elementwise_mean", data_range=settings.data_range, k1=settings.k1,
        k2=settings.k2, betas=settings.betas, normalize="relu")
    return (1 - similarity) / 2


def cycle_loss(x: torch.Tensor, cycled: torch.Tensor, settings: SSIMSettings) -> torch.Tensor:
    """Eq. 2: ``1/2 (mean |x - x'| + dssim(x, x'))``."""
    return 0.5 * ((x - cycled).abs().mean() + dssim(x, cycled, settings))


def similarity_loss(x: torch.Tensor, generated: torch.Tensor, settings: SSIMSettings,
                    l1_weight: float = 0.0) -> torch.Tensor:
    """``dssim(x, G(x)) + l1_weight mean|x - G(x)|``: keep the changes small (paper: DSSIM
    only, ``l1_weight = 0``)."""
    loss = dssim(x, generated, settings)
    if l1_weight:
        loss = loss + l1_weight * (x - generated).abs().mean()
    return loss


def activation_maximisation_loss(classifier: nn.Module, generated: torch.Tensor,
                                 target_class: int) -> torch.Tensor:
    """Cross-entropy of the (frozen, eval-mode) classifier on ``G(x)`` towards ``target_class``."""
    logits = classifier(generated)
    targets = torch.full((len(generated),), target_class, dtype=torch.long,
                         device=generated.device)
    return F.cross_entropy(logits, targets)
