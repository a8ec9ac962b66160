"""CyCE on a run folder: ``voxplain cyce train`` and ``voxplain cyce transfer``.

For each selected fold/run with a trained classifier, CyCE is trained on the fold's *training*
sessions (the images the classifier learnt from; their labels are never used) and evaluated on
its *validation* sessions, unseen by both. Outputs, in ``RUN/cyce/fold-K/run-R/``:
``generators.safetensors`` + ``generators.json`` (the explainer reads these), ``loss.tsv`` (every
loss term per step), ``transfer.tsv``. A fold/run whose generators exist is skipped; an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from voxplain.config import CyCEStepConfig, CyCETransferConfig
from voxplain.data.classes import class_index
from voxplain.evaluate.transfer import transfer_probabilities, transfer_table
from voxplain.explain.cyce.relevance import DESCRIPTION, CyCEGenerators
from voxplain.explain.cyce.training import CyCETrainer
from voxplain.io import read_tsv, write_tsv
from voxplain.models.checkpoint import remove_state
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder, RunFolderError, Unit, fold_unit_name, map_fold_units
from voxplain.run.executor import with_absolute_paths
from voxplain.steps.context import RunContext, load_context, release_contexts, shared_context

log = logging.getLogger("voxplain")


def split_images(context: RunContext, fold: int, subset: str) -> np.ndarray:
    """Images of the fold's ``subset`` (train or validation) sessions, in the cohort's order."""
    return context.images_of(context.split_rows(fold, subset))


def _check_binary(classes: list[str], folder: Path) -> None:
    if len(classes) != 2:
        raise ValueError(f"{folder}: CyCE explains two-class classifiers (paper 3); this model "
                         f"has {len(classes)} classes {classes}")


def run_cyce_train(config: CyCEStepConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Train CyCE for every selected fold/run (a unit each, on ``config.executor``); one
    summary row per fold/run."""
    run = RunFolder(config.run)
    run.train_config()
    run.refuse_slice_models("CyCE")
    try:
        shared_context(config.run, config.device, progress=progress)  # the cohort is checked
        run.record_config("cyce_train", config)
        shipped = with_absolute_paths(config)
        units = [Unit(fold_unit_name(fold, run_index), FoldCyCE(shipped, fold, run_index))
                 for fold, run_index, _ in run.selected_models(config.folds)]
        work = partial(cyce_unit, progress=progress if config.executor.kind == "local"
                       else None)
        rows = map_fold_units(units, work, config.executor, "CyCE", progress)
    finally:
        release_contexts()
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class FoldCyCE:
    """One unit of ``voxplain cyce train`` (:mod:`voxplain.run.executor`): the generators of
    one fold/run's classifier. Small and picklable: a Ray worker reloads the run's context
    (once per worker) and the classifier itself."""

    config: CyCEStepConfig
    fold: int
    run: int


def cyce_unit(unit: FoldCyCE, progress: Progress | None = None) -> dict[str, object]:
    """Train (or resume) CyCE for one fold/run and return its summary row; a fold/run whose
    generators exist is skipped. Here or in a Ray task."""
    config, fold, run_index = unit.config, unit.fold, unit.run
    context = shared_context(config.run, config.device)
    run = context.run
    folder, model_folder = run.cyce_dir(fold, run_index), run.model_dir(fold, run_index)
    if (folder / DESCRIPTION).is_file():
        log.info("CyCE fold %d run %d already trained: skipped", fold, run_index)
        remove_state(folder)  # left by a kill between generators.json and its removal
        return _summary(folder, fold, run_index)
    classifier, description = load_model(model_folder, context.device)
    _check_binary(description["classes"], model_folder)
    images = split_images(context, fold, "train")
    positive = class_index(config.cyce.positive_class, description["classes"])
    trainer = CyCETrainer(classifier, images,
                          config.cyce.model_copy(update={"positive_class": positive}),
                          context.device)
    task = (progress.add_task(f"CyCE fold {fold} run {run_index}",
                              total=config.cyce.max_steps) if progress else None)

    def show(step: int, losses: dict[str, float]) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=step, description=_loss_line(fold, run_index,
                                                                        losses))

    started = time.perf_counter()
    state = trainer.fit(folder, show)
    generators = CyCEGenerators(trainer.networks["g_plus"], trainer.networks["g_minus"])
    write_tsv(folder / "loss.tsv", pd.DataFrame(state.history))
    generators.save(folder, {**trainer.description(), "fold": fold, "run": run_index,
                             "classes": description["classes"],
                             "classifier": str(model_folder.relative_to(run.root)),
                             "training_images": len(images),
                             "seconds_this_session": time.perf_counter() - started})
    remove_state(folder)
    log.info("CyCE fold %d run %d: %d steps (%s)", fold, run_index, state.next_step,
             state.stop_reason)
    return _summary(folder, fold, run_index)


def _loss_line(fold: int, run_index: int, losses: dict[str, float]) -> str:
    return (f"CyCE fold {fold} run {run_index} G {losses['generator']:.3f} "
            f"D {losses['discriminator']:.3f} cyc {losses['cycle_plus']:.3f}/"
            f"{losses['cycle_minus']:.3f} sim {losses['similarity_plus']:.3f}/"
            f"{losses['similarity_minus']:.3f} adv {losses['adversarial_plus']:.2f}/"
            f"{losses['adversarial_minus']:.2f} AM {losses['activation_plus']:.2f}/"
            f"{losses['activation_minus']:.2f} p+ {losses['probability_plus']:.2f} "
            f"p- {losses['probability_minus']:.2f}")


def _summary(folder: Path, fold: int, run_index: int) -> dict[str, object]:
    losses = read_tsv(folder / "loss.tsv")
    last = losses.tail(50).mean(numeric_only=True)
    return {"fold": fold, "run": run_index, "steps": len(losses),
            "seconds_per_step": float(losses.seconds.mean()),
            **{name: float(last[name]) for name in ("generator", "discriminator",
                                                     "probability_plus", "probability_minus")}}


def run_cyce_transfer(config: CyCETransferConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Domain transfer (paper 3, 4.1) of every trained fold/run; writes ``transfer.tsv`` each."""
    run = RunFolder(config.run)
    run.refuse_slice_models("CyCE")
    context = load_context(run, config.device, progress)
    run.record_config("cyce_transfer", config, replace=True)
    tables = []
    for fold, run_index, model_folder in run.selected_models(config.folds):
        folder = run.cyce_dir(fold, run_index)
        if not (folder / DESCRIPTION).is_file():
            log.warning("CyCE fold %d run %d: no generators (%s): skipped", fold, run_index, folder)
            continue
        classifier, description = load_model(model_folder, context.device)
        _check_binary(description["classes"], model_folder)
        generators = CyCEGenerators.load(folder, context.device)
        positive = int(generators.description.get("positive_class", 1))
        probabilities = transfer_probabilities(
            classifier, generators, split_images(context, fold, config.subset), positive,
            config.batch_size, context.device)
        table = transfer_table(probabilities, config.confidence).assign(
            fold=fold, run=run_index, subset=config.subset,
            positive_class=description["classes"][positive])
        write_tsv(folder / "transfer.tsv", table)
        tables.append(table)
    if not tables:
        raise RunFolderError(f"{run.root}: no trained CyCE generators; run `voxplain cyce train`")
    return pd.concat(tables, ignore_index=True)
