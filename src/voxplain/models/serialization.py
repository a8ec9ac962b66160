"""Save and load models as safetensors weights + a JSON config: never unpickle.

``model.safetensors`` holds only tensors (the format cannot carry code); ``model.json`` holds
the :class:`~voxplain.config.ModelConfig`, the class names and training metadata. Loading a
pickle-based ``.pt``/``.pth`` checkpoint is refused unless it passes ``torch.load`` with
``weights_only=True``, which rejects arbitrary objects.

Training may start from a local weights file (``ModelConfig.weights``, e.g. torchvision's ImageNet
weights for paper 2's networks): :func:`initial_model` builds the network and loads the file's
tensors whose name and shape match (:func:`load_weights_by_name`). :func:`load_model` never
reads that file: a trained model's own ``model.safetensors`` replaces every tensor.

Imported models (:mod:`voxplain.steps.imports`) add two kinds: ``program``, a torch.export
program copied into the folder as ``model.pt2`` and loaded without unpickling
(:mod:`voxplain.models.programs`; ``model.safetensors`` then holds its tensors), and ``python``,
a factory of the user's own code (``package.module:function``), imported when the model is
loaded: that runs the user's code, on purpose. An imported model's ``model.json`` may declare
the input its network expects (``preprocessing``: crop or pad, normalisation, a single logit);
:func:`load_model` returns the network behind it
(:class:`~voxplain.models.declared_input.DeclaredInput`), ``model.safetensors`` holding the
network's own tensors.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from voxplain.config import ModelConfig
from voxplain.io import atomic_path, write_json
from voxplain.models.declared_input import Preprocessing, declared_input
from voxplain.models.programs import PROGRAM, ProgramError, load_program
from voxplain.models.registry import build_model

log = logging.getLogger("voxplain")

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def save_model(folder: Path, model: nn.Module, config: ModelConfig, classes: list[str],
               metadata: dict[str, Any] | None = None, program: Path | None = None) -> None:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (each atomically); for model
    ``program``, first a copy of the exported ``program`` file (``folder/model.pt2``), which
    :func:`load_model` reads back (and then loads ``model.safetensors`` into)."""
    if (config.name == "program") != (program is not None):
        raise ValueError("a program file goes with model 'program' (and only with it)")
    if program is not None:
        with atomic_path(Path(folder) / PROGRAM) as temporary:
            shutil.copyfile(program, temporary)
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
        config = ModelConfig(**description["model"])
        # a program is read from its copy in the folder, without unpickling (models.programs);
        # a 'python' factory is imported, which runs the user's own code
        model = (load_program(folder / PROGRAM) if config.name == "program"
                 else build_model(config))
    except (FileNotFoundError, ProgramError):
        raise
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
    try:
        preprocessing = Preprocessing.from_record(description.get("preprocessing"))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: 'preprocessing' is not a declaration voxplain can apply "
                         f"({_first_line(error)})") from None
    return declared_input(model, preprocessing).to(device).eval(), description


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
    restricted unpickler, before any of its code runs; the error names the file and the object
    it would have had to create.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    state = _load_weights_only(path)
    if not _is_state_dict(state):
        found = (f"keys {sorted(map(str, state))[:5]}" if isinstance(state, dict)
                 else type(state).__name__)
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors, got {found}")
    return state


#: Keys under which training scripts store the state dict in a checkpoint (ClinicaDL: model).
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


