"""Classifiers of papers 1-3, each one definition for 2D and 3D (``spatial_dims`` = 2 or 3).

- :class:`CNN` — paper 1, fig. 1: blocks of [conv 3 + batch-norm + leaky ReLU] x 1..3 followed
  by a max-pool of 2, then dropout and one fully connected layer.
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
                    n_classes: int, dropout: float) -> None:
        self.features = features
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(_flat_size(features, in_channels, input_shape), n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


class CNN(FlattenClassifier):
    """Paper-1 CNN (fig. 1) for inputs ``(N, C, *input_shape)``."""

    default_channels = (8, 16, 32, 64, 128)
    default_convs = (1,)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 1, n_classes: int = 2,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        widths = list(channels or self.default_channels)
        convs = _per_block(convs_per_block, self.default_convs, len(widths), "convs_per_block")
        blocks, previous = [], in_channels
        for width, count in zip(widths, convs):
            blocks.append(pooled_block(spatial_dims, previous, width, count))
            previous = width
        self._build_head(nn.Sequential(*blocks), in_channels, input_shape, n_classes, dropout)


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
