"""Save and load models as safetensors weights + a JSON config: never unpickle.

``model.safetensors`` holds only tensors (the format cannot carry code); ``model.json`` holds
the :class:`~voxplain.config.ModelConfig`, the class names and training metadata. Loading a
pickle-based ``.pt``/``.pth`` checkpoint is refused unless it passes ``torch.load`` with
``weights_only=True``, which rejects arbitrary objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from voxplain.config import ModelConfig
from voxplain.io import atomic_path, write_json
from voxplain.models.registry import build_model

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def save_model(folder: Path, model: nn.Module, config: ModelConfig, classes: list[str],
               metadata: dict[str, Any] | None = None) -> None:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (each atomically)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(Path(folder) / WEIGHTS) as temporary:
        save_file(state, str(temporary))
    write_json(Path(folder) / CONFIG, {"model": config.model_dump(mode="json"),
                                       "classes": classes, **(metadata or {})})


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model in eval mode; returns ``(model, model.json contents)``."""
    folder = Path(folder)
    description = read_model_json(folder)
    path = folder / CONFIG
    try:
        model = build_model(ModelConfig(**description["model"]))
    except (ValidationError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: 'model' does not describe a network voxplain can build "
                         f"({_first_line(error)})") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{weights}: the weights do not fit the network of {path} "
                         f"({_first_line(error)})") from None
    return model.to(device).eval(), description


def read_model_json(folder: Path) -> dict[str, Any]:
    """The ``model.json`` of a saved model, with an error naming the file."""
    path = Path(folder) / CONFIG
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model description not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    check_model_json(path, description)
    return description


def check_model_json(path: Path, description: Any) -> None:
    """Refuse a ``model.json`` that is not what :func:`save_model` writes: an object with a
    ``model`` object and ``classes``, a list of at least two distinct names, as many as the
    network's outputs. The error names the file and the problem."""
    if not isinstance(description, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(description).__name__}")
    for key, kind in (("model", dict), ("classes", list)):
        if key not in description:
            raise ValueError(f"{path}: no '{key}' entry")
        if not isinstance(description[key], kind):
            raise ValueError(f"{path}: '{key}' must be a JSON {'object' if kind is dict else 'list'}"
                             f", got {type(description[key]).__name__}")
    classes = description["classes"]
    if (len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise ValueError(f"{path}: 'classes' must list at least two distinct class names, got "
                         f"{classes}")
    outputs = description["model"].get("n_classes", len(classes))
    if outputs != len(classes):
        raise ValueError(f"{path}: {len(classes)} classes {classes} but the network has "
                         f"{outputs} outputs (n_classes)")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a user file: safetensors, or a plain tensor checkpoint (``weights_only``).

    A pickle carrying anything but tensors and plain containers is refused by torch's
    restricted unpickler; the error names the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for unsafe files
        raise ValueError(f"{path}: refused to load: not a plain tensor checkpoint ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state
