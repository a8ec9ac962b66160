"""Classifiers: the networks of the papers, their safetensors files, checkpoints and devices."""

from voxplain.models.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from voxplain.models.device import resolve_device
from voxplain.models.layout import for_batches
from voxplain.models.networks import CNN, VGGGAP, ConvNet
from voxplain.models.registry import build_model
from voxplain.models.serialization import load_model, read_model_json, save_model

__all__ = ["CNN", "VGGGAP", "ConvNet", "TrainingState", "build_model", "for_batches",
           "load_checkpoint", "load_model", "read_model_json", "resolve_device",
           "save_checkpoint", "save_model"]
