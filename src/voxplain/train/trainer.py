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
from voxplain.data.cohort import (Cohort, CohortError, ImageStack, class_counts, class_names,
                                  encode_labels, load_images, quality_check)
from voxplain.evaluate.classification import chance_p_value, classification_metrics
from voxplain.io import write_json, write_tsv
from voxplain.models.layout import for_batches
from voxplain.models.registry import build_model
from voxplain.models.serialization import save_model
from voxplain.run import RunFolder
from voxplain.train.augment import augment
from voxplain.train.checkpoint import (TrainingState, load_checkpoint, remove_checkpoint,
                                       save_checkpoint)
from voxplain.train.splits import Fold, baseline_sessions, subject_folds

log = logging.getLogger("voxplain")

SPLIT_COLUMNS = ["participant_id", "session_id", "diagnosis"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


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


@dataclass(frozen=True)
class PreparedCohort:
    """The training cohort after its checks: kept sessions, decoded images, classes, and the
    sessions rejected by the quality check."""

    cohort: Cohort
    stack: ImageStack
    classes: list[str]
    rejected: pd.DataFrame


def prepare_cohort(config: TrainConfig, run: RunFolder, progress: Progress | None) -> PreparedCohort:
    """Read, check, load and quality-check the training cohort; nothing is written to the run
    folder (but the image cache), so a cohort that fails its checks leaves no record."""
    cohort = Cohort.from_tsv(config.cohort, config.diagnosis_column, config.caps, config.caps_group)
    stack = _load(cohort, config, run, progress, "training cohort")
    table = cohort.table.assign(image_index=np.arange(len(cohort)), max_value=stack.maxima)
    passed = quality_check(stack.maxima, _qc_threshold(config, cohort))
    rejected = table.loc[~passed, [*SPLIT_COLUMNS, "path", "max_value"]].sort_values("max_value")
    kept = Cohort(table[passed].reset_index(drop=True), cohort.source, cohort.image_shape,
                  cohort.affine)
    if kept.table.empty:
        raise CohortError(f"{config.cohort}: every session was rejected by the quality check")
    classes = config.classes or class_names(kept.table["diagnosis"])
    present = set(kept.table["diagnosis"])
    if len(present) < 2:
        raise CohortError(f"{config.cohort}: only one diagnosis ({present.pop()}) in the cohort; "
                          "a classifier needs two")
    kept.labels(classes)  # raises on diagnoses outside the classes
    counts = class_counts(kept.table, classes)
    log.info("classes (sessions): %s", ", ".join(f"{name} {n}" for name, n in counts.items()))
    return PreparedCohort(kept, stack, classes, rejected)


def write_cohort_tables(config: TrainConfig, run: RunFolder, prepared: PreparedCohort) -> None:
    """``cohort.tsv`` (kept sessions), ``qc_rejected.tsv`` and ``grid.json`` (the grid the
    models take: spatial shape and affine after downsampling, channels)."""
    write_tsv(run.qc_rejected_file, prepared.rejected)
    if len(prepared.rejected):
        log.warning("quality check: %d session(s) with maximum < %s rejected (%s)",
                    len(prepared.rejected), config.qc_threshold, run.qc_rejected_file)
    write_tsv(run.cohort_file, prepared.cohort.table.drop(columns="image_index"))
    write_json(run.grid_file, {"shape": list(prepared.stack.array.shape[2:]),
                               "channels": int(prepared.stack.array.shape[1]),
                               "affine": np.asarray(prepared.stack.affine).tolist()})


def _qc_threshold(config: TrainConfig, cohort: Cohort) -> float | None:
    """The paper-1 check is defined on GM probability maps, i.e. volumes, not on 2D images."""
    return config.qc_threshold if cohort.spatial_dims == 3 else None


def _load(cohort: Cohort, config: TrainConfig, run: RunFolder, progress: Progress | None,
          what: str) -> ImageStack:
    task = progress.add_task(f"loading {what}", total=len(cohort)) if progress else None

    def advance(done: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=done)

    cache = run.cache_dir if config.cache == "disk" else None
    return load_images(cohort, config.downsample, cache, advance)


def train_cohort(config: TrainConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Train every fold x run of ``config``; return (and write) the metrics of every model.

    Returns one row per fold, run and evaluated subset (validation, test) with the metrics of
    :func:`~voxplain.evaluate.classification.classification_metrics`.
    """
    run = RunFolder(config.out)
    device = resolve_device(config.device)
    prepared = prepare_cohort(config, run, progress)
    cohort, stack, classes = prepared.cohort, prepared.stack, prepared.classes
    folds = subject_folds(cohort.table, config.folds, config.split_seed)
    test = _test_dataset(config, run, cohort, classes, progress)
    # recorded once the inputs are known to be usable: a failed command leaves no record that
    # would refuse the corrected one; a resumed run is checked before anything is rewritten
    run.record_config("train", config)
    for folder in ("models", "splits", "evaluation"):
        run.remove_leftovers(run.root / folder)
    write_cohort_tables(config, run, prepared)
    for fold in folds:
        write_tsv(run.split_file(fold.index, "train"), fold.train[SPLIT_COLUMNS])
        write_tsv(run.split_file(fold.index, "validation"), fold.validation[SPLIT_COLUMNS])
    model_config = config.model.model_copy(update={
        "in_channels": cohort.image_shape[0], "n_classes": len(classes),
        "input_shape": list(stack.array.shape[2:])})
    for fold in folds:
        for run_index in range(config.runs):
            folder = run.model_dir(fold.index, run_index)
            if (folder / "metrics.tsv").is_file():
                log.info("fold %d run %d already trained: skipped", fold.index, run_index)
                remove_checkpoint(folder)  # left by a kill between metrics.tsv and its removal
                continue
            train_fold(config, model_config, classes, fold, run_index, stack.array, folder,
                       device, test, progress)
    summary = pd.concat([pd.read_csv(folder / "metrics.tsv", sep="\t")
                         for _, _, folder in run.model_dirs()], ignore_index=True)
    write_tsv(run.root / "evaluation" / "cross_validation.tsv", summary)
    return summary


def _test_dataset(config: TrainConfig, run: RunFolder, cohort: Cohort, classes: list[str],
                  progress: Progress | None) -> Dataset | None:
    if config.test is None:
        return None
    test = Cohort.from_tsv(config.test, config.diagnosis_column, config.caps, config.caps_group)
    if test.image_shape != cohort.image_shape or not np.allclose(test.affine, cohort.affine,
                                                                  atol=1e-4):
        raise CohortError(f"{config.test}: images have shape {test.image_shape[1:]} and affine "
                          f"differing from the training cohort's {cohort.image_shape[1:]}")
    shared = set(test.table.participant_id) & set(cohort.table.participant_id)
    if shared:
        log.warning("%s: %d test subject(s) are also in the training cohort (e.g. %s); test "
                    "metrics will be optimistic", config.test, len(shared), sorted(shared)[0])
    stack = _load(test, config, run, progress, "test cohort")
    passed = quality_check(stack.maxima, _qc_threshold(config, test))
    table = test.table.assign(image_index=np.arange(len(test)))[passed]
    table = baseline_sessions(table).reset_index(drop=True)
    return Dataset(table, stack.array, encode_labels(table, classes, config.test))


def train_fold(config: TrainConfig, model_config: ModelConfig, classes: list[str], fold: Fold,
               run_index: int, images: np.ndarray, folder: Path, device: torch.device,
               test: Dataset | None = None, progress: Progress | None = None) -> None:
    """Train one model of one fold, resuming from ``folder``'s checkpoint if there is one."""
    seed = config.seed + run_index
    torch.manual_seed(seed)
    model = for_batches(build_model(model_config).to(device), images.ndim - 2,
                        config.batch_size, device)  # channels-last on the CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    train = Dataset(fold.train, images, encode_labels(fold.train, classes, config.cohort))
    validation = Dataset(fold.validation, images, encode_labels(fold.validation, classes, config.cohort))
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
            partial(augment, kind=config.augmentation, rng=rng))
        state.steps += steps
        probabilities, validation_loss = predict_proba(model, validation, config.batch_size,
                                                       device)
        scores = classification_metrics(validation.labels, probabilities)
        _update_state(state, model, best, validation_loss, scores["balanced_accuracy"],
                      counts=state.steps >= config.min_steps)
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


def _update_state(state: TrainingState, model: nn.Module, best: dict[str, torch.Tensor],
                  loss: float, balanced_accuracy: float, counts: bool = True) -> None:
    """Record one epoch: the lowest validation loss, the patience counter (only an epoch that
    ``counts``, i.e. ends after ``min_steps``, adds to it) and the best model so far."""
    if loss < state.lowest_loss:
        state.lowest_loss, state.epochs_above_lowest = loss, 0
    elif counts:
        state.epochs_above_lowest += 1
    accuracy = -1.0 if np.isnan(balanced_accuracy) else balanced_accuracy
    if (accuracy, -loss) > (state.best_balanced_accuracy, -state.best_loss):
        state.best_balanced_accuracy, state.best_loss = accuracy, loss
        state.best_epoch = state.next_epoch
        best.update(_state_copy(model))


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                 order: np.ndarray, batch_size: int, device: torch.device,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, int]:
    """One pass over ``data`` in ``order``, each batch passed through ``transform`` (the
    augmentation); returns the mean loss and accuracy seen in training and the number of
    optimisation steps.

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
        loss = nn.functional.cross_entropy(logits, y)
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


def prediction_table(data: Dataset, probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per-session probabilities: ids, diagnosis, ``proba_CLASS`` columns, ``predicted``."""
    table = data.table[SPLIT_COLUMNS].reset_index(drop=True).copy()
    for i, name in enumerate(classes):
        table[f"proba_{name}"] = probabilities[:, i]
    table["predicted"] = [classes[i] for i in probabilities.argmax(axis=1)]
    return table


