"""MONAI classifiers by name: ``monai.networks.nets.NAME(**arguments)`` (model ``monai``).

Any class or factory of ``monai.networks.nets`` that builds a ``torch.nn.Module`` is accepted
(e.g. ``DenseNet121``, ``resnet18`` or ``ResNet``, ``SEResNet50``, ``EfficientNetBN``), with
its constructor arguments as JSON values. Downloading weights is refused (``pretrained``): an
imported model's weights come from its own file.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def monai_network(network: str, arguments: dict[str, Any]) -> nn.Module:
    """``monai.networks.nets.<network>(**arguments)``, randomly initialised.

    Raises ``ValueError`` for a name that is not a network of ``monai.networks.nets``, for
    ``pretrained`` weights (they would be downloaded), or arguments the network does not take
    (the message gives MONAI's reason).
    """
    from monai.networks import nets  # slow to import: only when a MONAI model is built

    factory = getattr(nets, network, None) if not network.startswith("_") else None
    if factory is None or not callable(factory):
        known = sorted(name for name in dir(nets) if name[:1].isalpha()
                       and isinstance(getattr(nets, name), type)
                       and issubclass(getattr(nets, name), nn.Module))
        raise ValueError(f"{network!r} is not a network of monai.networks.nets; e.g. "
                         f"{', '.join(name for name in known if 'Net' in name)}")
    if arguments.get("pretrained") or arguments.get("pretrain"):
        raise ValueError(f"{network}: pretrained weights would be downloaded; give the model's "
                         "weights as a file instead (leave 'pretrained' out)")
    # some networks download by default (EfficientNetBN: pretrained=True): never
    off = {name: False for name in ("pretrained", "pretrain")
           if name in _parameters(factory) and name not in arguments}
    try:
        model = factory(**arguments, **off)
    except (TypeError, ValueError, KeyError, AssertionError) as error:
        raise ValueError(f"monai.networks.nets.{network}({_shown(arguments)}) failed: "
                         f"{error}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"monai.networks.nets.{network} returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _parameters(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _shown(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in arguments.items())
