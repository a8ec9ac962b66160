"""ClinicaDL's image-level CNNs (``Conv5_FC3``, ``Conv4_FC3``), so that a model trained by
ClinicaDL (a MAPS folder, :mod:`voxplain.steps.imports`) loads into voxplain unchanged.

Module and parameter names follow ClinicaDL's published definitions
(``clinicadl/utils/network/cnn/models.py``, ``network_utils.PadMaxPool3d``), so a ClinicaDL
state dict (``convolutions.0.weight`` ... ``fc.6.bias``) loads with ``load_state_dict`` as it
is. Both networks have five blocks ``[conv 3 (padding 1) + batch-norm + ReLU + PadMaxPool(2, 2)]``
of 8, 16, 32, 64, 128 channels (ClinicaDL's ``Conv4_FC3`` has five convolutional blocks too,
despite its name), then ``fc``: flatten, dropout and three linear layers with a ReLU between
two: ``flat -> 1300 -> 50 -> classes`` (Conv5_FC3) or ``flat -> 50 -> 40 -> classes``
(Conv4_FC3). 2D inputs get the 2D layers, as in ClinicaDL.

The package ``clinicadl`` is not needed: nothing of it is imported, and no pickle is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}

#: ClinicaDL's block widths, shared by both networks.
WIDTHS = (8, 16, 32, 64, 128)


class PadMaxPool(nn.Module):
    """ClinicaDL's ``PadMaxPool3d`` / ``PadMaxPool2d``: max-pool of ``kernel_size`` and
    ``stride`` after zero-padding each spatial axis *at its start* up to a multiple of the
    stride. An odd axis of n voxels becomes ceil(n / 2), like a ceil-mode max-pool, but the pairs
    are aligned on the axis' end, not its start: a ceil-mode pool would pair other voxels and
    give other features. The padding is 0, harmless after a ReLU."""

    def __init__(self, kernel_size: int, stride: int, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.kernel_size, self.stride, self.spatial_dims = kernel_size, stride, spatial_dims
        self.pool = _MAXPOOL[spatial_dims](kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` -> ``(N, C, *ceil(spatial / stride))``."""
        missing = [(-size) % self.stride for size in x.shape[2:]]
        padding = [amount for size in reversed(missing) for amount in (size, 0)]  # last axis first
        return self.pool(F.pad(x, padding) if any(missing) else x)


class ClinicaDLCNN(nn.Module):
    """ClinicaDL's ``CNN``: ``convolutions`` then ``fc``, logits ``(N, n_classes)``.

    ``hidden``: the widths of the two hidden linear layers (Conv5_FC3: 1300, 50).
    """

    hidden: tuple[int, int] = (1300, 50)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 1, n_classes: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        if spatial_dims not in (2, 3):
            raise ValueError(f"ClinicaDL's CNNs take 2D or 3D images, got input shape "
                             f"{tuple(input_shape)}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in WIDTHS:
            layers += [_CONV[spatial_dims](previous, width, 3, padding=1),
                       _NORM[spatial_dims](width), nn.ReLU(), PadMaxPool(2, 2, spatial_dims)]
            previous = width
        self.convolutions = nn.Sequential(*layers)
        flat = WIDTHS[-1]
        for size in input_shape:
            for _ in WIDTHS:
                size = -(-size // 2)
            flat *= size
        first, second = self.hidden
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, first),
                                nn.ReLU(), nn.Linear(first, second), nn.ReLU(),
                                nn.Linear(second, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        return self.fc(self.convolutions(x))


class Conv5FC3(ClinicaDLCNN):
    """ClinicaDL's ``Conv5_FC3``: five conv blocks, then ``flat -> 1300 -> 50 -> classes``."""

    hidden = (1300, 50)


class Conv4FC3(ClinicaDLCNN):
    """ClinicaDL's ``Conv4_FC3``: five conv blocks (as published), then
    ``flat -> 50 -> 40 -> classes``."""

    hidden = (50, 40)


#: ClinicaDL architecture name (``maps.json`` ``architecture``) -> voxplain's model name.
ARCHITECTURES = {"Conv5_FC3": "clinicadl_conv5_fc3", "Conv4_FC3": "clinicadl_conv4_fc3"}
