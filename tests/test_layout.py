"""Channels-last layout for batched CPU convolutions: same function, other memory order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from voxplain.config import ModelConfig
from voxplain.models.folding import fold_batch_norm
from voxplain.models.layout import FORMATS, for_batches
from voxplain.models.registry import build_model

CPU = torch.device("cpu")


def _frozen(shape: list[int]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=shape, channels=[4, 8])).eval()
    return model.requires_grad_(False)


@pytest.mark.parametrize("shape", [[20, 24, 20], [32, 32]])
def test_channels_last_model_computes_the_same_outputs_and_input_gradients(shape):
    model = _frozen(shape)
    x = torch.rand(3, 1, *shape)
    fast = for_batches(fold_batch_norm(model), len(shape), len(x), CPU)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    outputs = [model(inputs[0]), fast(inputs[1])]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    for output in outputs:
        torch.softmax(output, 1)[:, 1].sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, atol=1e-6, rtol=1e-3)


def test_convolutions_run_channels_last():
    model = fold_batch_norm(_frozen([20, 24, 20]))
    fast = for_batches(model, 3, batch_size=4, device=CPU)
    seen = []
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs:  # a channels-last output is what oneDNN's channels-last kernels write
        conv.register_forward_hook(lambda module, args, output: seen.append(
            output.is_contiguous(memory_format=FORMATS[3]) and not output.is_contiguous()))
    fast(torch.rand(4, 1, 20, 24, 20))
    assert seen == [True] * len(convs)
    assert all(conv.weight.is_contiguous(memory_format=FORMATS[3]) for conv in convs)


def test_single_images_and_other_devices_keep_the_model_as_it_is():
    model = fold_batch_norm(_frozen([20, 24, 20]))
    assert for_batches(model, 3, batch_size=1, device=CPU) is model
    assert for_batches(model, 3, batch_size=8, device=torch.device("cuda")) is model
    assert for_batches(model, 1, batch_size=8, device=CPU) is model
    weight = [m for m in model.modules() if isinstance(m, nn.Conv3d)][-1].weight  # 4 -> 8
    assert not weight.is_contiguous(memory_format=FORMATS[3])
    assert for_batches(model, 3, batch_size=2, device=CPU) is model  # converted in place
    assert weight.is_contiguous(memory_format=FORMATS[3])


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp", "saliency", "lrp"])
def test_explanations_of_a_channels_last_model_equal_those_of_the_model(method):
    from voxplain.explain.methods import explainer

    model = _frozen([20, 24, 20])
    fast = for_batches(copy.deepcopy(model), 3, batch_size=4, device=CPU)
    x, targets = torch.rand(4, 1, 20, 24, 20), torch.tensor([0, 1, 1, 0])
    expected = explainer(method, model).explain(x, targets)
    torch.testing.assert_close(explainer(method, fast).explain(x, targets), expected,
                               atol=1e-5 * float(expected.abs().max()), rtol=1e-3)
