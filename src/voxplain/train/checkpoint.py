"""Per-epoch training checkpoints in safetensors + JSON, so a killed fold resumes mid-way.

The model, the best model so far, Adam's state and torch's RNG state are tensors (safetensors);
epoch counters, history and Adam's hyperparameters are JSON. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from voxplain.io import atomic_path, write_json

TENSORS = "checkpoint.safetensors"
STATE = "checkpoint.json"


@dataclass
class TrainingState:
    """Everything needed to continue a fold/run after the last finished epoch."""

    next_epoch: int = 0
    best_epoch: int = -1
    best_balanced_accuracy: float = -1.0
    best_loss: float = float("inf")
    lowest_loss: float = float("inf")
    epochs_above_lowest: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(folder: Path, state: TrainingState, model: torch.nn.Module,
                    best_model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Write the checkpoint of ``folder`` (tensors first, then the JSON that marks it complete)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_model_state.items()})
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    tensors["rng"] = torch.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(folder / TENSORS) as temporary:
        save_file(tensors, str(temporary))
    write_json(folder / STATE, {"state": state.__dict__,
                                "param_groups": optimizer_state["param_groups"]})


def load_checkpoint(folder: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[TrainingState, dict[str, torch.Tensor]] | None:
    """Restore ``model``, ``optimizer`` and the RNG from ``folder``; None if there is no checkpoint."""
    if not (folder / STATE).is_file() or not (folder / TENSORS).is_file():
        return None
    saved: dict[str, Any] = json.loads((folder / STATE).read_text())
    tensors = load_file(str(folder / TENSORS))
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": saved["param_groups"]})
    for values in optimizer.state.values():  # load_state_dict keeps 'step' on the CPU, as Adam wants
        for name, value in values.items():
            if name != "step":
                values[name] = value.to(device)
    torch.set_rng_state(tensors["rng"])
    return TrainingState(**saved["state"]), best


def remove_checkpoint(folder: Path) -> None:
    """Delete the checkpoint once the fold/run's final files are written."""
    for name in (STATE, TENSORS):
        (folder / name).unlink(missing_ok=True)
