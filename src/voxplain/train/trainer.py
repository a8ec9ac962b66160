"""Cross-validated training of a classifier on a cohort (paper 1, sections 2.2.1 and 2.2.3).

Adam + cross-entropy; after each epoch the model is evaluated on the fold's validation sessions.
Early stopping (paper 1, 2.2.3): training stops once the validation loss has stayed above its
lowest value for ``patience`` consecutive epochs, or after ``epochs`` epochs. Patience counts
only epochs that end after ``min_steps`` optimisation steps: a model still at chance has a
validation loss near log(K) that wobbles for a few epochs before it falls, and paper 1's rule
alone stopped such folds at chance (3 folds of 60 subjects, 5 steps per epoch: two of them
stopped at epoch 6 with balanced accuracy 0.50). The kept model is the one with the highest
validation balanced accuracy (ties: lower validation loss). A fold whose kept model cannot be
told from chance (permutation p-value of its validation balanced accuracy above
``chance_alpha``) is flagged (``at_chance`` in metrics.tsv) and named in a warning. Every
fold/run is resumable: finished ones are skipped, an interrupted one continues from its last
epoch checkpoint.

Slice models (paper 2): a :class:`Dataset` may hold one row per slice (a ``slice`` column, the
slice's voxel index in its volume); training, early stopping and model selection then work on
slices, and the evaluation of a subset reports both levels: ``predictions-SUBSET-slices.tsv``
and the metrics of subset ``SUBSET-slices`` per slice, ``predictions-SUBSET.tsv`` and the
metrics of ``SUBSET`` per session by soft vote (the mean of the class probabilities over the
session's slices, :func:`soft_vote`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from voxplain.config import ModelConfig, TrainConfig
from voxplain.data.cohort import encode_labels
from voxplain.data.slicing import SliceView
from voxplain.evaluate.classification import chance_p_value, classification_metrics
from voxplain.io import write_tsv
from voxplain.models.layout import for_batches
from voxplain.models.serialization import initial_model, save_model
from voxplain.train.augment import augment
from voxplain.models.checkpoint import (TrainingState, load_checkpoint, remove_checkpoint,
                                       save_checkpoint)
from voxplain.train.splits import Fold

log = logging.getLogger("voxplain")

SPLIT_COLUMNS = ["participant_id", "session_id", "diagnosis"]


@dataclass(frozen=True)
class Dataset:
    """Sessions of a cohort and their images: ``images[table.image_index]`` are the inputs."""

    table: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray

    def batches(self, batch_size: int, order: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x (B, C, *spatial) float32, y (B,) int64)`` in ``order`` (default: table order)."""
        order = np.arange(len(self.table)) if order is None else order
        index = self.table["image_index"].to_numpy()
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            images = np.ascontiguousarray(self.images[index[rows]])
            yield torch.from_numpy(images), torch.from_numpy(self.labels[rows])


def slice_rows(table: pd.DataFrame, view: SliceView) -> pd.DataFrame:
    """One row per kept slice of each session of ``table`` (session-major, slices in order),
    with ``slice`` (voxel index in the volume) and ``image_index`` pointing into
    ``view.to_slices`` of the volumes ``table.image_index`` pointed to."""
    n = view.n_slices
    repeated = table.loc[table.index.repeat(n)].copy()
    repeated["slice"] = np.tile(np.asarray(view.indices, dtype=np.int64), len(table))
    repeated["image_index"] = (np.repeat(table["image_index"].to_numpy(), n) * n
                               + np.tile(np.arange(n), len(table)))
    return repeated


def slice_dataset(data: Dataset, view: SliceView, images: np.ndarray) -> Dataset:
    """``data`` (one row per session) as one row per slice, reading ``images``, the slices
    ``view.to_slices(volumes)`` of the volumes ``data`` reads."""
    return Dataset(slice_rows(data.table, view), images, np.repeat(data.labels, view.n_slices))


