"""Batch-norm folded into the preceding convolution, for frozen (eval-mode) models.

In eval mode a batch-norm layer is the per-channel affine map
``y = gamma (z - mean) / sqrt(var + eps) + beta``; after a convolution ``z = W * x + b`` it is the
same convolution with ``W' = s W`` and ``b' = s (b - mean) + beta``, ``s = gamma / sqrt(var + eps)``.
The folded model computes the same function with one fewer pass over every activation, forward
and backward. Explanations that run a frozen model many times (meaningful-perturbation masks)
use it for speed; LRP needs it because its rules are defined for linear layers, not batch-norm.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from voxplain.models.programs import copy_program, is_program

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where each batch-norm that directly follows a convolution
    or linear layer in an ``nn.Sequential`` is folded into it and replaced by ``nn.Identity``
    (module names are kept).

    The copy's parameters keep ``requires_grad`` as in ``model``; ``model`` is not modified.
    Batch-norm layers in any other position are left as they are; one without running statistics
    (it normalises with the batch's statistics even in eval mode) raises a ``ValueError``.
    """
    if is_program(model):  # a graph of operators: no module to fold into, and no deepcopy
        return copy_program(model).eval()
    folded = copy.deepcopy(model).eval()
    for container_name, container in folded.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for previous, name in zip(names, names[1:]):
            layer, norm = container._modules[previous], container._modules[name]
            if not (isinstance(norm, _BatchNorm) and isinstance(layer, FOLDABLE)):
                continue
            if norm.running_mean is None or norm.running_var is None:
                raise ValueError(f"batch-norm {container_name}.{name} has no running statistics "
                                 "(track_running_stats=False): it cannot be folded")
            _fold(layer, norm)
            container._modules[name] = nn.Identity()
    return folded


@torch.no_grad()
def _fold(layer: nn.Module, norm: _BatchNorm) -> None:
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=layer.weight.requires_grad)
    layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.ndim - 1)))
    layer.bias.copy_(layer.bias * scale + shift)
