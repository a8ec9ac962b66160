"""Classifiers: the networks of the papers, their safetensors files, checkpoints and devices."""

from voxplain.models.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from voxplain.models.clinicadl import Conv4FC3, Conv5FC3
from voxplain.models.device import resolve_device
from voxplain.models.imagenet import VGG16, VGG19, ResNet50
from voxplain.models.layout import for_batches
from voxplain.models.networks import CNN, VGGGAP, ConvNet
from voxplain.models.programs import export_program, is_program, load_program
from voxplain.models.registry import build_model
from voxplain.models.serialization import (
    initial_model,
    load_model,
    load_weights_by_name,
    read_model_json,
    save_model,
)

__all__ = ["CNN", "VGG16", "VGG19", "VGGGAP", "Conv4FC3", "Conv5FC3", "ConvNet", "ResNet50",
           "TrainingState",
           "build_model", "export_program", "for_batches", "initial_model", "is_program",
           "load_checkpoint", "load_model", "load_program",
           "load_weights_by_name", "read_model_json", "resolve_device", "save_checkpoint",
           "save_model"]
