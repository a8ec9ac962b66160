"""What every step over a trained run folder needs, read once: the run's settings, its cohort
(or another cohort) on the training grid, the device, and the models of the selected folds.

Written once here; the mask, explanation, CyCE, prediction and robustness steps share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from voxplain.config import TrainConfig
from voxplain.data.cohort import Cohort, load_images
from voxplain.data.grid import Grid
from voxplain.data.slicing import SliceView
from voxplain.models.device import resolve_device
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder, RunFolderError
from voxplain.train.trainer import Dataset, predict_proba, slice_rows, soft_vote

__all__ = ["IDS", "FoldModel", "RunContext", "load_context", "progress_callback",
           "release_contexts", "shared_context"]

#: Columns that name a session and its label in every table of a run folder.
IDS = ["participant_id", "session_id", "diagnosis"]


@dataclass(frozen=True)
class FoldModel:
    """A fold/run's classifier (frozen, eval mode) and its class names in class-index order."""

    model: nn.Module
    classes: list[str]


@dataclass(frozen=True)
class RunContext:
    """A run folder with its cohort loaded on the training grid.

    Attributes:
        run: the run folder.
        train: its ``[train]`` settings.
        table: sessions of the cohort, in image order.
        images: ``(N, C, *spatial)`` on the training grid (downsampled as in training).
        grid: that grid (shape and affine).
        device: where the models run.
        source: the cohort TSV the images came from (the run's own ``cohort.tsv`` by default).
        slices: the slices a slice model reads (paper 2), None when the models read the images
            as they are; ``images`` and ``grid`` are then the volumes and their grid.
    """

    run: RunFolder
    train: TrainConfig
    table: pd.DataFrame
    images: np.ndarray
    grid: Grid
    device: torch.device
    source: Path
    slices: SliceView | None = None

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    def rows(self, sessions: pd.DataFrame) -> pd.DataFrame:
        """The cohort rows (with ``image_index``) of ``sessions`` (by participant and session),
        in the cohort's order."""
        table = self.table.reset_index(names="image_index")
        return table.merge(sessions[IDS[:2]], on=IDS[:2]).reset_index(drop=True)

    def split_rows(self, fold: int, subset: str) -> pd.DataFrame:
        """Cohort rows of ``splits/fold-K/SUBSET.tsv`` (train or validation)."""
        path = self.run.split_file(fold, subset)
        rows = self.rows(self.run.read_split(fold, subset))
        if rows.empty:
            raise RunFolderError(f"{path}: no session of this split is in the run's cohort")
        return rows

    def images_of(self, rows: pd.DataFrame) -> np.ndarray:
        """The images of ``rows`` (their ``image_index``), contiguous, in row order."""
        return np.ascontiguousarray(self.images[rows.image_index.to_numpy()])

    def model_inputs(self, rows: pd.DataFrame) -> torch.Tensor:
        """What the models read for ``rows``: their images, or all their kept slices
        ``(n * S, C, H, W)``, session-major (:meth:`SliceView.to_slices`)."""
        images = self.images_of(rows)
        return torch.from_numpy(images) if self.slices is None else self.slices.to_slices(images)

    def predict(self, model: nn.Module, rows: pd.DataFrame, batch_size: int
                ) -> tuple[np.ndarray, pd.DataFrame | None, np.ndarray | None]:
        """Class probabilities ``(n, K)`` of the sessions ``rows``; for a slice model the soft
        vote (mean over the session's slices), with the per-slice rows (``slice`` column) and
        their probabilities ``(n * S, K)``; otherwise None, None."""
        if self.slices is None:
            data = Dataset(rows, self.images, np.zeros(len(rows), dtype=np.int64))
            return predict_proba(model, data, batch_size, self.device)[0], None, None
        # the slices of a few sessions at a time: a cohort's slices at once would not fit in
        # memory (100 sessions x 135 slices x 3 x 256 x 256 float32: 10 GB)
        per_call = max(1, batch_size // self.slices.n_slices)
        parts = []
        for start in range(0, len(rows), per_call):
            chunk = rows.iloc[start:start + per_call]
            slices = self.model_inputs(chunk).numpy()
            data = Dataset(slice_rows(chunk.assign(image_index=np.arange(len(chunk))),
                                      self.slices), slices, np.zeros(len(slices), dtype=np.int64))
            parts.append(predict_proba(model, data, batch_size, self.device)[0])
        probabilities = np.concatenate(parts)
        table = slice_rows(rows, self.slices).assign(image_index=np.repeat(
            rows["image_index"].to_numpy(), self.slices.n_slices))
        return soft_vote(table, probabilities)[1], table, probabilities

    def models(self, folds: list[int] | None) -> Iterator[tuple[int, int, FoldModel]]:
        """``(fold, run, FoldModel)`` of the selected folds, loaded one at a time. Folds
        without a trained model are named and left out (:meth:`RunFolder.selected_models`)."""
        for fold, run_index, folder in self.run.selected_models(folds):
            yield fold, run_index, self.model(fold, run_index)

    def model(self, fold: int, run: int) -> FoldModel:
        """The classifier of ``models/fold-K/run-R``."""
        model, description = load_model(self.run.model_dir(fold, run), self.device)
        return FoldModel(model.requires_grad_(False), description["classes"])


def load_context(run: RunFolder | Path, device: str, progress: Progress | None = None,
                 cohort: Cohort | Path | None = None) -> RunContext:
    """Load ``run``'s cohort (or ``cohort``: a TSV or a read :class:`Cohort`) the way training
    loaded it: same downsampling, same disk cache.

    Raises:
        RunFolderError: no trained model, or another cohort's images are not on the training
            grid (shape, channels or affine).
    """
    run = run if isinstance(run, RunFolder) else RunFolder(Path(run))
    train = run.train_config()
    if cohort is None or isinstance(cohort, (str, Path)):
        cohort = Cohort.from_tsv(run.cohort_file if cohort is None else Path(cohort),
                                 sequences=train.sequences)
    stack = load_images(cohort, train.downsample,
                        run.cache_dir if train.cache == "disk" else None,
                        progress_callback(progress, "loading cohort", len(cohort)))
    if Path(cohort.source).resolve() != run.cohort_file.resolve():
        run.check_training_grid(cohort.source, stack.array.shape[1:], stack.affine)
    return RunContext(run, train, cohort.table, stack.array,
                      Grid(tuple(stack.array.shape[2:]), stack.affine), resolve_device(device),
                      cohort.source, run.slice_view())


#: Contexts loaded by :func:`shared_context` in this process, by what they were loaded from.
_SHARED: dict[tuple, RunContext] = {}


def shared_context(run: Path, device: str, cohort: Path | None = None,
                   progress: Progress | None = None) -> RunContext:
    """:func:`load_context`, loaded once per process: the units of a step (run here, or as
    tasks of one Ray worker) share it. A context is reloaded when its cohort TSV, the run's
    ``cohort.tsv`` or its ``grid.json`` changed on disk; at most two are kept (a run's own
    cohort and another one), until :func:`release_contexts`."""
    folder = RunFolder(Path(run))
    sources = [folder.cohort_file, folder.grid_file] + ([Path(cohort)] if cohort else [])
    key = (str(Path(run).resolve()), device, str(cohort and Path(cohort).resolve()),
           tuple(path.stat().st_mtime_ns if path.is_file() else None for path in sources))
    if key not in _SHARED:
        for old in [old for old in _SHARED if old[:3] == key[:3]] + list(_SHARED)[:-1]:
            _SHARED.pop(old, None)
        _SHARED[key] = load_context(folder, device, progress,
                                    None if cohort is None else Path(cohort))
    return _SHARED[key]


def release_contexts() -> None:
    """Forget the contexts of :func:`shared_context` (their images), at the end of a step."""
    _SHARED.clear()


def progress_callback(progress: Progress | None, description: str,
                      total: int) -> Callable[[int, int], None] | None:
    """A ``(done, total)`` callback that moves a new task of ``progress`` (None without one)."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)
    return lambda done, _total: progress.update(task, completed=done)
