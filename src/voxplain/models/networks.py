"""Classifiers of papers 1-3, each one definition for 2D and 3D (``spatial_dims`` = 2 or 3).

- :class:`CNN` — paper 1, fig. 1: blocks of [conv 3 + batch-norm + leaky ReLU] x 1..3 followed
  by a max-pool of 2, then dropout and one fully connected layer. Paper 1's random search (2.2.2)
  also varies the reduction (max-pool, or stride 2 in the block's last convolution: both halve
  every axis, rounding up) and the number of fully connected layers.
- :class:`ConvNet` — paper 3, section 3.1: four blocks of [conv 3 + batch-norm + ReLU] with 32,
  64, 128, 256 kernels, stride 1 in the first block and 2 afterwards, flatten, one linear layer.
- :class:`VGGGAP` — VGG-style blocks ending in global average pooling and a linear layer, the
  architecture CAM needs (paper 2, section 2.3).

Paper 2's ImageNet networks (VGG16, VGG19, ResNet-50, torchvision's names) are in
:mod:`voxplain.models.imagenet`.

Every network exposes ``features`` (the convolutional part, whose modules Grad-CAM can target)
and ``classifier``, flattens with :func:`torch.flatten` in ``forward`` (Captum's LRP fails on an
``nn.Flatten`` module) and returns logits ``(N, n_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def conv_unit(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
              activation: type[nn.Module] = nn.LeakyReLU) -> nn.Sequential:
    """[conv 3 (padding 1) + batch-norm + activation]."""
    return nn.Sequential(
        _CONV[spatial_dims](in_channels, out_channels, 3, stride=stride, padding=1),
        _NORM[spatial_dims](out_channels),
        activation(),
    )


def pooled_block(spatial_dims: int, in_channels: int, out_channels: int, convs: int,
                 activation: type[nn.Module] = nn.LeakyReLU) -> nn.Sequential:
    """``convs`` conv units then a max-pool of 2 (ceil mode: odd sizes never shrink to zero)."""
    units = [conv_unit(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                       activation=activation) for i in range(convs)]
    return nn.Sequential(*units, _MAXPOOL[spatial_dims](2, ceil_mode=True))


def strided_block(spatial_dims: int, in_channels: int, out_channels: int, convs: int,
                  activation: type[nn.Module] = nn.LeakyReLU) -> nn.Sequential:
    """``convs`` conv units, the last with stride 2: a size n becomes ceil(n / 2), as after
    :func:`pooled_block`'s ceil-mode max-pool (paper 1, 2.2.2: "setting the stride of the last
    convolutional layer of the convolutional block to 2")."""
    return nn.Sequential(*[conv_unit(spatial_dims, in_channels if i == 0 else out_channels,
                                     out_channels, stride=2 if i == convs - 1 else 1,
                                     activation=activation) for i in range(convs)])


def fc_widths(flat: int, n_classes: int, layers: int) -> list[int]:
    """Output widths of ``layers`` fully connected layers from ``flat`` features to ``n_classes``:
    the hidden widths shrink geometrically, layer i (1-based) has round(flat (n_classes / flat)
    ^ (i / layers)) units (at least ``n_classes``), the last has ``n_classes``."""
    hidden = [max(n_classes, round(flat * (n_classes / flat) ** (i / layers)))
              for i in range(1, layers)]
    return [*hidden, n_classes]


def _per_block(values: Sequence[int] | None, default: Sequence[int], blocks: int,
               name: str) -> list[int]:
    values = list(default if values is None else values)
    if len(values) == 1:
        values = values * blocks
    if len(values) != blocks:
        raise ValueError(f"{name} must give one value per block ({blocks}), got {values}")
    return values


