"""CAM, Grad-CAM and Grad-CAM++ (paper 2, 2.3), HiResCAM and LayerCAM against independent
implementations and identities, at the default layer (:mod:`voxplain.explain.layers`) unless a
test names one.

Oracles: Captum's ``LayerGradCam`` and ``LayerGradientXActivation`` (+
``LayerAttribution.interpolate``), MONAI's ``GradCAM`` / ``GradCAMpp``, one sample at a time
(MONAI scores ``logits[:, class_idx].squeeze()`` and mixes the samples of a batch in Grad-CAM++).
MONAI registers hooks it never removes, so every oracle gets its own deep copy of the model.
MONAI's default post-processing maps (min, max) to (1, 0), i.e. it *inverts* the map (Pearson -1
with any correct map): we pass the identity and normalise both maps with the same function
(division by the maximum) before comparing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize import GradCAMpp as MonaiGradCAMpp
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.explain.cam import CAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from voxplain.explain.layers import ACTIVATION_TYPES
from voxplain.explain.methods import METHODS
from voxplain.explain.methods import explainer as build_explainer
from voxplain.models.networks import CNN, VGGGAP, ConvNet

MODES = {2: "bilinear", 3: "trilinear"}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.detach().flatten().numpy(), b.detach().flatten().numpy())[0, 1])


def by_max(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).amax(1).view(-1, *[1] * (maps.ndim - 1))


def model_and_inputs(kind: str, seed: int = 0, samples: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """Small untrained networks (BN statistics perturbed so eval mode is not the identity)."""
    torch.manual_seed(seed)
    model = {
        "vgg_gap_3d": lambda: VGGGAP((16, 20, 16), channels=[4, 8, 8]),
        "cnn_3d": lambda: CNN((16, 20, 16), channels=[4, 8, 8]),
        "vgg_gap_2d": lambda: VGGGAP((32, 32), channels=[4, 8, 8]),
        "convnet_2d": lambda: ConvNet((32, 32), channels=[4, 8, 8, 8]),
    }[kind]()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    shape = (16, 20, 16) if kind.endswith("3d") else (32, 32)
    return model.eval(), torch.rand(samples, 1, *shape)


def nonzero_targets(explainer: Explainer, x: torch.Tensor, classes: int = 2) -> list[int]:
    """Per sample, the first class whose map is not all zero (a zero map makes Pearson undefined);
    fails if there is none, so no comparison is silently skipped."""
    peaks = torch.stack([explainer.explain(x, c).flatten(1).amax(1) for c in range(classes)], 1)
    assert bool((peaks > 0).any(1).all()), "a sample has all-zero maps for every class"
    return [int((row > 0).nonzero()[0]) for row in peaks]


def default_layer(explainer, x: torch.Tensor) -> str:
    """The layer ``explainer`` reads for ``x`` by default, checked to be an activation (the rule's
    choice on every test network), so the oracles are compared at the new default."""
    name = explainer.resolve_layer(tuple(x.shape[2:]), x.shape[1]).name
    assert isinstance(explainer.model.get_submodule(name), ACTIVATION_TYPES), name
    return name


KINDS = ["vgg_gap_3d", "cnn_3d", "vgg_gap_2d", "convnet_2d"]
GAP_INPUT = "features.2.1.2"  # model_and_inputs' VGGGAP: the last ReLU, feeding GAP directly


@pytest.mark.parametrize("kind", KINDS)
def test_grad_cam_agrees_with_captum_layer_grad_cam_and_monai(kind: str) -> None:
    model, x = model_and_inputs(kind, samples=2)
    ours = GradCAM(model, normalise=False)
    layer = default_layer(ours, x)
    targets = nonzero_targets(ours, x)
    captum_model = copy.deepcopy(model)
    captum = LayerGradCam(captum_model, dict(captum_model.named_modules())[layer])
    monai = MonaiGradCAM(copy.deepcopy(model), target_layers=layer, postprocessing=lambda m: m)
    for i, target in enumerate(targets):
        mine = by_max(ours.explain(x[i:i + 1], target))
        theirs = captum.attribute(x[i:i + 1], target, relu_attributions=True).detach()
        theirs = by_max(LayerAttribution.interpolate(theirs, x.shape[2:], MODES[x.ndim - 2]))
        assert pearson(mine, theirs) >= 0.99
        assert torch.allclose(mine, theirs, atol=1e-4)
        theirs = by_max(monai(x[i:i + 1], class_idx=target))
        assert pearson(mine, theirs) >= 0.99
        assert torch.allclose(mine, theirs, atol=1e-4)


class MonaiGradCAMppPaperDenominator(MonaiGradCAMpp):
    """MONAI's Grad-CAM++ (its hooks, exp score, upsampling) with one change: the denominator of
    alpha as in paper 2 eq. 2 / Chattopadhyay et al. eq. 19, ``(sum_ab A_ab) g_ij^3``, instead of
    MONAI's ``sum_ab A_ab g_ab^3``. Everything else is MONAI's ``compute_map`` verbatim."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        b, c, *spatial = grad.shape
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acti.view(b, c, -1).sum(-1).view(b, c, *[1] * len(spatial)) * grad.pow(3)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        relu_grad = F.relu(self.nn_module.score.exp() * grad)
        weights = (alpha * relu_grad).view(b, c, -1).sum(-1).view(b, c, *[1] * len(spatial))
        return F.relu((weights * acti).sum(1, keepdim=True))


