"""U-Net generators G+ and G- of CyCE (paper 3, 3.2 and fig. 4), one definition for 2D and 3D.

Depth 3 (stages 0-3), three convolutions per stage, widths 48/96/192/384 in the paper (smaller
CPU defaults in :class:`~voxplain.config.CyCENetworkConfig`). Choices the paper leaves open:

- Unit: conv 3 (padding 1) + group normalisation + leaky ReLU (0.2). Group norm (8 groups, or
  fewer when a stage has fewer channels) behaves the same in training and in evaluation, unlike
  batch norm, so the generator trained on a batch and the one applied to a single image agree.
- Downsampling: max-pool 2 with ceil mode; upsampling: linear interpolation *to the size of the
  skip connection*, so odd sizes (e.g. 41x49x41) come back to exactly the input shape.
- Output: ``x + conv1x1(features)`` with the last convolution initialised to zero, so each
  generator starts as the identity and learns only the change ``G(x) - x`` -- the quantity CyCE
  explains (eq. 5). The paper's fig. 4 does not show the output layer; a residual output makes
  the similarity and cycle terms hold from the first step, which matters on a CPU budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def groups_for(channels: int, groups: int = 8) -> int:
    """The largest divisor of ``channels`` not above ``groups``."""
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def stage(spatial_dims: int, in_channels: int, out_channels: int, convs: int,
          normalise: bool = True) -> nn.Sequential:
    """``convs`` x [conv 3 + group norm + leaky ReLU 0.2]: one U-Net stage.

    With ``normalise=False`` the group norms are left out and the convolutions get He
    initialisation for the leaky ReLU (normal, fan-in, zero bias), which keeps the activations'
    scale through the 12 unnormalised convolutions of an encoder (PyTorch's default
    initialisation shrinks it at every layer, and an unnormalised discriminator then hardly
    learns).
    """
    layers: list[nn.Module] = []
    for i in range(convs):
        conv = CONV[spatial_dims](in_channels if i == 0 else out_channels, out_channels, 3,
                                  padding=1)
        layers.append(conv)
        if normalise:
            layers.append(nn.GroupNorm(groups_for(out_channels), out_channels))
        else:
            nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(conv.bias)
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """U-Net contracting path: stage 0 at full size, stage s after s max-pools of 2.

    Shared by the generator and the discriminator (which is this encoder cut after stages 2
    and 3, paper 3 fig. 5). ``forward`` returns the output of every stage. ``normalise=False``
    leaves out the group norms (an option of the discriminator, see
    :mod:`voxplain.explain.cyce.discriminator`).
    """

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int],
                 convs_per_stage: int = 3, normalise: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"widths must give at least two positive stage widths, got {widths}")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be at least 1, got {convs_per_stage}")
        self.spatial_dims = spatial_dims
        self.stages = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.stages.append(stage(spatial_dims, previous, width, convs_per_stage, normalise))
            previous = width
        self.pool = MAXPOOL[spatial_dims](2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every stage for ``x`` ``(N, C, *spatial)``."""
        outputs = []
        for index, block in enumerate(self.stages):
            x = block(x if index == 0 else self.pool(x))
            outputs.append(x)
        return outputs


class UNetGenerator(nn.Module):
    """Image-to-image U-Net: ``(N, C, *spatial)`` -> ``(N, C, *spatial)``, same shape.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (the output has as many).
        widths: kernels per stage; ``len(widths) - 1`` is the depth (paper: 48, 96, 192, 384).
        convs_per_stage: convolutions per stage (paper: 3).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1,
                 widths: Sequence[int] = (48, 96, 192, 384), convs_per_stage: int = 3) -> None:
        super().__init__()
        self.encoder = Encoder(spatial_dims, in_channels, widths, convs_per_stage)
        self.decoder = nn.ModuleList(
            stage(spatial_dims, widths[i + 1] + widths[i], widths[i], convs_per_stage)
            for i in reversed(range(len(widths) - 1)))
        self.output = CONV[spatial_dims](widths[0], in_channels, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + change(x)``, shaped like ``x``."""
        if x.ndim != self.encoder.spatial_dims + 2:
            raise ValueError(f"expected a {self.encoder.spatial_dims}D batch (N, C, *spatial), "
                             f"got shape {tuple(x.shape)}")
        skips = self.encoder(x)
        y = skips[-1]
        mode = INTERPOLATION[self.encoder.spatial_dims]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            y = F.interpolate(y, size=skip.shape[2:], mode=mode, align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return x + self.output(y)