def soft_vote(table: pd.DataFrame, probabilities: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-session rows (first row of each session, without ``slice``) and the mean class
    probabilities ``(sessions, K)`` over each session's slices, in the table's session order."""
    keys = ["participant_id", "session_id"]
    codes, _ = pd.MultiIndex.from_frame(table[keys]).factorize()
    counts = np.bincount(codes)
    sums = np.zeros((len(counts), probabilities.shape[1]))
    np.add.at(sums, codes, probabilities)
    first = table.drop(columns=[c for c in ("slice",) if c in table]).iloc[
        np.unique(codes, return_index=True)[1]]
    return first.reset_index(drop=True), sums / counts[:, None]


def train_fold(config: TrainConfig, model_config: ModelConfig, classes: list[str], fold: Fold,
               run_index: int, images: np.ndarray, folder: Path, device: torch.device,
               test: Dataset | None = None, progress: Progress | None = None) -> None:
    """Train one model of one fold, resuming from ``folder``'s checkpoint if there is one."""
    seed = config.seed + run_index
    torch.manual_seed(seed)
    model = for_batches(initial_model(model_config).to(device), images.ndim - 2,
                        config.batch_size, device)  # channels-last on the CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    train = Dataset(fold.train, images, encode_labels(fold.train, classes, config.cohort))
    validation = Dataset(fold.validation, images, encode_labels(fold.validation, classes, config.cohort))
    weights = (torch.as_tensor(class_weights(train.labels, len(classes)), dtype=torch.float32,
                               device=device) if config.class_weights == "balanced" else None)
    restored = load_checkpoint(folder, model, optimizer)
    state, best = restored if restored else (TrainingState(), _state_copy(model))
    if restored:
        log.info("fold %d run %d: resuming at epoch %d", fold.index, run_index, state.next_epoch)
    task = (progress.add_task(f"fold {fold.index} run {run_index}", total=config.epochs,
                              completed=state.next_epoch) if progress else None)
    while state.next_epoch < config.epochs and state.epochs_above_lowest < config.patience:
        epoch = state.next_epoch
        started = time.perf_counter()
        rng = np.random.default_rng([seed, fold.index, epoch])  # order, then augmentation draws
        order = rng.permutation(len(train.table))
        train_loss, train_accuracy, steps = _train_epoch(
            model, optimizer, train, order, config.batch_size, device,
            partial(augment, kinds=config.augmentation, rng=rng), weights)
        state.steps += steps
        probabilities, validation_loss = predict_proba(model, validation, config.batch_size,
                                                       device)
        scores = classification_metrics(validation.labels, probabilities)
        _update_state(state, model, best, validation_loss, scores["balanced_accuracy"],
                      counts=state.steps >= config.min_steps, select_by=config.select_by)
        state.history.append({
            "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
            "validation_loss": validation_loss,
            "validation_balanced_accuracy": scores["balanced_accuracy"],
            "seconds": time.perf_counter() - started})
        state.next_epoch = epoch + 1
        save_checkpoint(folder, state, model, best, optimizer)
        if progress is not None and task is not None:
            progress.update(task, completed=state.next_epoch, description=(
                f"fold {fold.index} run {run_index} val loss {validation_loss:.3f} "
                f"BA {scores['balanced_accuracy']:.2f}"))
    model.load_state_dict(best)
    _finish(folder, model, model_config, classes, config, fold, run_index, state, validation,
            test, device)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``balanced`` class weights ``N / (K n_c)`` of the training labels (scikit-learn's
    definition): each class weighs as much in the loss as a balanced set would give it. A class
    absent from ``labels`` gets weight 0 (it has no sample to weigh)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    with np.errstate(divide="ignore"):
        weights = len(labels) / (n_classes * counts.astype(np.float64))
    return np.where(counts > 0, weights, 0.0)


def _update_state(state: TrainingState, model: nn.Module, best: dict[str, torch.Tensor],
                  loss: float, balanced_accuracy: float, counts: bool = True,
                  select_by: str = "balanced_accuracy") -> None:
    """Record one epoch: the lowest validation loss, the patience counter (only an epoch that
    ``counts``, i.e. ends after ``min_steps``, adds to it) and the best model so far: highest
    validation balanced accuracy, ties to the lower loss (``select_by="balanced_accuracy"``),
    or lowest validation loss (``"loss"``, paper 2)."""
    if loss < state.lowest_loss:
        state.lowest_loss, state.epochs_above_lowest = loss, 0
    elif counts:
        state.epochs_above_lowest += 1
    accuracy = -1.0 if np.isnan(balanced_accuracy) else balanced_accuracy
    if select_by == "loss":
        better = loss < state.best_loss
    else:
        better = (accuracy, -loss) > (state.best_balanced_accuracy, -state.best_loss)
    if better:
        state.best_balanced_accuracy, state.best_loss = accuracy, loss
        state.best_epoch = state.next_epoch
        best.update(_state_copy(model))


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                 order: np.ndarray, batch_size: int, device: torch.device,
                 transform: Callable[[torch.Tensor], torch.Tensor],
                 weights: torch.Tensor | None = None) -> tuple[float, float, int]:
    """One pass over ``data`` in ``order``, each batch passed through ``transform`` (the
    augmentation); returns the mean loss and accuracy seen in training and the number of
    optimisation steps. ``weights``: per-class weights of the cross-entropy (each batch's loss
    is the weighted mean, ``sum w_y l / sum w_y``, as :func:`torch.nn.functional.cross_entropy`
    defines it).

    A trailing batch of a single image is skipped: batch-norm cannot normalise one sample whose
    feature maps have shrunk to one voxel.
    """
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for x, y in data.batches(batch_size, order):
        if len(y) == 1 and seen:
            break
        x, y = transform(x).to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, weight=weights)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        steps += 1
    return total_loss / max(seen, 1), correct / max(seen, 1), steps