@pytest.mark.parametrize("kind", KINDS)
def test_grad_cam_pp_agrees_with_monai_grad_cam_pp(kind: str) -> None:
    """Against MONAI with the paper's denominator on every net. Against MONAI as shipped only on
    the GAP nets: the default layer of VGGGAP is its last ReLU, which feeds GAP directly, so the
    gradient is one constant per channel and the two denominators coincide; behind max-pool +
    flatten + linear (CNN, ConvNet) the gradient varies over space and MONAI's convention gives a
    different map."""
    model, x = model_and_inputs(kind, samples=2)
    ours = GradCAMPlusPlus(model, normalise=False)
    layer = default_layer(ours, x)
    targets = nonzero_targets(ours, x)
    paper = MonaiGradCAMppPaperDenominator(copy.deepcopy(model), target_layers=layer,
                                           postprocessing=lambda m: m)
    shipped = MonaiGradCAMpp(copy.deepcopy(model), target_layers=layer, postprocessing=lambda m: m)
    for i, target in enumerate(targets):
        mine = by_max(ours.explain(x[i:i + 1], target))
        assert pearson(mine, by_max(paper(x[i:i + 1], class_idx=target))) >= 0.999
        if kind.startswith("vgg_gap"):
            assert pearson(mine, by_max(shipped(x[i:i + 1], class_idx=target))) >= 0.999


@pytest.mark.parametrize("layer_name", ["features.1.0.0", "features.1.0.2"])  # last conv, its ReLU
def test_grad_cam_pp_is_eq_2_with_derivatives_from_autograd(layer_name: str) -> None:
    """Eq. 2 computed literally, in float64: d2Y/dA^2 and d3Y/dA^3 of Y = exp(y^c) element by
    element by repeated autograd, at the last conv (and its activation) of a small 3D CNN, with
    the paper's denominator (sum_ab A_ab) * d3Y/dA_ij^3. No closed form, so this checks ours and
    the exp(y) cancellation."""
    torch.manual_seed(1)
    model = CNN((6, 6, 6), channels=[2, 2]).double().eval()
    x = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64)
    layer = model.get_submodule(layer_name)
    target = 1
    captured = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    model(x)
    handle.remove()
    activations = captured[0].clone().requires_grad_(True)
    handle = layer.register_forward_hook(lambda m, i, o: activations)
    try:
        score = torch.exp(model(x)[0, target])
        first = torch.autograd.grad(score, activations, create_graph=True)[0]
        second, third = torch.zeros_like(first).flatten(), torch.zeros_like(first).flatten()
        for j in range(first.numel()):
            d2 = torch.autograd.grad(first.flatten()[j], activations, create_graph=True)[0].flatten()[j]
            second[j] = d2
            third[j] = torch.autograd.grad(d2, activations, retain_graph=True)[0].flatten()[j]
    finally:
        handle.remove()
    second, third, a = second.view_as(first), third.view_as(first), activations.detach()
    denominator = 2 * second + a.sum((2, 3, 4), keepdim=True) * third
    alpha = torch.where(denominator != 0, second / torch.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * F.relu(first.detach())).sum((2, 3, 4))
    expected = F.relu((weights[:, :, None, None, None] * a).sum(1, keepdim=True)).detach()
    expected = by_max(F.interpolate(expected, size=(6, 6, 6), mode="trilinear", align_corners=False))
    assert float(expected.max()) > 0
    mine = GradCAMPlusPlus(model, layer=layer_name).explain(x, target)
    assert torch.allclose(mine, expected, atol=1e-10)