def _flat_size(features: nn.Module, in_channels: int, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        was_training = features.training
        features.eval()
        size = features(torch.zeros(1, in_channels, *input_shape)).numel()
        features.train(was_training)
    return size


class FlattenClassifier(nn.Module):
    """Convolutional ``features`` -> flatten -> dropout -> one linear layer (papers 1 and 3)."""

    def _build_head(self, features: nn.Sequential, in_channels: int, input_shape: Sequence[int],
                    n_classes: int, dropout: float, fc_layers: int = 1) -> None:
        """Dropout, then ``fc_layers`` linear layers (widths: :func:`fc_widths`) with a leaky
        ReLU between two of them; one layer keeps the state dict of the paper's head
        (``classifier.1``)."""
        self.features = features
        previous = _flat_size(features, in_channels, input_shape)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        for i, width in enumerate(fc_widths(previous, n_classes, fc_layers)):
            layers += [nn.LeakyReLU()] if i else []
            layers.append(nn.Linear(previous, width))
            previous = width
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


class CNN(FlattenClassifier):
    """Paper-1 CNN (fig. 1) for inputs ``(N, C, *input_shape)``.

    One block per entry of ``channels`` (its width), each of ``convs_per_block`` conv units
    (one value for all blocks, or one per block) and a reduction by 2: ``"maxpool"`` (fig. 1)
    or ``"stride"`` (stride 2 in the block's last convolution). Then dropout and ``fc_layers``
    fully connected layers (fig. 1: one). The defaults are voxplain's small CNN; fig. 1 has 7
    blocks and dropout 0.79 (the poster's figure).
    """

    default_channels = (8, 16, 32, 64, 128)
    default_convs = (1,)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 1, n_classes: int = 2,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.5, reduction: str = "maxpool", fc_layers: int = 1) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        if reduction not in ("maxpool", "stride"):
            raise ValueError(f"reduction must be 'maxpool' or 'stride', got {reduction!r}")
        if fc_layers < 1:
            raise ValueError(f"fc_layers must be at least 1, got {fc_layers}")
        block = pooled_block if reduction == "maxpool" else strided_block
        widths = list(channels or self.default_channels)
        convs = _per_block(convs_per_block, self.default_convs, len(widths), "convs_per_block")
        blocks, previous = [], in_channels
        for width, count in zip(widths, convs):
            blocks.append(block(spatial_dims, previous, width, count))
            previous = width
        self._build_head(nn.Sequential(*blocks), in_channels, input_shape, n_classes, dropout,
                         fc_layers)


class ConvNet(FlattenClassifier):
    """Paper-3 ConvNet: 4 strided blocks (stride 1 then 2), batch-norm, ReLU, flatten, linear."""

    default_channels = (32, 64, 128, 256)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 1, n_classes: int = 2,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        if convs_per_block not in (None, [1], (1,)):
            raise ValueError("convnet has one convolution per block (paper 3); "
                             f"convs_per_block={convs_per_block} is not supported")
        widths = list(channels or self.default_channels)
        units, previous = [], in_channels
        for i, width in enumerate(widths):
            units.append(conv_unit(spatial_dims, previous, width, stride=1 if i == 0 else 2,
                                   activation=nn.ReLU))
            previous = width
        self._build_head(nn.Sequential(*units), in_channels, input_shape, n_classes, dropout)


class VGGGAP(nn.Module):
    """VGG-style blocks, global average pooling, linear layer: ``logit_c = sum_k w_ck mean(A_k)``.

    The last pooled block ends without max-pool so the CAM layer keeps its resolution.
    """

    default_channels = (16, 32, 64, 128)
    default_convs = (2,)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 1, n_classes: int = 2,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        widths = list(channels or self.default_channels)
        convs = _per_block(convs_per_block, self.default_convs, len(widths), "convs_per_block")
        blocks, previous = [], in_channels
        for i, (width, count) in enumerate(zip(widths, convs)):
            block = pooled_block(spatial_dims, previous, width, count, activation=nn.ReLU)
            blocks.append(block if i < len(widths) - 1 else block[:-1])
            previous = width
        self.features = nn.Sequential(*blocks)
        self.pool = _AVGPOOL[spatial_dims](1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
