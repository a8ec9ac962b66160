"""Paper 2's ImageNet networks: VGG16, VGG19 and ResNet-50, each with a global-average-pooling
("gap") or a fully connected ("fc") head, one definition for 2D and 3D.

- :class:`VGG16`, :class:`VGG19` — Simonyan & Zisserman 2015, configurations D and E: blocks of
  [conv 3 (padding 1) + ReLU] x 2, 2, 3, 3, 3 (D) or 2, 2, 4, 4, 4 (E) with 64, 128, 256, 512,
  512 kernels, each block closed by a max-pool of 2 (stride 2, floor), no batch-norm.
- :class:`ResNet50` — He et al. 2015, bottleneck blocks [1x1, 3x3, 1x1 conv + batch-norm]
  x 3, 4, 6, 3 with widths 64, 128, 256, 512 (outputs 4x wider) after a stem of conv 7 stride 2
  and max-pool 3 stride 2; the stride of a stage's first block sits on its 3x3 convolution
  ("ResNet v1.5", as torchvision), the shortcut is a 1x1 conv + batch-norm where the shape changes.

Modules are named as torchvision names them (``features.<i>``, ``avgpool``, ``classifier.0/3/6``
of ``torchvision.models.vgg16``/``vgg19``; ``conv1``, ``bn1``, ``layer1``..``layer4`` with
``conv1 bn1 conv2 bn2 conv3 bn3 relu downsample.0/.1``, ``avgpool``, ``fc`` of ``resnet50``), so
a torchvision state dict loads by name
(:func:`~voxplain.models.serialization.load_weights_by_name`); the initialisation is
torchvision's too. In 2D with 3 input channels and 1000 classes the parameter counts are
torchvision's: VGG16 138,357,544, VGG19 143,667,240 (fc head), ResNet-50 25,557,032 (gap head).
Departures, none of which changes a parameter or a logit: ReLUs are not in place and the
residual sum is not written in place (an in-place change of a hooked module's output breaks
backward hooks such as Captum's), and the dropout rate is ``ModelConfig.dropout``.

Heads (paper 2, table 1: "a global average pooling (GAP) layer versus fully connected (FC)
layers used prior to output"; its Keras code is not published, so the heads are ours where the
original networks do not define them):

- ``gap``: global average pooling, dropout, one linear layer: ``logit_c = sum_k W[c, k]
  mean(A^k) + b_c``, what CAM needs. VGG's last max-pool is dropped, as Zhou et al. 2016 drop
  pool5 for their VGG-GAP, so CAM reads the last convolutional layer at its own resolution
  (paper 2, fig. 1: ``block5_conv4``, 16x16 at 256x256). ResNet-50's gap head is its original
  head (``avgpool``, ``fc``), with a dropout in front (``dropout = 0``: the original exactly).
- ``fc``: adaptive average pooling to ``pool_size`` per axis, then VGG's classifier: linear
  ``hidden_units`` -> ReLU -> dropout -> linear ``hidden_units`` -> ReLU -> dropout -> linear
  ``n_classes`` (:func:`fully_connected_head`). For VGG this is the original head (pool 7, 4096
  units, dropout 0.5). For ResNet-50 it is global average pooling followed by fully connected
  hidden layers, as a Keras user replacing the top would build it (paper 2 names neither the
  pooling nor the units: "the number of nodes in the customized FC layers" is among its stated
  doubts); pool 1 and 4096 units by default, so the fc head differs from the gap head only by
  its two hidden layers.

3D: the same code with 3D modules. A 7x7x7 pool of VGG's 512 maps would feed 175,616 inputs to
the first 4096-unit layer (719 M parameters); VGG's fc head pools to 3x3x3 in 3D by default
(13,824 inputs, 57 M parameters in that layer, the order of 2D's 103 M). ``channels`` scales
the widths (5 VGG blocks, 4 ResNet stages), e.g. for full-resolution volumes; published weights
then no longer fit and are skipped by name and shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from voxplain.models.networks import _AVGPOOL, _CONV, _MAXPOOL, _NORM, _check_dims, _per_block

HEADS = ("gap", "fc")
#: Units of each hidden layer of the fully connected head (VGG's).
DEFAULT_HIDDEN_UNITS = 4096


def fully_connected_head(in_features: int, hidden_units: int, n_classes: int,
                         dropout: float) -> nn.Sequential:
    """VGG's classifier (torchvision's ``classifier``, indices 0/3/6 hold the linear layers):
    linear -> ReLU -> dropout -> linear -> ReLU -> dropout -> linear, initialised N(0, 0.01)."""
    head = nn.Sequential(
        nn.Linear(in_features, hidden_units), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_units, hidden_units), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_units, n_classes),
    )
    for module in head:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return head


def _check_head(network: str, head: str, pool_size: int | None, hidden_units: int | None) -> None:
    if head not in HEADS:
        raise ValueError(f"{network}: head must be one of {HEADS}, got {head!r}")
    if head == "gap" and (pool_size is not None or hidden_units is not None):
        raise ValueError(f"{network}: pool_size and hidden_units set the fc head; the gap head is "
                         "global average pooling + one linear layer (head='fc' to use them)")


def _init_convolutions(model: nn.Module) -> None:
    """torchvision's initialisation: He normal (fan out) convolutions, zero biases, batch-norm
    weights 1 and biases 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class VGG(nn.Module):
    """VGG for inputs ``(N, in_channels, *input_shape)``, logits ``(N, n_classes)``; subclasses
    fix the configuration (:class:`VGG16`, :class:`VGG19`).

    ``channels``: the 5 block widths (default 64, 128, 256, 512, 512); ``convs_per_block`` must
    be the configuration's own (None). ``head``: ``"fc"`` (default, the original) or ``"gap"``.
    ``pool_size`` (fc head): output size per axis of ``avgpool`` (default 7 in 2D, 3 in 3D);
    ``hidden_units`` (fc head): default 4096. ``batch_norm``: a batch-norm between every
    convolution and its ReLU (torchvision's ``vgg16_bn``/``vgg19_bn``, same indices, so their
    weights load by name). Every axis of ``input_shape`` needs at least 32
    voxels with the fc head (5 max-pools of 2), 16 with the gap head (4).
    """

    name: ClassVar[str] = "vgg"
    convs: ClassVar[tuple[int, ...]] = ()
    default_channels = (64, 128, 256, 512, 512)
    default_pool_size: ClassVar[dict[int, int]] = {2: 7, 3: 3}  # by spatial dimensions

    def __init__(self, input_shape: Sequence[int], in_channels: int = 3, n_classes: int = 1000,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.5, head: str | None = None, pool_size: int | None = None,
                 hidden_units: int | None = None, batch_norm: bool = False) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        head = head or "fc"
        _check_head(self.name, head, pool_size, hidden_units)
        if convs_per_block is not None and list(convs_per_block) != list(self.convs):
            raise ValueError(f"{self.name} has {list(self.convs)} convolutions per block "
                             "(Simonyan & Zisserman 2015); convs_per_block="
                             f"{list(convs_per_block)} is another network (vgg_gap takes any)")
        widths = _per_block(channels, self.default_channels, len(self.convs), "channels")
        pools = len(widths) if head == "fc" else len(widths) - 1
        if min(input_shape) < 2 ** pools:
            raise ValueError(f"{self.name} with the {head} head needs at least {2 ** pools} voxels "
                             f"along every axis ({pools} max-pools of 2); input_shape is "
                             f"{tuple(input_shape)}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width, count in zip(widths, self.convs):
            for _ in range(count):
                layers += [_CONV[spatial_dims](previous, width, 3, padding=1),
                           *([_NORM[spatial_dims](width)] if batch_norm else []), nn.ReLU()]
                previous = width
            layers.append(_MAXPOOL[spatial_dims](2, 2))
        self.features = nn.Sequential(*(layers if head == "fc" else layers[:-1]))
        if head == "gap":
            self.avgpool = _AVGPOOL[spatial_dims](1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, n_classes))
            nn.init.normal_(self.classifier[1].weight, 0, 0.01)
            nn.init.zeros_(self.classifier[1].bias)
        else:
            size = pool_size or self.default_pool_size[spatial_dims]
            self.avgpool = _AVGPOOL[spatial_dims](size)
            self.classifier = fully_connected_head(previous * size ** spatial_dims,
                                                   hidden_units or DEFAULT_HIDDEN_UNITS,
                                                   n_classes, dropout)
        self.head = head
        _init_convolutions(self.features)  # batch-norm weights 1, biases 0 (torchvision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG16(VGG):
    """VGG16: configuration D, 13 convolutions (+ 3 linear layers with the fc head)."""

    name = "vgg16"
    convs = (2, 2, 3, 3, 3)


