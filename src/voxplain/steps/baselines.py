"""What the evaluation steps share: the explanations of a run folder, and the baseline maps of
:mod:`voxplain.evaluate.baselines` made from its cohort and training sets, scored beside them by
the localisation (:mod:`voxplain.steps.localisation`) and faithfulness
(:mod:`voxplain.steps.faithfulness`) steps."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.data.template import brain_mask
from voxplain.evaluate.baselines import (SESSION_BASELINES, TRAINING_BASELINES, baseline_method,
                                         edge_map, input_map, random_map, training_maps)
from voxplain.run import RunFolder
from voxplain.steps.context import RunContext, load_context

__all__ = ["BaselineMaps", "baseline_names", "explanations"]


def explanations(folder: RunFolder, methods: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    """``(key, explanation.json)`` of every explanation in the run (of ``methods`` only)."""
    for record_file in sorted(folder.explanations_dir.glob("*/explanation.json")):
        record = json.loads(record_file.read_text())
        if methods is None or record["method"] in methods:
            yield record_file.parent.name, record


def baseline_names(methods: Sequence[str] | None) -> list[str]:
    """The baselines scored: all of them, or those ``methods`` names (``baseline:NAME``)."""
    names = [*SESSION_BASELINES, *TRAINING_BASELINES]
    return names if methods is None else [name for name in names
                                          if baseline_method(name) in methods]


class BaselineMaps:
    """The baseline maps of a run folder, made on demand: a cohort's images on the training grid
    loaded once, a fold/run's training-set maps fitted once."""

    def __init__(self, folder: RunFolder, names: Sequence[str], seed: int,
                 context: RunContext | None = None) -> None:
        self.folder, self.names, self.seed = folder, list(names), seed
        # a step that loaded the run's cohort already passes it (``context``): loaded once
        self._contexts: dict[Path | None, RunContext] = {} if context is None else {None: context}
        self._training: dict[tuple[int, int, str], tuple[dict[str, np.ndarray], int]] = {}

    def context(self, cohort: Path | None) -> RunContext:
        """The run's cohort (``None``) or ``cohort`` on the training grid; the CPU suffices."""
        if cohort not in self._contexts:
            self._contexts[cohort] = load_context(self.folder, "cpu", cohort=cohort)
        return self._contexts[cohort]

    def session(self, context: RunContext, image_index: int, fold: int, run_index: int,
                names: Sequence[str] = SESSION_BASELINES) -> dict[str, np.ndarray]:
        """The image-based baselines (of ``names`` among the selected) of one cohort image."""
        names = [name for name in names if name in self.names]
        values = input_map(context.images[image_index])
        maps = {}
        if "random" in names:  # one stream per session: the same draw in any order
            maps["random"] = random_map(values.shape, np.random.default_rng(
                [self.seed, fold, run_index, int(image_index)]))
        if "input" in names:
            maps["input"] = values
        if "edge" in names:
            maps["edge"] = edge_map(values, context.grid.voxel_size)
        return maps

    def training(self, fold: int, run_index: int,
                 patient: str) -> tuple[dict[str, np.ndarray], int]:
        """The training-set baselines of a fold/run, patient class vs the others, and the
        number of training sessions."""
        wanted = [name for name in TRAINING_BASELINES if name in self.names]
        if wanted and (fold, run_index, patient) not in self._training:
            context = self.context(None)
            rows = context.split_rows(fold, "train")
            grid = context.grid
            maps = training_maps(context.images_of(rows), (rows.diagnosis == patient).to_numpy(),
                                 brain_mask(grid) if len(grid.shape) == 3 else None, self.seed)
            self._training[(fold, run_index, patient)] = (
                {name: maps[name] for name in wanted}, len(rows))
        return self._training.get((fold, run_index, patient), ({}, 0))

    def group(self, fold: int, run_index: int, patient: str,
              rows: pd.DataFrame) -> dict[str, tuple[np.ndarray, int]]:
        """``name -> (map, sessions it comes from)``: the image-based baselines averaged over
        ``rows`` (the random map drawn once, seeded by fold and run), the training-set ones."""
        context = self.context(None)
        maps: dict[str, tuple[np.ndarray, int]] = {}
        if "random" in self.names:
            maps["random"] = (random_map(context.grid.shape, np.random.default_rng(
                [self.seed, fold, run_index])), len(rows))
        sums: dict[str, np.ndarray] = {}
        for image_index in rows.image_index:
            for name, values in self.session(context, image_index, fold, run_index,
                                             ("input", "edge")).items():
                sums[name] = sums[name] + values if name in sums else values
        maps.update({name: (total / len(rows), len(rows)) for name, total in sums.items()})
        training, n_training = self.training(fold, run_index, patient)
        maps.update({name: (values, n_training) for name, values in training.items()})
        return maps