@torch.no_grad()
def predict_proba(model: nn.Module, data: Dataset, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, float]:
    """Softmax probabilities ``(N, K)`` of ``data`` in table order, and the mean cross-entropy."""
    model.eval()
    outputs, total_loss = [], 0.0
    for x, y in data.batches(batch_size):
        logits = model(x.to(device))
        total_loss += float(nn.functional.cross_entropy(logits, y.to(device), reduction="sum"))
        outputs.append(torch.softmax(logits, dim=1).cpu().numpy())
    return np.concatenate(outputs), total_loss / len(data.table)


def prediction_table(data: Dataset | pd.DataFrame, probabilities: np.ndarray,
                     classes: list[str]) -> pd.DataFrame:
    """Per-session (or per-slice: with ``slice``) probabilities: ids, diagnosis, ``slice``,
    ``proba_CLASS`` columns, ``predicted``."""
    rows = data.table if isinstance(data, Dataset) else data
    columns = SPLIT_COLUMNS + (["slice"] if "slice" in rows else [])
    table = rows[columns].reset_index(drop=True).copy()
    for i, name in enumerate(classes):
        table[f"proba_{name}"] = probabilities[:, i]
    table["predicted"] = [classes[i] for i in probabilities.argmax(axis=1)]
    return table


def _cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of probabilities (clipped away from 0)."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def _finish(folder: Path, model: nn.Module, model_config: ModelConfig, classes: list[str],
            config: TrainConfig, fold: Fold, run_index: int, state: TrainingState,
            validation: Dataset, test: Dataset | None, device: torch.device) -> None:
    """Write the best model, history, predictions and, last (it marks the model done), metrics."""
    save_model(folder, model, model_config, classes, {
        "fold": fold.index, "run": run_index, "seed": config.seed + run_index,
        "best_epoch": state.best_epoch, "downsample": config.downsample})
    write_tsv(folder / "history.tsv", pd.DataFrame(state.history))
    rows = []

    def evaluated(subset: str, table: pd.DataFrame, labels: np.ndarray,
                  probabilities: np.ndarray, loss: float) -> None:
        write_tsv(folder / f"predictions-{subset}.tsv", prediction_table(table, probabilities,
                                                                         classes))
        p_value = chance_p_value(labels, probabilities.argmax(1), seed=config.seed)
        rows.append({"fold": fold.index, "run": run_index, "subset": subset,
                     "best_epoch": state.best_epoch, "epochs": len(state.history),
                     "steps": state.steps, "loss": loss,
                     **classification_metrics(labels, probabilities),
                     "chance_p": p_value, "at_chance": not p_value <= config.chance_alpha})

    for subset, data in (("validation", validation), ("test", test)):
        if data is None:
            continue
        probabilities, loss = predict_proba(model, data, config.batch_size, device)
        if "slice" not in data.table:
            evaluated(subset, data.table, data.labels, probabilities, loss)
            continue
        sessions, voted = soft_vote(data.table, probabilities)
        labels = encode_labels(sessions, classes, config.cohort)
        evaluated(subset, sessions, labels, voted, _cross_entropy(voted, labels))
        evaluated(f"{subset}-slices", data.table, data.labels, probabilities, loss)
    write_tsv(folder / "metrics.tsv", pd.DataFrame(rows))
    remove_checkpoint(folder)
    validation_row = rows[0]
    log.info("fold %d run %d: validation balanced accuracy %.3f (epoch %d of %d, %d steps)",
             fold.index, run_index, validation_row["balanced_accuracy"], state.best_epoch,
             len(state.history), state.steps)
    if validation_row["at_chance"]:
        log.warning("fold %d run %d ended at chance: validation balanced accuracy %.3f, "
                    "permutation p = %.3g > %g; its maps explain a model that did not learn "
                    "the task (more epochs, --min-steps or another learning rate may help)",
                    fold.index, run_index, validation_row["balanced_accuracy"],
                    validation_row["chance_p"], config.chance_alpha)