class VGG19(VGG):
    """VGG19: configuration E, 16 convolutions (+ 3 linear layers with the fc head)."""

    name = "vgg19"
    convs = (2, 2, 4, 4, 4)


class Bottleneck(nn.Module):
    """ResNet bottleneck ``(N, in_channels, *s) -> (N, 4 width, *s / stride)``:
    ReLU(bn3(conv3 1x1(ReLU(bn2(conv2 3x3, stride(ReLU(bn1(conv1 1x1(x)))))))) + shortcut(x)),
    the shortcut being ``downsample`` (1x1 conv, stride + batch-norm) where the shape changes.

    Three ReLU modules (``relu1``, ``relu2``, ``relu3``) where torchvision runs one ``relu``
    three times: they hold no parameter, so the state dict is torchvision's, and a method that
    hooks modules one call at a time (Captum's DeepLift, whose rules refuse a module reused
    within one forward pass) works. A class activation map reads the block's output, which is
    ``relu3``'s.
    """

    expansion = 4

    def __init__(self, spatial_dims: int, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        conv, norm, out_channels = _CONV[spatial_dims], _NORM[spatial_dims], width * self.expansion
        self.conv1 = conv(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = conv(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.downsample = (nn.Sequential(conv(in_channels, out_channels, 1, stride=stride,
                                              bias=False), norm(out_channels))
                           if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 for inputs ``(N, in_channels, *input_shape)``, logits ``(N, n_classes)``.

    ``channels``: the 4 stage widths (default 64, 128, 256, 512; the stem has the first, stage
    outputs are 4x wider); ``convs_per_block`` does not apply (None). ``head``: ``"gap"``
    (default, the original ``avgpool`` + ``fc``) or ``"fc"`` (``avgpool`` to ``pool_size``,
    default 1, then ``fc`` = :func:`fully_connected_head` with ``hidden_units``, default 4096).
    Any input size works (the last stage of a 32-voxel axis has 1 voxel).

    ``features`` (stem and the four stages) and ``classifier`` (the head after pooling) are
    views built on access, so that module names and state-dict keys stay torchvision's.
    """

    name: ClassVar[str] = "resnet50"
    blocks: ClassVar[tuple[int, ...]] = (3, 4, 6, 3)
    default_channels = (64, 128, 256, 512)

    def __init__(self, input_shape: Sequence[int], in_channels: int = 3, n_classes: int = 1000,
                 channels: Sequence[int] | None = None, convs_per_block: Sequence[int] | None = None,
                 dropout: float = 0.0, head: str | None = None, pool_size: int | None = None,
                 hidden_units: int | None = None) -> None:
        super().__init__()
        spatial_dims = len(input_shape)
        _check_dims(spatial_dims)
        head = head or "gap"
        _check_head(self.name, head, pool_size, hidden_units)
        if convs_per_block is not None:
            raise ValueError(f"{self.name} is made of bottleneck blocks of 3 convolutions, "
                             f"{list(self.blocks)} per stage (He et al. 2015); convs_per_block "
                             "does not apply")
        widths = _per_block(channels, self.default_channels, len(self.blocks), "channels")
        conv = _CONV[spatial_dims]
        self.conv1 = conv(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = _NORM[spatial_dims](widths[0])
        self.relu = nn.ReLU()
        self.maxpool = _MAXPOOL[spatial_dims](3, stride=2, padding=1)
        previous = widths[0]
        for index, (width, count) in enumerate(zip(widths, self.blocks)):
            stage = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(spatial_dims, previous, width, stride))
                previous = width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        if head == "gap":
            self.avgpool = _AVGPOOL[spatial_dims](1)
            self.dropout = nn.Dropout(dropout)
            self.fc: nn.Module = nn.Linear(previous, n_classes)
        else:
            size = pool_size or 1
            self.avgpool = _AVGPOOL[spatial_dims](size)
            self.fc = fully_connected_head(previous * size ** spatial_dims,
                                           hidden_units or DEFAULT_HIDDEN_UNITS, n_classes, dropout)
        self.head = head
        _init_convolutions(self)

    def _feature_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, self.maxpool,
                self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def features(self) -> nn.Sequential:
        """Stem and stages, ``(N, C, *s) -> (N, 4 channels[-1], *s / 32)``."""
        return nn.Sequential(*self._feature_modules())

    @property
    def classifier(self) -> nn.Module:
        """The head after ``avgpool`` and flattening: [dropout, fc] (gap) or ``fc`` (fc)."""
        return nn.Sequential(self.dropout, self.fc) if self.head == "gap" else self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, C, *spatial)``."""
        for module in self._feature_modules():
            x = module(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x) if self.head == "gap" else x)
