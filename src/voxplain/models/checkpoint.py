"""Resumable state in one safetensors file, so a killed long step continues where it stopped.

``NAME.safetensors`` holds the tensors (model weights, Adam moments, torch's RNG state, masks)
and, as JSON in the file's metadata, the counters, histories and hyperparameters. One file is
one ``os.replace``: a kill leaves the previous checkpoint or the new one, never the tensors of
one epoch with the counters of another (two files, renamed one after the other, did: a kill
between the renames made the resumed run train that epoch twice). Nothing is pickled.

Checkpoints of voxplain before this format (``NAME.safetensors`` + ``NAME.json``) cannot be
told apart from such a torn pair, so they are ignored with a warning: the step restarts from
its beginning, which gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from voxplain.io import atomic_path

log = logging.getLogger("voxplain")

CHECKPOINT = "checkpoint"
#: Metadata key of the JSON state in a checkpoint's safetensors header.
STATE_KEY = "voxplain.state"


def save_state(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any],
               name: str = CHECKPOINT) -> None:
    """Write ``folder/NAME.safetensors`` (tensors + ``state`` as JSON metadata) atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(folder) / f"{name}.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={STATE_KEY: json.dumps(state)})


def load_state(folder: Path, name: str = CHECKPOINT) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, state)`` of the checkpoint in ``folder``, or None when there is none."""
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as checkpoint:
        metadata = checkpoint.metadata() or {}
        if STATE_KEY not in metadata:
            log.warning("%s: checkpoint of an older voxplain (state in %s.json) ignored; this "
                        "step starts again from its beginning", path, name)
            return None
        tensors = {key: checkpoint.get_tensor(key) for key in checkpoint.keys()}
    return tensors, json.loads(metadata[STATE_KEY])


def remove_state(folder: Path, name: str = CHECKPOINT) -> None:
    """Delete a checkpoint (and the ``NAME.json`` of an older one) once the step's final files
    are written."""
    for suffix in (".safetensors", ".json"):
        (Path(folder) / f"{name}{suffix}").unlink(missing_ok=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Adam-like per-parameter state as ``optimizer.INDEX.KEY`` tensors, plus param_groups."""
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": torch.as_tensor(value)
               for index, values in state["state"].items() for key, value in values.items()}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      param_groups: list[Any]) -> None:
    """Inverse of :func:`optimizer_tensors`; moments go to their parameter's device."""
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": param_groups})
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for parameter in parameters:
        for name, value in optimizer.state.get(parameter, {}).items():
            if name != "step":  # Adam keeps 'step' on the CPU
                optimizer.state[parameter][name] = value.to(parameter.device)


@dataclass
class TrainingState:
    """Everything needed to continue a fold/run after the last finished epoch."""

    next_epoch: int = 0
    best_epoch: int = -1
    best_balanced_accuracy: float = -1.0
    best_loss: float = float("inf")
    lowest_loss: float = float("inf")
    epochs_above_lowest: int = 0
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(folder: Path, state: TrainingState, model: torch.nn.Module,
                    best_model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Checkpoint of a training fold/run after an epoch."""
    tensors, param_groups = optimizer_tensors(optimizer)
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"best.{k}": v for k, v in best_model_state.items()})
    tensors["rng"] = torch.get_rng_state()
    save_state(folder, tensors, {"state": state.__dict__, "param_groups": param_groups})


def load_checkpoint(folder: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[TrainingState, dict[str, torch.Tensor]] | None:
    """Restore ``model``, ``optimizer`` and the RNG from ``folder``; None if there is no checkpoint."""
    loaded = load_state(folder)
    if loaded is None:
        return None
    tensors, saved = loaded
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    restore_optimizer(optimizer, tensors, saved["param_groups"])
    torch.set_rng_state(tensors["rng"])
    return TrainingState(**saved["state"]), best


def remove_checkpoint(folder: Path) -> None:
    """Delete the training checkpoint once the fold/run's final files are written."""
    remove_state(folder)
