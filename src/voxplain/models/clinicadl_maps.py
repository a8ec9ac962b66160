"""A ClinicaDL MAPS folder (model analysis and processing structure), read for import::

    MAPS/
      maps.json                                  architecture, mode, network_task, label, ...
      groups/train/split-K/{train,validation}.tsv   participant_id, session_id, LABEL, ...
      split-K/best-METRIC/model.pth.tar          {"model": state dict, "epoch": ..., "name": ...}

Only what voxplain can rebuild is accepted: image-level (``mode: image``) classification with
one network (``multi_network: false``) of a known architecture
(:data:`voxplain.models.clinicadl.ARCHITECTURES`). The checkpoints are read with
``torch.load(weights_only=True)``: a file that would need full unpickling is refused.

Class order: ClinicaDL numbers the labels in sorted order (``label_code``); ``maps.json``'s
``label_code`` is used when it is there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from voxplain.io import read_tsv
from voxplain.models.clinicadl import ARCHITECTURES
from voxplain.models.serialization import load_checkpoint_state

_SPLIT = re.compile(r"split-(\d+)")


@dataclass(frozen=True)
class MapsSplit:
    """One split of a MAPS: its sessions (``participant_id``, ``session_id`` and the label
    column) and the checkpoint of its selected model."""

    index: int
    train: pd.DataFrame
    validation: pd.DataFrame
    checkpoint: Path


@dataclass(frozen=True)
class Maps:
    """A MAPS folder's model description: voxplain's ``model_name``, the label column, the
    classes in output order, the splits, and ``maps.json`` as read."""

    root: Path
    model_name: str
    label: str
    classes: list[str]
    splits: list[MapsSplit]
    parameters: dict[str, Any]


def read_maps(root: str | Path, selection_metric: str = "loss",
              folds: list[int] | None = None) -> Maps:
    """Read and check the MAPS folder ``root``; ``selection_metric`` picks each split's
    ``best-<metric>`` model, ``folds`` the splits (default: every ``groups/train/split-K``).

    Raises:
        FileNotFoundError: no ``maps.json``, no split, a missing split TSV or checkpoint.
        ValueError: a MAPS that voxplain cannot rebuild (the message says what it holds).
    """
    root = Path(root)
    parameters = _read_parameters(root / "maps.json")
    label = str(parameters.get("label", "diagnosis"))
    groups = root / "groups" / "train"
    found = sorted(int(match.group(1)) for path in groups.glob("split-*")
                   if (match := _SPLIT.fullmatch(path.name)) and path.is_dir())
    if not found:
        raise FileNotFoundError(f"{groups}: no split-K folder (train.tsv, validation.tsv)")
    unknown = sorted(set(folds or ()) - set(found))
    if unknown:
        raise ValueError(f"{root}: splits {unknown} do not exist; the MAPS has {found}")
    splits = []
    for index in folds if folds is not None else found:
        tables = [_read_split(groups / f"split-{index}" / f"{subset}.tsv", label)
                  for subset in ("train", "validation")]
        checkpoint = root / f"split-{index}" / f"best-{selection_metric}" / "model.pth.tar"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no model selected by {selection_metric} for "
                                    f"split {index}")
        splits.append(MapsSplit(index, *tables, checkpoint))
    classes = _classes(parameters, splits, label, root / "maps.json")
    return Maps(root, ARCHITECTURES[parameters["architecture"]], label, classes, splits,
                parameters)


def read_clinicadl_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of ``model.pth.tar`` (its ``model`` entry) and the plain entries beside it
    (``epoch``, ``name``); read with ``weights_only``, never unpickled."""
    return load_checkpoint_state(path)


def _read_parameters(path: Path) -> dict[str, Any]:
    try:
        parameters = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (is {path.parent} a ClinicaDL MAPS "
                                "folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: expected a JSON object")
    expected = {"mode": "image", "network_task": "classification"}
    for key, value in expected.items():
        if parameters.get(key, value) != value:
            raise ValueError(f"{path}: {key} is {parameters[key]!r}; voxplain imports "
                             f"{key} {value!r} models only")
    if parameters.get("multi_network"):
        raise ValueError(f"{path}: multi_network is true (one network per patch or ROI); "
                         "voxplain imports single-network image-level models only")
    architecture = parameters.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not one voxplain can "
                         f"rebuild; supported: {', '.join(ARCHITECTURES)}")
    return parameters


def _read_split(path: Path, label: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    table = read_tsv(path)
    missing = [column for column in ("participant_id", "session_id") if column not in table]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    return table[["participant_id", "session_id", *([label] if label in table else [])]]


def _classes(parameters: dict[str, Any], splits: list[MapsSplit], label: str,
             path: Path) -> list[str]:
    code = parameters.get("label_code")
    if isinstance(code, dict) and code:
        order = sorted(code.items(), key=lambda item: item[1])
        if [index for _, index in order] != list(range(len(order))):
            raise ValueError(f"{path}: label_code {code} does not number the classes 0..K-1")
        return [str(name) for name, _ in order]
    labels = {str(value) for split in splits for table in (split.train, split.validation)
              if label in table for value in table[label].dropna()}
    if len(labels) < 2:
        raise ValueError(f"{path}: no label_code, and the split TSVs hold {len(labels)} "
                         f"value(s) of column {label!r}; a classifier needs two classes")
    return sorted(labels)
