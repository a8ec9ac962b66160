"""Channels-last memory layout for batched convolutions on the CPU.

PyTorch runs a CPU convolution on oneDNN when its input is channels-last (``N, *spatial, C`` in
memory), and often on a slower direct implementation otherwise. Measured on the frozen,
batch-norm-folded paper-1 CNN, one thread, forward + backward to the input (the work of one
mask iteration):

| input | batch | contiguous (s) | channels-last (s) |
|---|---|---|---|
| 31x37x31 | 1 | 0.0099 | 0.0102 |
| 31x37x31 | 4 | 0.037 | 0.016 |
| 31x37x31 | 8 | 0.065 | 0.031 |
| 121x145x121 | 1 | 0.78 | 0.88 |
| 121x145x121 | 8 | 5.66 | 2.88 |
| 64x64 (2D) | 8 | 0.0104 | 0.0037 |

So batches of two or more images gain about 2x and single images nothing (or lose a little):
:func:`for_batches` switches the layout on only for batches, on the CPU. Values are the same up
to floating-point summation order.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


class ChannelsLast(nn.Module):
    """``model`` with its convolution weights and every input in the channels-last layout.

    ``model`` itself is converted (``Module.to(memory_format=...)`` works in place): pass a copy
    that nothing else uses, e.g. the output of :func:`~voxplain.models.folding.fold_batch_norm`.
    """

    def __init__(self, model: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.memory_format = FORMATS[spatial_dims]
        self.model = model.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))


def for_batches(model: nn.Module, spatial_dims: int, batch_size: int,
                device: torch.device) -> nn.Module:
    """``model`` in the channels-last layout when that is faster (CPU, 2D or 3D, batches of at
    least two images), else ``model`` unchanged. Converts ``model`` in place when it switches."""
    if device.type != "cpu" or batch_size < 2 or spatial_dims not in FORMATS:
        return model
    return ChannelsLast(model, spatial_dims)