def _finish(folder: Path, model: nn.Module, model_config: ModelConfig, classes: list[str],
            config: TrainConfig, fold: Fold, run_index: int, state: TrainingState,
            validation: Dataset, test: Dataset | None, device: torch.device) -> None:
    """Write the best model, history, predictions and, last (it marks the model done), metrics."""
    save_model(folder, model, model_config, classes, {
        "fold": fold.index, "run": run_index, "seed": config.seed + run_index,
        "best_epoch": state.best_epoch, "downsample": config.downsample})
    write_tsv(folder / "history.tsv", pd.DataFrame(state.history))
    rows = []
    for subset, data in (("validation", validation), ("test", test)):
        if data is None:
            continue
        probabilities, loss = predict_proba(model, data, config.batch_size, device)
        write_tsv(folder / f"predictions-{subset}.tsv", prediction_table(data, probabilities,
                                                                         classes))
        p_value = chance_p_value(data.labels, probabilities.argmax(1), seed=config.seed)
        rows.append({"fold": fold.index, "run": run_index, "subset": subset,
                     "best_epoch": state.best_epoch, "epochs": len(state.history),
                     "steps": state.steps, "loss": loss,
                     **classification_metrics(data.labels, probabilities),
                     "chance_p": p_value, "at_chance": not p_value <= config.chance_alpha})
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