@pytest.mark.parametrize("method", [CAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM])
@pytest.mark.parametrize("kind", ["vgg_gap_3d", "vgg_gap_2d"])
def test_batch_with_mixed_targets_equals_samples_one_at_a_time(method, kind: str) -> None:
    model, x = model_and_inputs(kind)
    targets = [0, 1, 1, 0]
    explainer = method(model, batch_size=4)
    batched = explainer.explain(x, targets)
    single = torch.cat([explainer.explain(x[i:i + 1], t) for i, t in enumerate(targets)])
    assert batched.shape == (4, 1, *x.shape[2:])
    assert torch.allclose(batched, single, atol=1e-6)
    assert not torch.allclose(explainer.explain(x, [1, 0, 0, 1]), batched)  # targets matter


def gap_directly_after_last_conv() -> tuple[nn.Module, torch.Tensor]:
    """VGGGAP whose last conv feeds GAP directly (its batch-norm and ReLU removed): there
    dy^c/dA_ij^k = W[c, k] / Z at every position, so Grad-CAM's weights are W[c, k] / Z and
    Grad-CAM = ReLU(sum_k W[c, k] A^k) / Z = CAM / Z exactly. With the ReLU kept between the
    conv and GAP, the gradient at the conv would be zero where the ReLU is closed and the
    identity would not hold at the conv layer."""
    model, x = model_and_inputs("vgg_gap_3d")
    last_unit = model.features[-1][-1]
    last_unit[1], last_unit[2] = nn.Identity(), nn.Identity()
    return model, x


def test_cam_equals_grad_cam_at_the_gap_layer_up_to_scale() -> None:
    model, x = gap_directly_after_last_conv()
    with torch.no_grad():
        voxels = model.features(x).shape[2:].numel()
    targets = [0, 1, 0, 1]
    cam = CAM(model, normalise=False).explain(x, targets)
    grad_cam = GradCAM(model, layer="features.2.1.0", normalise=False).explain(x, targets)
    assert float(cam.amin(dim=(1, 2, 3, 4)).min()) >= 0 and float(cam.flatten(1).amax(1).min()) > 0
    assert torch.allclose(grad_cam * voxels, cam, rtol=1e-4, atol=1e-6)
    assert torch.allclose(CAM(model).explain(x, targets),
                          GradCAM(model, layer="features.2.1.0").explain(x, targets), atol=1e-5)


def test_grad_cam_at_the_activated_gap_input_of_the_unmodified_vgg_gap_is_cam_over_z() -> None:
    """The unmodified VGGGAP: its last ReLU's output A feeds GAP and the linear layer directly,
    so dy^c/dA_ij^k = W[c, k] / Z at *every* position (the ReLU lies before A, not after it) and
    Grad-CAM = ReLU(sum_k W[c, k] / Z A^k) = CAM / Z exactly, the same factor for every sample.
    That layer is also the default one on this grid."""
    model, x = model_and_inputs("vgg_gap_3d")
    targets = [0, 1, 0, 1]
    grad_cam = GradCAM(model, normalise=False)
    assert default_layer(grad_cam, x) == GAP_INPUT
    with torch.no_grad():
        voxels = model.features(x).shape[2:].numel()
    cam = CAM(model, normalise=False).explain(x, targets)
    assert float(cam.flatten(1).amax(1).min()) > 0
    assert torch.allclose(grad_cam.explain(x, targets) * voxels, cam, rtol=1e-4, atol=1e-6)
    # at the last conv, before batch-norm and ReLU, the identity does not hold
    at_conv = GradCAM(model, layer="features.2.1.0", normalise=False).explain(x, targets)
    assert not torch.allclose(at_conv * voxels, cam, rtol=1e-2, atol=1e-3)


def test_cam_refuses_a_network_without_global_average_pooling() -> None:
    model, _ = model_and_inputs("cnn_3d")
    with pytest.raises(ValueError, match="global average pooling.*grad_cam"):
        CAM(model)


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM])
def test_unknown_layer_lists_the_valid_layers(method) -> None:
    model, _ = model_and_inputs("vgg_gap_3d")
    listed = (r"valid layers: features\.0\.0\.0, features\.0\.1\.0, .*\(convolutions\); "
              r"features\.0\.0\.2, .*\(activations\)")
    with pytest.raises(ValueError, match=listed):
        method(model, layer="features.9")


