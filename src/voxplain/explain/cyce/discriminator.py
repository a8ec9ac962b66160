"""Paired multiscale PatchGAN discriminators D+ and D- of CyCE (paper 3, 2.3 and fig. 5).

The discriminator is the generator's U-Net encoder cut after stages 2 and 3: each output
position of those stages sees one patch of the input (two receptive-field sizes: multiscale
PatchGAN). It does not judge one image; it receives a *pair*, one real and one generated, extracts
the features of both with the same weights, concatenates the two feature vectors at every patch
position and classifies the pair with a two-neuron softmax: neuron ``k`` says "the image at
position ``k`` of the pair is the real one".

So that no neuron becomes *the* real neuron, the order of the two images is drawn at random for
every patch position (the paper's "patches are shuffled and reordered after classification"):
the features of the real and the generated image are swapped where a random mask is 1, and the
target neuron of that patch is the position the real image landed in.

By default the two neurons also share their weights (``symmetric=True``): neuron 0 applies
``w = (u, v)`` to ``[f_first, f_second]`` and neuron 1 applies the same ``w`` to
``[f_second, f_first]``. Swapping the pair then swaps the two logits exactly, so the decision
cannot depend on the order -- the paper's intent made exact rather than learnt from shuffled
data (a choice the paper leaves open). With ``symmetric=False`` the two neurons are free and only
the shuffle keeps them honest.

Normalisation (left open by the paper). By default the encoder is the generator's, with a group
norm after every convolution (``normalisation="group"``). Group norm standardises each image's
features on its own, so the discriminator cannot see a global change of brightness or contrast:
with 8 or fewer channels in stage 0 each channel is normalised alone, so the stage-0 features of
``a x`` (``a > 0``) are those of ``x``, and an offset ``b`` reaches them only through the
zero-padded borders. On the 2D lesion cohort the generators used exactly
this blind spot: they learnt a global intensity gain ``G+/-(x) ~ (1 +/- a) x`` (R correlated with
x at r ~ 0.6 over the background), which amplifies the background texture the classifier reads as
malignancy. ``normalisation="none"`` (no norm, He initialisation) lets the discriminator see
intensities and removes that mode (r ~ 0.03), see benchmarks/README.md, CyCE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from voxplain.explain.cyce.generator import CONV, Encoder

#: Encoder stages whose outputs are classified (paper 3, 3.2: "clipped to stages 2 and 3").
PATCH_STAGES = (2, 3)


class PairDiscriminator(nn.Module):
    """Which image of a (real, generated) pair is real, per patch, at two scales.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        widths: kernels of stages 0-3 (the generator's widths; only the first four are used).
        convs_per_stage: convolutions per stage (paper: 3).
        symmetric: share the two output neurons' weights so swapping the pair swaps the logits.
        normalisation: ``"group"`` (group norm after every convolution, as in the generator) or
            ``"none"`` (see the module docstring).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1,
                 widths: Sequence[int] = (48, 96, 192, 384), convs_per_stage: int = 3,
                 symmetric: bool = True, normalisation: str = "group") -> None:
        super().__init__()
        if len(widths) <= max(PATCH_STAGES):
            raise ValueError(f"the discriminator needs widths for stages 0-{max(PATCH_STAGES)}, "
                             f"got {list(widths)}")
        if normalisation not in ("group", "none"):
            raise ValueError(f"normalisation must be 'group' or 'none', got {normalisation!r}")
        widths = list(widths)[:max(PATCH_STAGES) + 1]
        self.encoder = Encoder(spatial_dims, in_channels, widths, convs_per_stage,
                               normalise=normalisation == "group")
        self.symmetric = symmetric
        self.heads = nn.ModuleList(
            CONV[spatial_dims](2 * widths[s], 1 if symmetric else 2, 1) for s in PATCH_STAGES)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch features of ``x`` ``(N, C, *spatial)`` at each scale of :data:`PATCH_STAGES`."""
        stages = self.encoder(x)
        return [stages[s] for s in PATCH_STAGES]

    def classify(self, first: list[torch.Tensor], second: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits ``(N, 2, *patches)`` per scale: channel ``k`` favours "position k is real"."""
        logits = []
        for head, a, b in zip(self.heads, first, second):
            if self.symmetric:
                logits.append(torch.cat([head(torch.cat([a, b], 1)), head(torch.cat([b, a], 1))], 1))
            else:
                logits.append(head(torch.cat([a, b], 1)))
        return logits

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the pair (``first``, ``second``), see :meth:`classify`."""
        return self.classify(self.features(first), self.features(second))


def shuffled_pair(real: list[torch.Tensor], fake: list[torch.Tensor],
                  generator: torch.Generator | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Put the real and the generated features in a random order at every patch position.

    Returns:
        ``(first, second, real_position)`` per scale; ``real_position`` ``(N, *patches)``
        (long) is 0 where the real patch is first, 1 where it is second.
    """
    firsts, seconds, positions = [], [], []
    for r, f in zip(real, fake):
        shape = (r.shape[0], *r.shape[2:])
        swap = torch.rand(shape, generator=generator, device="cpu").lt(0.5).to(r.device)
        mask = swap.unsqueeze(1)
        firsts.append(torch.where(mask, f, r))
        seconds.append(torch.where(mask, r, f))
        positions.append(swap.long())
    return firsts, seconds, positions


def pair_cross_entropy(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Categorical cross-entropy (eq. 3) of the two-way softmax, mean over patches and scales."""
    return torch.stack([F.cross_entropy(l, t) for l, t in zip(logits, targets)]).mean()


def discriminator_loss(discriminator: PairDiscriminator, real: torch.Tensor, fake: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Loss of D on (real, generated) pairs: find the real image of every shuffled patch pair."""
    first, second, real_position = shuffled_pair(discriminator.features(real),
                                                 discriminator.features(fake), generator)
    return pair_cross_entropy(discriminator.classify(first, second), real_position)


def adversarial_loss(discriminator: PairDiscriminator, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Generator's adversarial term of eq. 4: the same cross-entropy with inverted labels (the
    generated patch is labelled real). Freeze the discriminator's weights before calling."""
    first, second, real_position = shuffled_pair(discriminator.features(real),
                                                 discriminator.features(fake), generator)
    return pair_cross_entropy(discriminator.classify(first, second),
                              [1 - p for p in real_position])
