"""Networks by name, built from a :class:`~voxplain.config.ModelConfig`.

:func:`build_model` gives the network with its random initialisation; the trainer starts from
:func:`~voxplain.models.serialization.initial_model`, which also loads ``config.weights``.
"""

from __future__ import annotations

from torch import nn

from voxplain.config import CNN_FIELDS, HEAD_FIELDS, ModelConfig
from voxplain.models.clinicadl import Conv4FC3, Conv5FC3
from voxplain.models.imagenet import VGG16, VGG19, ResNet50
from voxplain.models.monai_networks import monai_network
from voxplain.models.networks import CNN, VGGGAP, ConvNet
from voxplain.models.programs import python_network

NETWORKS: dict[str, type[nn.Module]] = {"cnn": CNN, "convnet": ConvNet, "vgg_gap": VGGGAP,
                                        "vgg16": VGG16, "vgg19": VGG19, "resnet50": ResNet50}
#: Networks of other tools that ``voxplain import`` rebuilds (:mod:`voxplain.steps.imports`):
#: fixed architectures, built for ``input_shape``, ``in_channels`` and ``n_classes`` only.
IMPORTED: dict[str, type[nn.Module]] = {"clinicadl_conv5_fc3": Conv5FC3,
                                        "clinicadl_conv4_fc3": Conv4FC3}
#: Imported networks built from their own constructor arguments (``network``, ``arguments``).
BY_ARGUMENTS = {"monai": monai_network}
#: Imported networks that are not built by name: ``python`` calls the user's factory
#: (``factory``, ``arguments``; importing it runs the user's code), ``program`` is a torch.export
#: program read from the run folder (:func:`~voxplain.models.serialization.load_model`).
EXTERNAL = ("python", "program")


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network named by ``config.name`` for ``config.input_shape``, randomly
    initialised (``config.weights`` is not read here)."""
    if config.name in BY_ARGUMENTS:
        return BY_ARGUMENTS[config.name](config.network, config.arguments or {})
    if config.name == "python":
        return python_network(config.factory or "", config.arguments or {})
    if config.name == "program":
        raise ValueError("model 'program' is a torch.export program: it is read from its file "
                         "(load_model of a run folder's model, or load_program), not built; it "
                         "cannot be trained")
    if config.name not in NETWORKS and config.name not in IMPORTED:
        raise ValueError(f"unknown model '{config.name}'; choose one of "
                         f"{sorted([*NETWORKS, *IMPORTED, *BY_ARGUMENTS, *EXTERNAL])}")
    if config.input_shape is None:
        raise ValueError("model config needs input_shape (the spatial shape of the images)")
    if config.name in IMPORTED:
        if config.channels is not None or config.convs_per_block is not None:
            raise ValueError(f"model {config.name!r} has a fixed architecture; channels and "
                             "convs_per_block do not apply")
        return IMPORTED[config.name](input_shape=config.input_shape,
                                     in_channels=config.in_channels, n_classes=config.n_classes,
                                     dropout=config.dropout)
    # passed only when set: the networks without a choice of head do not take them
    heads = {key: getattr(config, key) for key in (*HEAD_FIELDS, *CNN_FIELDS, "batch_norm")
             if getattr(config, key) is not None}
    return NETWORKS[config.name](
        input_shape=config.input_shape, in_channels=config.in_channels,
        n_classes=config.n_classes, channels=config.channels,
        convs_per_block=config.convs_per_block, dropout=config.dropout, **heads,
    )