def test_a_layer_that_is_not_a_feature_map_is_refused_with_the_candidates() -> None:
    model, x = model_and_inputs("vgg_gap_3d")
    explainer = GradCAM(model, layer="classifier.1")
    with pytest.raises(ValueError, match=r"outputs shape \(1, 2\), not a feature map.*"
                                         r"candidates: features\.0\.0\.2, features\.0\.1\.2"):
        explainer.explain(x, 0)
    assert all(not module._forward_hooks for module in model.modules())


def test_the_layer_read_is_recorded_and_can_be_resolved_before_explaining() -> None:
    model, x = model_and_inputs("cnn_3d")
    explainer = GradCAM(model)
    assert explainer.layer_name is None
    choice = explainer.resolve_layer(x.shape[2:], x.shape[1])
    assert (choice.name, choice.shape, choice.coarse) == ("features.2.0.2", (4, 5, 4), False)
    assert (explainer.layer_name, explainer.layer_shape, explainer.layer_coarse) == \
        ("features.2.0.2", (4, 5, 4), False)
    finer = GradCAM(model, min_layer_size=5)
    finer.explain(x, 0)
    assert (finer.layer_name, finer.layer_shape, finer.layer_coarse) == \
        ("features.1.0.2", (8, 10, 8), False)
    given = GradCAM(model, layer="features.2.0.0")
    given.explain(x, 0)
    assert (given.layer_name, given.layer_shape, given.layer_coarse) == \
        ("features.2.0.0", (4, 5, 4), False)
    with pytest.raises(ValueError, match="at least 1 voxel"):
        GradCAM(model, min_layer_size=0)


@pytest.mark.parametrize("kind", ["cnn_3d", "vgg_gap_2d"])
def test_grad_cam_at_an_earlier_layer_agrees_with_captum(kind: str) -> None:
    model, x = model_and_inputs(kind)
    layer = "features.1.0.0"
    captum = LayerGradCam(model, dict(model.named_modules())[layer])
    maps = GradCAM(model, layer=layer).explain(x, [0, 1, 0, 1])
    assert maps.shape == (4, 1, *x.shape[2:])
    for i, target in enumerate([0, 1, 0, 1]):
        theirs = captum.attribute(x[i:i + 1], target, relu_attributions=True).detach()
        assert theirs.shape[2:] != x.shape[2:]  # a coarser layer: upsampling is exercised
        theirs = LayerAttribution.interpolate(theirs, x.shape[2:], MODES[x.ndim - 2])
        assert float(theirs.max()) > 0
        assert torch.allclose(maps[i:i + 1], by_max(theirs), atol=1e-4)


def test_grad_cam_pp_stays_finite_with_huge_logits() -> None:
    """Last linear x 1e4: logits of order 1e3, exp() overflows float32 (and float64), and
    MONAI's exp(score) * grad gives inf/NaN. Ours never forms exp(y^c) (see the class docstring)."""
    model, x = model_and_inputs("vgg_gap_3d")
    with torch.no_grad():
        model.classifier[-1].weight.mul_(1e4)
        model.classifier[-1].bias.mul_(1e4)
        assert float(model(x).abs().max()) > 100
    for normalise in (True, False):
        maps = GradCAMPlusPlus(model, normalise=normalise).explain(x, [0, 1, 0, 1])
        assert torch.isfinite(maps).all() and float(maps.max()) > 0


def test_grad_cam_pp_is_unchanged_by_a_logit_offset() -> None:
    """exp(y + c) = e^c exp(y): eq. 2's map only scales, so the normalised map of a model whose
    target logit is shifted by 1e4 (far beyond exp's range) must equal the unshifted one."""
    model, x = model_and_inputs("cnn_3d", seed=1)
    reference = GradCAMPlusPlus(model).explain(x, 1)
    with torch.no_grad():
        model.classifier[-1].bias[1] += 1e4
    shifted = GradCAMPlusPlus(model).explain(x, 1)
    assert float(reference.max()) > 0
    assert torch.allclose(shifted, reference, atol=1e-6)


@pytest.mark.parametrize("method", [CAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM])
def test_no_hooks_left_no_parameter_gradients_and_requires_grad_untouched(method) -> None:
    model, x = model_and_inputs("vgg_gap_3d")
    model.features[0].requires_grad_(False)  # a partly frozen model must stay partly frozen
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    method(model).explain(x, [0, 1, 1, 0])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    with pytest.raises(ValueError, match="outside the model's 2 classes"):
        method(model).explain(x, 5)
    assert all(not module._forward_hooks for module in model.modules())


