"""CyCE relevance (paper 3, 2.6) and the ``cyce`` explainer.

For trained generators G+ (towards class 1) and G- (towards class 0)::

    Delta+ = G+(x) - x,   Delta- = G-(x) - x                                   (eq. 5)
    R = Delta+ - Delta- = G+(x) - G-(x)                                        (eq. 6)

R is signed: positive where the positive class wants the image brighter than the negative class
does. Trained generators are stored as ``generators.safetensors`` (keys ``g_plus.*`` and
``g_minus.*``) and ``generators.json`` (architecture, settings, classes) in
``RUN/cyce/fold-K/run-R/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from voxplain.config import CyCEConfig
from voxplain.explain.api import Explainer
from voxplain.explain.cyce.generator import UNetGenerator
from voxplain.io import atomic_path, write_json

WEIGHTS = "generators.safetensors"
DESCRIPTION = "generators.json"


class CyCEGenerators(nn.Module):
    """The pair (G+, G-) with the maps of eq. 5-6; inputs ``(N, C, *spatial)``."""

    def __init__(self, g_plus: UNetGenerator, g_minus: UNetGenerator,
                 description: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.g_plus, self.g_minus = g_plus, g_minus
        self.description = description or {}

    @torch.no_grad()
    def transfer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G+(x), G-(x))``."""
        return self.g_plus(x), self.g_minus(x)

    def deltas(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Delta+, Delta-)`` of eq. 5."""
        plus, minus = self.transfer(x)
        return plus - x, minus - x

    def relevance(self, x: torch.Tensor) -> torch.Tensor:
        """``R = G+(x) - G-(x)`` of eq. 6, shaped like ``x``."""
        plus, minus = self.transfer(x)
        return plus - minus

    def save(self, folder: Path, metadata: dict[str, Any]) -> None:
        """Write ``generators.safetensors`` and ``generators.json`` (``metadata`` must hold
        ``spatial_dims``, ``in_channels`` and ``config``)."""
        tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
                   for name, network in (("g_plus", self.g_plus), ("g_minus", self.g_minus))
                   for key, value in network.state_dict().items()}
        with atomic_path(Path(folder) / WEIGHTS) as temporary:
            save_file(tensors, str(temporary))
        write_json(Path(folder) / DESCRIPTION, metadata)

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> CyCEGenerators:
        """Rebuild saved generators (eval mode) from a ``cyce/fold-K/run-R`` folder."""
        folder = Path(folder)
        description_file, weights = folder / DESCRIPTION, folder / WEIGHTS
        if not description_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{folder}: no trained CyCE generators ({DESCRIPTION} and "
                                    f"{WEIGHTS}); run `voxplain cyce train` first")
        try:
            description = json.loads(description_file.read_text())
            config = CyCEConfig.model_validate(description["config"])
            tensors = load_file(str(weights))
        except (json.JSONDecodeError, KeyError, ValueError, SafetensorError, OSError) as error:
            raise ValueError(f"{folder}: unreadable CyCE generators ({error})") from None
        networks = []
        for name in ("g_plus", "g_minus"):
            network = UNetGenerator(description["spatial_dims"], description["in_channels"],
                                    config.widths, config.convs_per_stage)
            network.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                     if k.startswith(f"{name}.")})
            networks.append(network)
        return cls(*networks, description).to(device).eval()


class CyCE(Explainer):
    """Cycle-consistent activation-maximisation explanation (paper 3, eq. 5-6).

    Args:
        model: the classifier the generators were trained against (used for the device).
        generators: trained :class:`CyCEGenerators`, or the folder holding them
            (``RUN/cyce/fold-K/run-R``).
        map: ``relevance`` -- R for target 1 and -R for target 0 (so, like a gradient, the map
            points towards the target class); ``delta`` -- the per-class map of the target:
            Delta+ for target 1, Delta- for target 0.
        batch_size: images per chunk.

    Channels are summed into the one map per sample.
    """

    name: ClassVar[str] = "cyce"
    signed: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, generators: CyCEGenerators | str | Path,
                 map: Literal["relevance", "delta"] = "relevance", batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        if map not in ("relevance", "delta"):
            raise ValueError(f"map must be 'relevance' or 'delta', got {map!r}")
        device = next(model.parameters()).device
        if not isinstance(generators, CyCEGenerators):
            generators = CyCEGenerators.load(Path(generators), device)
        self.generators = generators.to(device).eval()
        self.map = map
        self.positive_class = int(self.generators.description.get("positive_class", 1))
        self.negative_class = int(self.generators.description.get("negative_class",
                                                                  1 - self.positive_class))

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = (target == self.positive_class) | (target == self.negative_class)
        if not bool(known.all()):
            raise ValueError(f"cyce: targets {target.tolist()} outside the generators' classes "
                             f"{self.positive_class} (G+) and {self.negative_class} (G-)")
        towards_positive = (target == self.positive_class).view(-1, *[1] * (x.ndim - 1))
        if self.map == "relevance":
            relevance = self.generators.relevance(x)
            maps = torch.where(towards_positive, relevance, -relevance)
        else:
            plus, minus = self.generators.deltas(x)
            maps = torch.where(towards_positive, plus, minus)
        return maps.sum(1, keepdim=True)
