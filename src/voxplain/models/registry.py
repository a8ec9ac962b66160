"""Networks by name, built from a :class:`~voxplain.config.ModelConfig`.

:func:`build_model` gives the network with its random initialisation; the trainer starts from
:func:`~voxplain.models.serialization.initial_model`, which also loads ``config.weights``.
"""

from __future__ import annotations

from torch import nn

from voxplain.config import CNN_FIELDS, HEAD_FIELDS, ModelConfig
from voxplain.models.imagenet import VGG16, VGG19, ResNet50
from voxplain.models.networks import CNN, VGGGAP, ConvNet

NETWORKS: dict[str, type[nn.Module]] = {"cnn": CNN, "convnet": ConvNet, "vgg_gap": VGGGAP,
                                        "vgg16": VGG16, "vgg19": VGG19, "resnet50": ResNet50}


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network named by ``config.name`` for ``config.input_shape``, randomly
    initialised (``config.weights`` is not read here)."""
    if config.name not in NETWORKS:
        raise ValueError(f"unknown model '{config.name}'; choose one of {sorted(NETWORKS)}")
    if config.input_shape is None:
        raise ValueError("model config needs input_shape (the spatial shape of the images)")
    # passed only when set: the networks without a choice of head do not take them
    heads = {key: getattr(config, key) for key in (*HEAD_FIELDS, *CNN_FIELDS, "batch_norm")
             if getattr(config, key) is not None}
    return NETWORKS[config.name](
        input_shape=config.input_shape, in_channels=config.in_channels,
        n_classes=config.n_classes, channels=config.channels,
        convs_per_block=config.convs_per_block, dropout=config.dropout, **heads,
    )