def test_grad_cam_works_on_a_fully_frozen_model() -> None:
    model, x = model_and_inputs("vgg_gap_2d")
    reference = GradCAM(model).explain(x, 1)
    model.requires_grad_(False)
    assert torch.equal(GradCAM(model).explain(x, 1), reference)


def test_hires_cam_and_layer_cam_are_registered_as_unsigned_methods() -> None:
    model, _ = model_and_inputs("cnn_3d")
    for name, method in (("hires_cam", HiResCAM), ("layer_cam", LayerCAM)):
        built = build_explainer(name, model, layer="features.1.0.2", min_layer_size=2)
        assert type(built) is method and METHODS[name] is method and not method.signed
        assert (built.layer, built.min_layer_size) == ("features.1.0.2", 2)


@pytest.mark.parametrize("kind", KINDS)
def test_hires_cam_agrees_with_captum_gradient_times_activation_summed_over_channels(kind: str):
    model, x = model_and_inputs(kind)
    ours = HiResCAM(model, normalise=False)
    layer = default_layer(ours, x)
    targets = nonzero_targets(ours, x)
    captum_model = copy.deepcopy(model)
    captum = LayerGradientXActivation(captum_model, captum_model.get_submodule(layer))
    theirs = F.relu(captum.attribute(x, target=targets).detach().sum(1, keepdim=True))
    theirs = by_max(LayerAttribution.interpolate(theirs, x.shape[2:], MODES[x.ndim - 2]))
    assert torch.allclose(by_max(ours.explain(x, targets)), theirs, atol=1e-4)


def test_hires_cam_equals_grad_cam_where_the_layer_feeds_global_average_pooling() -> None:
    """At VGGGAP's GAP input dy^c/dA^k = W[c, k] / Z everywhere, so weighting each position by its
    gradient or by the channel's mean gradient is the same; one block earlier it is not."""
    model, x = model_and_inputs("vgg_gap_3d")
    targets = [0, 1, 0, 1]
    hires = HiResCAM(model, layer=GAP_INPUT).explain(x, targets)
    assert float(hires.flatten(1).amax(1).min()) > 0
    assert torch.allclose(hires, GradCAM(model, layer=GAP_INPUT).explain(x, targets), atol=1e-5)
    earlier = "features.1.1.2"
    assert not torch.allclose(HiResCAM(model, layer=earlier).explain(x, targets),
                              GradCAM(model, layer=earlier).explain(x, targets), atol=1e-2)


