"""Batch-norm folding: the folded copy computes the same function with no batch-norm left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxplain.models.folding import fold_batch_norm
from voxplain.models.networks import CNN, VGGGAP, ConvNet


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running mean/var and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator))
    return model.eval()


@pytest.mark.parametrize("factory, shape", [
    (lambda s: CNN(s, channels=[4, 8], convs_per_block=[1, 2]), (12, 14, 10)),
    (lambda s: ConvNet(s, channels=[4, 8, 8, 8]), (16, 16)),
    (lambda s: VGGGAP(s, channels=[4, 8]), (10, 12, 8)),
])
def test_folded_model_computes_the_same_function_without_batch_norm(factory, shape):
    torch.manual_seed(0)
    model = _with_running_statistics(factory(shape).double())
    x = torch.randn(3, 1, *shape, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    for key, value in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_folding_keeps_frozen_parameters_frozen():
    model = _with_running_statistics(CNN((8, 8, 8), channels=[4], convs_per_block=[1]))
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in fold_batch_norm(model).parameters())
