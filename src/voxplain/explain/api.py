"""One interface for every per-sample explanation method.

An explainer is configured in ``__init__`` (model, layer, method options) and does its work in one
verb, :meth:`Explainer.explain`: a batch of inputs ``(N, C, *spatial)`` and one target class per
sample give one map per sample, ``(N, 1, *spatial)`` on the input's grid. 2D and 3D inputs go
through the same code. Batches are cut into chunks of ``batch_size`` samples so memory stays
bounded whatever the caller passes.

The contract every method keeps (checked for every registered method by
``tests/test_explainer_contract.py``): one map per sample, finite; a sample's map depends only
on that sample and its own target (not on the rest of the batch, nor on ``batch_size``); the same
call gives the same maps (random draws come from the method's own ``seed``); the model is left as
it came, in its train/eval mode, on its device, with its parameters, their ``requires_grad``
flags and no hook of ours left behind. During :meth:`Explainer.explain` the model runs in eval
mode.

This module holds the interface only; the methods by name are in :mod:`voxplain.explain.methods`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn


class Explainer(ABC):
    """Base class of explanation methods.

    Subclasses set ``name`` (the command-line name) and ``signed`` (True when the sign of the map
    carries meaning, e.g. gradients; False for non-negative maps such as Grad-CAM), and implement
    :meth:`attribute` for one chunk.
    """

    name: ClassVar[str]
    signed: ClassVar[bool]

    def __init__(self, model: nn.Module, *, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    def explain(self, x: torch.Tensor, target: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """Maps of ``x`` ``(N, C, *spatial)`` for ``target`` (one class index per sample, or one
        for all), shaped ``(N, 1, *spatial)``, on the model's device, detached.

        The model runs in eval mode (batch-norm with its running statistics, no dropout); the
        train/eval mode of each of its modules is restored afterwards, also on failure."""
        if x.ndim < 3:
            raise ValueError(f"expected a batch (N, C, *spatial), got shape {tuple(x.shape)}")
        device = next(self.model.parameters()).device
        x = x.to(device)
        targets = as_targets(target, len(x), device)
        with _eval_mode(self.model):
            chunks = [self.attribute(x[i:i + self.batch_size],
                                     targets[i:i + self.batch_size]).detach()
                      for i in range(0, len(x), self.batch_size)]
        maps = torch.cat(chunks)
        expected = (len(x), 1, *x.shape[2:])
        if tuple(maps.shape) != expected:
            raise RuntimeError(f"{self.name} returned shape {tuple(maps.shape)}, expected {expected}")
        return maps

    @abstractmethod
    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Maps ``(n, 1, *spatial)`` of one chunk ``x`` ``(n, C, *spatial)``, targets ``(n,)``."""


def as_targets(target: torch.Tensor | Sequence[int] | int, n: int,
               device: torch.device) -> torch.Tensor:
    """One class index per sample, as a long tensor ``(n,)``."""
    targets = torch.as_tensor(target, dtype=torch.long, device=device)
    if targets.ndim == 0:
        targets = targets.expand(n)
    if targets.shape != (n,):
        raise ValueError(f"expected one target per sample ({n}), got shape {tuple(targets.shape)}")
    return targets


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then give every submodule back the train/eval
    mode it had (also when the block fails)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