def linear_head_network(spatial_dims: int,
                        positive_head: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """conv 3 -> ReLU -> flatten -> linear, in float64, with three 4^d inputs. At the ReLU's output
    A, ``y = W flatten(A) + b``, so dy^c/dA = W[c] reshaped to (K, *spatial), whatever A; with
    ``positive_head`` every such gradient is non-negative."""
    torch.manual_seed(2)
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims](1, 3, 3, padding=1)
    head = nn.Linear(3 * 4 ** spatial_dims, 2)
    if positive_head:
        head.weight.data.abs_()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).double().eval()
    return model, torch.rand(3, 1, *(4,) * spatial_dims, dtype=torch.float64)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hires_cam_and_layer_cam_by_hand_on_a_conv_relu_linear_network(spatial_dims: int) -> None:
    """HiResCAM = ReLU(sum_k g^k A^k) and LayerCAM = ReLU(sum_k ReLU(g^k) A^k) with A and g written
    out from the parameters (no hooks, no autograd); the layer is the default one, the ReLU, on
    the input grid, so no upsampling is involved."""
    model, x = linear_head_network(spatial_dims)
    conv, head = model[0], model[3]
    convolve = {2: F.conv2d, 3: F.conv3d}[spatial_dims]
    activations = F.relu(convolve(x, conv.weight, conv.bias, padding=1))
    targets = [0, 1, 1]
    gradients = head.weight[targets].view(len(targets), 3, *x.shape[2:])
    hires = F.relu((gradients * activations).sum(1, keepdim=True)).detach()
    layer_cam = F.relu((F.relu(gradients) * activations).sum(1, keepdim=True)).detach()
    assert float(hires.flatten(1).amax(1).min()) > 0 and not torch.allclose(hires, layer_cam)
    for method, expected in ((HiResCAM, hires), (LayerCAM, layer_cam)):
        explainer = method(model, normalise=False)
        assert torch.allclose(explainer.explain(x, targets), expected, rtol=0, atol=1e-12)
        assert explainer.layer_name == "1"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_layer_cam_equals_hires_cam_when_no_gradient_at_the_layer_is_negative(spatial_dims: int):
    targets = [0, 1, 1]
    positive, x = linear_head_network(spatial_dims, positive_head=True)
    assert torch.equal(LayerCAM(positive).explain(x, targets),
                       HiResCAM(positive).explain(x, targets))
    mixed, _ = linear_head_network(spatial_dims)
    assert not torch.allclose(LayerCAM(mixed).explain(x, targets),
                              HiResCAM(mixed).explain(x, targets), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_maps_equal_cpu_maps() -> None:
    model, x = model_and_inputs("vgg_gap_3d")
    for method in (CAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM):
        cpu = method(model).explain(x, [0, 1, 1, 0])
        gpu = method(copy.deepcopy(model).cuda()).explain(x, [0, 1, 1, 0])
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hires_cam_from_a_baseline_is_captum_layer_integrated_gradients_from_it(spatial_dims):
    """Behind a linear head the gradient at the layer is the same all along the path, so layer
    integrated gradients from a baseline b, summed over channels, is sum_k g^k (A^k(x) - A^k(b))
    exactly: HiResCAM with that baseline must be its positive part (an independent oracle:
    Captum integrates along the input path, we subtract the baseline's feature maps)."""
    from captum.attr import LayerIntegratedGradients

    model, x = linear_head_network(spatial_dims)
    baseline = torch.rand(1, *x.shape[2:], dtype=torch.float64)  # one sample (C, *spatial)
    targets = [0, 1, 1]
    ours = HiResCAM(model, normalise=False, baseline=baseline).explain(x, targets)
    captum = LayerIntegratedGradients(model, model[1]).attribute(
        x, baselines=baseline[None].expand_as(x), target=targets, n_steps=8)
    expected = F.relu(captum.detach().sum(1, keepdim=True))
    assert float(expected.flatten(1).amax(1).min()) > 0
    assert torch.allclose(ours, expected, rtol=0, atol=1e-8)  # Captum: quadrature round-off
    # and not the map without a baseline
    assert not torch.allclose(ours, HiResCAM(model, normalise=False).explain(x, targets),
                              atol=1e-3)


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM])
def test_a_cam_from_a_baseline_is_zero_where_the_session_equals_it_and_grad_cam_is_captum_s(
        method) -> None:
    """Every CAM weights A(x) - A(b): a session equal to the baseline gets an all-zero map, a
    constant baseline is the same as that constant image. At the GAP input of VGGGAP the
    gradient is W[c]/Z everywhere, so Grad-CAM from b equals Captum's layer integrated gradients
    from b, summed over channels (positive part, upsampled)."""
    from captum.attr import LayerIntegratedGradients

    model, x = model_and_inputs("vgg_gap_3d")
    targets = [0, 1, 0, 1]
    same = method(model, baseline=x[0], layer=GAP_INPUT).explain(x[:1], targets[:1])
    assert float(same.abs().max()) == 0.0
    constant = method(model, baseline=0.3, layer=GAP_INPUT).explain(x, targets)
    image = method(model, baseline=torch.full_like(x[0], 0.3), layer=GAP_INPUT).explain(x, targets)
    assert torch.equal(constant, image)
    if method is GradCAM:
        baseline = torch.rand_like(x[0])
        ours = GradCAM(model, baseline=baseline, layer=GAP_INPUT, normalise=False).explain(
            x, targets)
        captum_model = copy.deepcopy(model)
        theirs = LayerIntegratedGradients(captum_model, captum_model.get_submodule(GAP_INPUT)
                                          ).attribute(x, baselines=baseline[None].expand_as(x),
                                                      target=targets, n_steps=8)
        theirs = F.relu(theirs.detach().sum(1, keepdim=True))
        theirs = LayerAttribution.interpolate(theirs, x.shape[2:], MODES[3])
        # Grad-CAM's weights are the mean gradient, W[c]/Z; the layer IG terms carry 1/Z too
        assert float(theirs.flatten(1).amax(1).min()) > 0
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_a_baseline_of_the_wrong_shape_is_refused() -> None:
    model, x = model_and_inputs("cnn_3d")
    with pytest.raises(ValueError, match=r"baseline shape \(1, 8, 8, 8\) does not match one sample"):
        GradCAM(model, baseline=torch.zeros(1, 8, 8, 8)).explain(x, [0, 1, 0, 1])
