"""CAM, Grad-CAM and Grad-CAM++ (paper 2, 2.3) against independent implementations and identities.

Oracles: Captum's ``LayerGradCam`` (+ ``LayerAttribution.interpolate``) and MONAI's ``GradCAM`` /
``GradCAMpp``, one sample at a time (MONAI scores ``logits[:, class_idx].squeeze()`` and mixes the
samples of a batch in Grad-CAM++). MONAI registers hooks it never removes, so every oracle gets its
own deep copy of the model. MONAI's default post-processing maps (min, max) to (1, 0), i.e. it
*inverts* the map (Pearson -1 with any correct map): we pass the identity and normalise both maps
with the same function (division by the maximum) before comparing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from monai.visualize import GradCAM as MonaiGradCAM
from monai.visualize import GradCAMpp as MonaiGradCAMpp
from torch import nn

from voxplain.explain.api import Explainer, last_conv_name
from voxplain.explain.cam import CAM, GradCAM, GradCAMPlusPlus
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


KINDS = ["vgg_gap_3d", "cnn_3d", "vgg_gap_2d", "convnet_2d"]


@pytest.mark.parametrize("kind", KINDS)
def test_grad_cam_agrees_with_captum_layer_grad_cam_and_monai(kind: str) -> None:
    model, x = model_and_inputs(kind, samples=2)
    layer = last_conv_name(model)
    ours = GradCAM(model, normalise=False)
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
    the GAP nets: after the last conv of VGGGAP come batch-norm, ReLU and GAP, so the gradient is
    one constant per channel wherever the ReLU is open (zero elsewhere), and the two denominators
    nearly coincide; behind max-pool + flatten + linear (CNN, ConvNet) the gradient varies over
    space and MONAI's convention gives a different map (Pearson about 0.7 on cnn_3d)."""
    model, x = model_and_inputs(kind, samples=2)
    layer = last_conv_name(model)
    ours = GradCAMPlusPlus(model, normalise=False)
    targets = nonzero_targets(ours, x)
    paper = MonaiGradCAMppPaperDenominator(copy.deepcopy(model), target_layers=layer,
                                           postprocessing=lambda m: m)
    shipped = MonaiGradCAMpp(copy.deepcopy(model), target_layers=layer, postprocessing=lambda m: m)
    for i, target in enumerate(targets):
        mine = by_max(ours.explain(x[i:i + 1], target))
        assert pearson(mine, by_max(paper(x[i:i + 1], class_idx=target))) >= 0.999
        if kind.startswith("vgg_gap"):
            assert pearson(mine, by_max(shipped(x[i:i + 1], class_idx=target))) >= 0.99


def test_grad_cam_pp_is_eq_2_with_derivatives_from_autograd() -> None:
    """Eq. 2 computed literally, in float64: d2Y/dA^2 and d3Y/dA^3 of Y = exp(y^c) element by
    element by repeated autograd, at the last conv of a small 3D CNN, with the paper's denominator
    (sum_ab A_ab) * d3Y/dA_ij^3. No closed form, so this checks ours and the exp(y) cancellation."""
    torch.manual_seed(1)
    model = CNN((6, 6, 6), channels=[2, 2]).double().eval()
    x = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64)
    layer = dict(model.named_modules())[last_conv_name(model)]
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
    mine = GradCAMPlusPlus(model).explain(x, target)
    assert torch.allclose(mine, expected, atol=1e-10)


@pytest.mark.parametrize("method", [CAM, GradCAM, GradCAMPlusPlus])
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
    grad_cam = GradCAM(model, normalise=False).explain(x, targets)
    assert float(cam.amin(dim=(1, 2, 3, 4)).min()) >= 0 and float(cam.flatten(1).amax(1).min()) > 0
    assert torch.allclose(grad_cam * voxels, cam, rtol=1e-4, atol=1e-6)
    assert torch.allclose(CAM(model).explain(x, targets), GradCAM(model).explain(x, targets), atol=1e-5)


def test_cam_refuses_a_network_without_global_average_pooling() -> None:
    model, _ = model_and_inputs("cnn_3d")
    with pytest.raises(ValueError, match="global average pooling.*grad_cam"):
        CAM(model)


def test_unknown_layer_lists_the_valid_layers() -> None:
    model, _ = model_and_inputs("vgg_gap_3d")
    with pytest.raises(ValueError, match=r"valid layers: features\.0\.0\.0, features\.0\.1\.0"):
        GradCAM(model, layer="classifier.1")


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


@pytest.mark.parametrize("method", [CAM, GradCAM, GradCAMPlusPlus])
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_maps_equal_cpu_maps() -> None:
    model, x = model_and_inputs("vgg_gap_3d")
    for method in (CAM, GradCAM, GradCAMPlusPlus):
        cpu = method(model).explain(x, [0, 1, 1, 0])
        gpu = method(copy.deepcopy(model).cuda()).explain(x, [0, 1, 1, 0])
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
