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

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where each batch-norm that directly follows a convolution
    in an ``nn.Sequential`` is folded into it and replaced by ``nn.Identity``.

    The copy's parameters keep ``requires_grad`` as in ``model``; ``model`` is not modified.
    Batch-norm layers in any other position are left as they are.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if isinstance(conv, _CONVS) and isinstance(norm, _NORMS) and norm.track_running_stats:
                _fold(conv, norm)
                setattr(module, name, nn.Identity())
    return folded


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> None:
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=conv.weight.requires_grad)
    conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.ndim - 1)))
    conv.bias.copy_(conv.bias * scale + shift)
