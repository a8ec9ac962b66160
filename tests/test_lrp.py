"""LRP (epsilon rule) and Deep Taylor (z+ rule) with Captum's LRP on our 2D and 3D networks:
batch-norm folding, conservation, LRP-0 = gradient x input, z+ positivity, per-sample targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from voxplain.explain.lrp import DeepTaylor, EpsilonLRP
from voxplain.models.folding import fold_batch_norm
from voxplain.models.networks import CNN, VGGGAP, ConvNet

SHAPES = {2: (12, 12), 3: (8, 8, 8)}


def network(kind: str, spatial_dims: int, seed: int = 0) -> nn.Module:
    """A tiny network whose batch-norms have non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    shape = SHAPES[spatial_dims]
    model = {"cnn": lambda: CNN(shape, channels=[2, 4]),
             "convnet": lambda: ConvNet(shape, channels=[2, 4, 4]),
             "vgg_gap": lambda: VGGGAP(shape, channels=[2, 4], convs_per_block=[2])}[kind]()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def images(n: int, spatial_dims: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, *SHAPES[spatial_dims], generator=torch.Generator().manual_seed(seed))


def without_biases(model: nn.Module) -> nn.Module:
    """Zero every bias, and the batch-norm shifts, so that the folded network has no bias."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def target_logits(model: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(len(x)), torch.tensor(targets)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["cnn", "convnet", "vgg_gap"])
def test_folding_batch_norm_keeps_the_outputs_in_eval_mode(kind, spatial_dims):
    model, x = network(kind, spatial_dims), images(4, spatial_dims)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    folded = fold_batch_norm(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(module, _BatchNorm) for module in folded.modules())
    # the model itself is untouched
    assert any(isinstance(module, _BatchNorm) for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_folding_a_convolution_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, bias=False), nn.BatchNorm3d(3)).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.rand(2, 1, 5, 5, 5)
    torch.testing.assert_close(fold_batch_norm(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_folding_refuses_batch_norm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_batch_norm(model)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["cnn", "convnet", "vgg_gap"])
def test_lrp_epsilon_conserves_relevance_on_a_bias_free_network(kind, spatial_dims):
    """Bach et al. 2015: with epsilon -> 0 and no bias, the relevance of the input voxels sums to
    the target logit."""
    model, x, targets = without_biases(network(kind, spatial_dims)), images(3, spatial_dims), [0, 1, 0]
    maps = EpsilonLRP(model, epsilon=1e-9).explain(x, targets)
    assert maps.shape == (3, 1, *SHAPES[spatial_dims])
    torch.testing.assert_close(maps.flatten(1).sum(1), target_logits(model, x, targets),
                               rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "vgg_gap"])
def test_lrp_zero_equals_gradient_times_input(kind):
    """Ancona et al. 2018 / Montavon et al. 2019: on piecewise-linear networks (ReLU, LeakyReLU,
    max- and average-pooling, biases included) LRP-0 is gradient x input."""
    model, x, targets = network(kind, 3), images(2, 3), [1, 0]
    inputs = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(inputs)[torch.arange(2), torch.tensor(targets)].sum(),
                                      inputs)
    maps = EpsilonLRP(model, epsilon=1e-9).explain(x, targets)
    torch.testing.assert_close(maps, gradient * x, rtol=1e-3, atol=1e-6)


def test_a_larger_epsilon_absorbs_relevance():
    model, x = without_biases(network("convnet", 2)), images(2, 2)
    logits = target_logits(model, x, [1, 1]).abs()
    exact = EpsilonLRP(model, epsilon=1e-9).explain(x, 1).flatten(1).sum(1).abs()
    absorbed = EpsilonLRP(model, epsilon=10.0).explain(x, 1).flatten(1).sum(1).abs()
    torch.testing.assert_close(exact, logits, rtol=1e-3, atol=1e-6)
    assert (absorbed < 0.9 * logits).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["convnet", "vgg_gap"])
def test_deep_taylor_z_plus_is_non_negative_for_non_negative_inputs(kind, spatial_dims):
    """Montavon et al. 2017: on a ReLU network with non-negative inputs the z+ rule propagates
    only non-negative relevance (for a positive target logit)."""
    model, x = network(kind, spatial_dims), images(3, spatial_dims)
    with torch.no_grad():
        model.classifier[-1].bias.fill_(5.0)  # positive target logits
    assert (target_logits(model, x, [0, 1, 1]) > 0).all()
    maps = DeepTaylor(model).explain(x, [0, 1, 1])
    assert (maps >= 0).all()
    assert (maps > 0).any()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["convnet", "vgg_gap"])
def test_deep_taylor_conserves_relevance_on_a_bias_free_relu_network(kind, spatial_dims):
    """Without biases a neuron that is active has a positive z+ denominator, so the z+ rule loses
    no relevance: the map sums to the target logit (made positive by positive output weights)."""
    model, x = without_biases(network(kind, spatial_dims)), images(3, spatial_dims)
    with torch.no_grad():
        model.classifier[-1].weight[0].abs_()
    logits = target_logits(model, x, [0, 0, 0])
    assert (logits > 0).all()
    maps = DeepTaylor(model).explain(x, 0)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.flatten(1).sum(1), logits, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", [EpsilonLRP, DeepTaylor])
def test_mixed_targets_in_one_batch_equal_single_sample_results(method):
    model, x, targets = network("cnn", 3), images(3, 3), [1, 0, 1]
    explainer = method(model, batch_size=3)
    batched = explainer.explain(x, targets)
    # float32 convolutions of a batch of 3 and of 1 take different kernels (oneDNN picks by
    # shape and CPU): the z+ rule's divisions amplify their rounding to ~3e-4 relative on some
    # machines; a wrong target per sample changes the map entirely (last assertion)
    scale = batched.abs().max().item()
    for i, target in enumerate(targets):
        torch.testing.assert_close(batched[i:i + 1], explainer.explain(x[i:i + 1], target),
                                   rtol=1e-3, atol=1e-3 * scale)
    assert not torch.allclose(explainer.explain(x[:1], 0), explainer.explain(x[:1], 1))


def test_lrp_leaves_the_model_unchanged():
    model, x = network("vgg_gap", 2), images(2, 2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    outputs = model(x)
    DeepTaylor(model).explain(x, 0)
    EpsilonLRP(model).explain(x, 1)
    assert not any(hasattr(module, "rule") for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(model(x), outputs)


def test_a_module_without_rule_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten(), nn.Linear(2 * 36, 2))
    with pytest.raises(ValueError, match=r"no LRP rule for module '1' \(Hardswish\)"):
        EpsilonLRP(model)


def test_epsilon_must_be_positive():
    with pytest.raises(ValueError, match="epsilon must be positive"):
        EpsilonLRP(network("cnn", 2), epsilon=0.0)
