"""The default layer of the class activation maps (:func:`choose_cam_layer`): the deepest activated
feature map keeping ``min_size`` voxels per axis, in 2D and 3D, on our networks and on small
hand-built ones (a reused ReLU, functional activations), and the dry pass leaving no trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from voxplain.explain.cam import GradCAM
from voxplain.explain.layers import (
    DEFAULT_MIN_LAYER_SIZE,
    LayerChoice,
    choose_cam_layer,
    named_cam_layer,
)
from voxplain.models.networks import CNN, VGGGAP, ConvNet

DEMO_GRID = (31, 37, 31)


def test_the_default_minimum_is_four_voxels() -> None:
    assert DEFAULT_MIN_LAYER_SIZE == 4


def test_the_deepest_activation_keeping_four_voxels_per_axis_is_chosen() -> None:
    """Blocks [conv + BN + LeakyReLU, max-pool 2 (ceil)]: the activations of blocks 0..4 are
    31x37x31, 16x19x16, 8x10x8, 4x5x4, 2x3x2; the pooled 1x2x1 output is not activated."""
    model = CNN(DEMO_GRID, channels=[4] * 5)
    assert choose_cam_layer(model, DEMO_GRID, 1) == LayerChoice("features.3.0.2", (4, 5, 4), False)
    assert choose_cam_layer(model, DEMO_GRID, 1, min_size=2) == \
        LayerChoice("features.4.0.2", (2, 3, 2), False)
    assert choose_cam_layer(model, DEMO_GRID, 1, min_size=1).name == "features.4.0.2"
    assert choose_cam_layer(model, DEMO_GRID, 1, min_size=9) == \
        LayerChoice("features.1.0.2", (16, 19, 16), False)


def test_on_a_grid_too_small_for_the_minimum_the_largest_candidate_is_marked_coarse() -> None:
    model = CNN((3, 3, 3), channels=[2, 2])  # activations 3x3x3, 2x2x2
    assert choose_cam_layer(model, (3, 3, 3), 1) == LayerChoice("features.0.0.2", (3, 3, 3), True)
    flat = CNN((1, 20), channels=[2, 2])  # activations 1x20, 1x10: a tie on the smallest axis
    assert choose_cam_layer(flat, (1, 20), 1) == LayerChoice("features.1.0.2", (1, 10), True)


def test_the_rule_works_in_2d_and_on_the_gap_input_of_vgg_gap() -> None:
    convnet = ConvNet((32, 32), channels=[4, 8, 8, 8])  # strides 1, 2, 2, 2: 32, 16, 8, 4
    assert choose_cam_layer(convnet, (32, 32), 1) == LayerChoice("features.3.2", (4, 4), False)
    assert choose_cam_layer(convnet, (32, 32), 1, min_size=5).name == "features.2.2"
    vgg = VGGGAP((32, 32), in_channels=2, channels=[4, 8, 8])  # GAP: any input shape runs
    assert choose_cam_layer(vgg, (32, 32), 2) == LayerChoice("features.2.1.2", (8, 8), False)
    assert choose_cam_layer(vgg, (8, 8), 2) == LayerChoice("features.1.1.2", (4, 4), False)


class ResidualBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + x)`` with one ReLU instance called twice (as in ResNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = ResidualBlock(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_reused_activation_is_skipped_for_the_block_that_returns_its_output() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    assert choose_cam_layer(model, (8, 8), 1) == LayerChoice("block", (8, 8), False)
    with pytest.raises(ValueError, match=r"'block\.relu'.*runs 2 times.*candidates: block"):
        named_cam_layer(model, "block.relu", (8, 8), 1)
    with pytest.raises(ValueError, match="runs 2 times"):
        GradCAM(model, layer="block.relu").explain(torch.rand(1, 1, 8, 8), 0)
    x = torch.rand(3, 1, 8, 8)
    maps = GradCAM(model, normalise=False).explain(x, [0, 1, 0])
    theirs = LayerGradCam(model, model.block).attribute(x, [0, 1, 0], relu_attributions=True)
    theirs = theirs.detach()
    assert float(theirs.max()) > 0
    assert torch.allclose(maps, theirs, atol=1e-6)


class FunctionalNet(nn.Module):
    """Activations applied with ``torch.nn.functional``: no activation module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_without_activation_modules_the_rule_falls_back_to_convolution_outputs() -> None:
    model = FunctionalNet()  # conv outputs 16x16, 8x8, 4x4
    assert choose_cam_layer(model, (16, 16), 1) == LayerChoice("conv3", (4, 4), False)
    assert choose_cam_layer(model, (16, 16), 1, min_size=5) == LayerChoice("conv2", (8, 8), False)


def test_a_named_layer_reports_its_shape_and_whether_it_is_coarse() -> None:
    model = CNN(DEMO_GRID, channels=[4] * 5)
    assert named_cam_layer(model, "features.4.0.2", DEMO_GRID, 1) == \
        LayerChoice("features.4.0.2", (2, 3, 2), True)
    assert named_cam_layer(model, "features.4.0.2", DEMO_GRID, 1, min_size=2).coarse is False
    assert named_cam_layer(model, "features.0.0.0", DEMO_GRID, 1) == \
        LayerChoice("features.0.0.0", DEMO_GRID, False)
    assert named_cam_layer(model, "features.2", DEMO_GRID, 1).shape == (4, 5, 4)  # a container
    with pytest.raises(ValueError, match=r"'features\.9' is not a module of CNN"):
        named_cam_layer(model, "features.9", DEMO_GRID, 1)
    with pytest.raises(ValueError, match=r"outputs shape \(1, 2\), not a feature map"):
        named_cam_layer(model, "classifier.1", DEMO_GRID, 1)


def test_the_dry_pass_restores_every_mode_leaves_no_hooks_and_no_statistics() -> None:
    model = CNN((8, 8, 8), channels=[2, 2]).double()
    model.train()
    model.features[0].eval()  # a mixed state must come back as it was
    modes = {name: module.training for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert choose_cam_layer(model, (8, 8, 8), 1).name == "features.1.0.2"  # runs in float64
    assert {name: module.training for name, module in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # eval mode: batch-norm statistics untouched
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
