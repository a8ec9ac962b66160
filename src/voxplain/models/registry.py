"""Networks by name, built from a :class:`~voxplain.config.ModelConfig`."""

from __future__ import annotations

from torch import nn

from voxplain.config import ModelConfig
from voxplain.models.networks import CNN, VGGGAP, ConvNet

NETWORKS: dict[str, type[nn.Module]] = {"cnn": CNN, "convnet": ConvNet, "vgg_gap": VGGGAP}


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network named by ``config.name`` for ``config.input_shape``."""
    if config.name not in NETWORKS:
        raise ValueError(f"unknown model '{config.name}'; choose one of {sorted(NETWORKS)}")
    if config.input_shape is None:
        raise ValueError("model config needs input_shape (the spatial shape of the images)")
    return NETWORKS[config.name](
        input_shape=config.input_shape, in_channels=config.in_channels,
        n_classes=config.n_classes, channels=config.channels,
        convs_per_block=config.convs_per_block, dropout=config.dropout,
    )