def load_checkpoint_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a trained model's weights file, and the checkpoint's other plain
    entries (e.g. ``epoch``; empty for a bare state dict or a safetensors file).

    The file is safetensors, or a checkpoint read with ``weights_only`` (never unpickled: see
    :func:`load_state_dict_file`) holding a state dict bare or under one of
    :data:`STATE_DICT_KEYS`. A ``module.`` prefix on every name (a model saved inside
    ``DataParallel``) is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return _without_module_prefix(load_state_dict_file(path)), {}
    checkpoint = _load_weights_only(path)
    if _is_state_dict(checkpoint):
        return _without_module_prefix(checkpoint), {}
    if isinstance(checkpoint, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(checkpoint.get(key)):
                extras = {name: value for name, value in checkpoint.items() if name != key
                          and isinstance(value, (int, float, str, bool))}
                return _without_module_prefix(checkpoint[key]), extras
    found = (f"keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict)
             else type(checkpoint).__name__)
    raise ValueError(f"{path}: no state dict found (a mapping of parameter names to tensors, "
                     f"bare or under {', '.join(map(repr, STATE_DICT_KEYS))}); got {found}")


def _load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for unsafe files
        raise ValueError(f"{path}: refused to load: not a plain tensor checkpoint; reading it "
                         f"would need full unpickling, which can run any code "
                         f"({_unpickling_reason(error)}). Save a state dict of tensors "
                         "(torch.save(model.state_dict(), ...)) or a safetensors file") from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _without_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(name.startswith("module.") for name in state):
        return {name.removeprefix("module."): tensor for name, tensor in state.items()}
    return state


def _unpickling_reason(error: Exception) -> str:
    """The line of torch's ``weights_only`` error that says which object was refused."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", str(error),
                      flags=re.MULTILINE)
    return found.group(1).strip() if found else _first_line(error)


@dataclass(frozen=True)
class MatchedWeights:
    """What :func:`load_weights_by_name` did: ``loaded`` (names), ``skipped`` (name, the
    network's shape, the file's shape), ``missing`` (the network's tensors absent from the
    file: they keep their initial values) and ``unexpected`` (the file's tensors the network
    has no name for)."""

    path: Path
    loaded: list[str]
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        """One line for the log: the count loaded, then the names skipped, missing, unexpected."""
        parts = [f"{self.path}: {len(self.loaded)} tensors loaded by name"]
        if self.skipped:
            parts.append("skipped (shape differs, network vs file): " + ", ".join(
                f"{name} {tuple(own)} vs {tuple(theirs)}" for name, own, theirs in self.skipped))
        if self.missing:
            parts.append("not in the file (initial values kept): " + ", ".join(self.missing))
        if self.unexpected:
            parts.append("not in the network (ignored): " + ", ".join(self.unexpected))
        return "; ".join(parts)


def load_weights_by_name(model: nn.Module, path: Path) -> MatchedWeights:
    """Copy into ``model`` the tensors of the weights file ``path`` (safetensors, or a plain
    state dict read with ``weights_only``, see :func:`load_state_dict_file`) whose name *and*
    shape match one of its parameters or buffers; log (INFO) what was loaded, skipped, missing
    and unexpected, and return it. A torchvision state dict fits paper 2's networks
    (:mod:`voxplain.models.imagenet`) but for the tensors that depend on the task: a
    1000-class head for 3 classes, a 3-channel first convolution for 1 channel.

    Raises ``ValueError`` when no tensor matches (a file of another network), or when the
    network has convolutions and none of their weights matches (e.g. 2D weights for a 3D
    network: only biases, batch-norm statistics or hidden linear layers would load).
    """
    path = Path(path)
    state = load_state_dict_file(path)
    own = model.state_dict()
    fitting = {name: tensor for name, tensor in state.items()
               if name in own and tensor.shape == own[name].shape}
    matched = MatchedWeights(  # in the network's order (a safetensors file sorts its names)
        path, loaded=[name for name in own if name in fitting],
        skipped=[(name, tuple(own[name].shape), tuple(state[name].shape))
                 for name in own if name in state and name not in fitting],
        missing=[name for name in own if name not in state],
        unexpected=[name for name in state if name not in own])
    network = type(model).__name__
    if not fitting:
        raise ValueError(f"{path}: no tensor matches {network} by name and shape (file: "
                         f"{len(state)} tensors, e.g. {list(state)[:3]}; network: "
                         f"{list(own)[:3]}; same names with other shapes: {len(matched.skipped)})")
    convolutions = [skip for skip in matched.skipped if len(skip[1]) >= 3]
    if convolutions and not any(own[name].ndim >= 3 for name in fitting):
        name, ours, theirs = convolutions[0]
        raise ValueError(f"{path}: no convolution weight of {network} matches by name and shape "
                         f"(e.g. {name} {ours} vs {theirs} in the file: 2D weights for a 3D "
                         f"network?); only {len(fitting)} biases, normalisation or fully "
                         "connected tensors would load")
    model.load_state_dict(fitting, strict=False)
    log.info("initial weights %s", matched.summary())
    return matched


def initial_model(config: ModelConfig) -> nn.Module:
    """The network of ``config`` as training starts from it: :func:`build_model`, then, when
    ``config.weights`` names a file, its tensors loaded by name (:func:`load_weights_by_name`)."""
    model = build_model(config)
    if config.weights is not None:
        load_weights_by_name(model, config.weights)
    return model
