"""``voxplain search``: paper 1's random search of the CNN and its training (2.2.2) with Optuna.

::

    RUN/search/
      study.db              the Optuna study (SQLite): every trial, its parameters and value
      trial-NNN/            one run folder per trial, written by `voxplain train`'s code
      trials.tsv            number, state, value, seconds, the parameters, folder
      best_train.toml       the best trial's training settings: `voxplain train --config` reads it

Each trial trains the base settings (the ``voxplain train`` fields of
:class:`~voxplain.config.SearchConfig`) with the point of the space it draws
(:func:`voxplain.train.search.suggest_settings`), on the first split (paper 1: "only one
experiment was performed per architecture tested using the first split of the CV") or on every
fold, with the same splits as the base (``n_folds``, ``split_seed``). Its value is the mean
validation balanced accuracy (maximised, paper 1) or loss (minimised) of its models. The
sampler is Optuna's ``RandomSampler`` (paper 1) or ``TPESampler``; trial n draws with a sampler
seeded ``sampler_seed + n``, so the same seed gives the same trials, resumed or not.

Where trials run: each trial is a unit of :mod:`voxplain.run.executor` (:class:`SearchTrial`,
:func:`trial_unit`), run in batches of :func:`~voxplain.run.executor.parallel_units` trials (1
with the ``local`` executor: one trial after the other, as before; on Ray, as many as the
cluster holds tasks of ``cpus_per_task``). The driver (this process) checks the cohort, asks the
study for every trial of a batch (trial n still drawn with seed ``sampler_seed + n``, so a batch
draws the trials a local search draws; only TPE, which learns from finished trials, does not
see the values of the trials of its own batch), stores their parameters, tells the study each
value when the batch is done and writes ``trials.tsv`` and ``best_train.toml`` after every
batch. A unit rebuilds its trial's settings from the parameters and trains its run folder with
the local executor (``cpus_per_task`` threads): in this process with the cohort already read,
or in a Ray task, which reads the cohort once per worker process. A trial's value is the same
wherever it ran (on the CPU with the same threads, its models are bit-identical).

Resume: the study lives in ``study.db``; a search asked for ``n_trials`` runs only the trials
missing to reach ``n_trials`` finished (COMPLETE) ones, and never retrains a finished trial.
A trial left RUNNING (the search was killed or interrupted during it; on Ray, every trial of
the batch that had not finished) is marked FAIL and retried first with the same parameters, in
its own folder renamed to the new trial's (its training resumes from the epoch checkpoint). A
trial whose training raised an error is FAIL and not retried: the error stops the search (on
Ray as :class:`~voxplain.run.executor.UnitFailed` naming the trial); the trials of its batch
that had finished keep their value, the others are FAIL.

``best_train.toml`` holds ``[train]`` with the base settings, the best trial's and ``run`` =
the search's run folder: ``voxplain train --config RUN/search/best_train.toml`` then trains
every fold of the chosen configuration in ``RUN`` (or in ``--run`` elsewhere).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.progress import Progress

from voxplain.config import ExecutorConfig, SearchConfig, TrainConfig, to_toml
from voxplain.io import read_tsv, write_text, write_tsv
from voxplain.run import RunFolder
from voxplain.run.executor import (ProcessShared, Unit, map_units, parallel_units,
                                    with_absolute_paths)
from voxplain.steps.train import PreparedCohort, prepare_cohort, run_train
from voxplain.train.search import suggest_settings, trial_config

log = logging.getLogger("voxplain")

STUDY_NAME = "search"


def trial_dir(run: Path, number: int) -> Path:
    """``RUN/search/trial-NNN``: the run folder of Optuna trial ``number``."""
    return RunFolder(run).search_dir / f"trial-{number:03d}"


def open_study(config: SearchConfig) -> optuna.Study:
    """The search's Optuna study in ``RUN/search/study.db``, created or loaded."""
    folder = RunFolder(config.run).search_dir
    folder.mkdir(parents=True, exist_ok=True)
    direction = "maximize" if config.objective == "balanced_accuracy" else "minimize"
    return optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name=STUDY_NAME,
                               direction=direction, load_if_exists=True)


def run_search(config: SearchConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Run the trials missing to reach ``config.n_trials`` finished ones; return (and write)
    the trials table ``RUN/search/trials.tsv``."""
    run = RunFolder(config.run)
    prepared = prepare_cohort(config, run, progress)
    run.record_config("search", config)
    study = open_study(config)
    _retry_interrupted(study)
    done = _count(study, TrialState.COMPLETE)
    missing = max(0, config.n_trials - done)
    log.info("search: %d of %d trials finished, %d to run", done, config.n_trials, missing)
    task = (progress.add_task("search trials", total=config.n_trials, completed=done)
            if progress else None)
    shipped = with_absolute_paths(config)
    work = partial(trial_unit, progress=progress if config.executor.kind == "local" else None)
    with _COHORTS.sharing(shipped, Path(shipped.cohort), prepared):  # for the units run here
        while missing > 0:
            batch = min(missing, parallel_units(config.executor))  # 1 here
            trials = [_ask(config, study) for _ in range(batch)]
            units = [Unit(f"trial {trial.number}", SearchTrial(shipped, trial.number,
                                                               dict(trial.params)))
                     for trial in trials]
            try:
                results = map_units(units, work, config.executor, "search", progress)
            except BaseException as error:
                # a failed unit fails its batch's unfinished trials; a kill leaves them RUNNING
                _tell(config, study, trials, {}, progress, task,
                      unfinished=TrialState.FAIL if isinstance(error, Exception) else None)
                _write_results(config, study)
                raise
            _tell(config, study, trials, {result.number: result for result in results},
                  progress, task)
            _write_results(config, study)
            missing -= len(trials)
    return _write_results(config, study)


@dataclass(frozen=True)
class SearchTrial:
    """One unit of the search (:mod:`voxplain.run.executor`): trial ``number``, drawn (and
    stored in the study) by the driver as ``params``. Small and picklable: a Ray worker reads
    the cohort itself."""

    config: SearchConfig
    number: int
    params: dict[str, Any]


@dataclass(frozen=True)
class TrialResult:
    """What a trial's unit returns: its objective and the seconds its training took."""

    number: int
    value: float
    seconds: float


#: The :class:`PreparedCohort` of this process (one at a time).
_COHORTS: ProcessShared[PreparedCohort] = ProcessShared()


def trial_unit(unit: SearchTrial, progress: Progress | None = None) -> TrialResult:
    """Train trial ``unit.number``'s run folder with its parameters (on the local executor,
    resuming what it finds there) and return its objective; here or in a Ray task, which
    reads the cohort once per worker process."""
    config = unit.config
    prepared = _COHORTS.get(config, Path(config.cohort),
                            lambda: prepare_cohort(config, RunFolder(config.run), None))
    started = time.perf_counter()
    settings = trial_config(config, suggest_settings(optuna.trial.FixedTrial(unit.params),
                                                     config.space),
                            run=trial_dir(config.run, unit.number),
                            executor=ExecutorConfig(cpus_per_task=config.executor.cpus_per_task))
    metrics = run_train(settings, progress, prepared=prepared,
                        folds=[0] if config.trial_folds == "first" else None)
    return TrialResult(unit.number, _objective(config, metrics), time.perf_counter() - started)


def _ask(config: SearchConfig, study: optuna.Study) -> optuna.Trial:
    """The study's next trial (an interrupted one's retry first), its parameters drawn and
    stored, its folder ready (a retry's is the interrupted trial's, renamed: its checkpoint
    resumes the training)."""
    study.sampler = _sampler(config, seed=config.sampler_seed + len(study.trials))
    trial = study.ask()
    suggest_settings(trial, config.space)
    folder = trial_dir(config.run, trial.number)
    retried = trial.user_attrs.get("retry_of")
    if retried is not None and trial_dir(config.run, retried).is_dir() and not folder.exists():
        trial_dir(config.run, retried).rename(folder)
    trial.set_user_attr("folder", folder.name)
    return trial


def _tell(config: SearchConfig, study: optuna.Study, trials: list[optuna.Trial],
          results: dict[int, TrialResult], progress: Progress | None, task: Any,
          unfinished: TrialState | None = TrialState.FAIL) -> None:
    """Tell the study the value of each trial of a batch: its unit's result, or, when the
    batch stopped, what its folder's ``cross_validation.tsv`` holds (a unit that finished);
    a trial without either is told ``unfinished`` (None: left RUNNING, retried next time)."""
    for trial in trials:
        result = results.get(trial.number)
        value = result.value if result is not None else _finished_value(config, trial.number)
        if value is None:
            if unfinished is not None:
                study.tell(trial, state=unfinished)
            continue
        if result is not None:
            trial.set_user_attr("seconds", result.seconds)
        study.tell(trial, value)
        log.info("trial %d: %s %.4f (%s)", trial.number, config.objective, value,
                 ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
        if progress is not None and task is not None:
            progress.update(task, advance=1, description=f"search trials (best "
                            f"{config.objective} {study.best_value:.3f})")


def _finished_value(config: SearchConfig, number: int) -> float | None:
    summary = RunFolder(trial_dir(config.run, number)).evaluation_file("cross_validation.tsv")
    return _objective(config, read_tsv(summary)) if summary.is_file() else None


def _objective(config: SearchConfig, metrics: pd.DataFrame) -> float:
    """A trial's value: the mean validation objective of its models."""
    validation = metrics[metrics.subset == "validation"]
    return float(validation[config.objective].mean())


def _sampler(config: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _retry_interrupted(study: optuna.Study) -> None:
    """Mark FAIL the trials a killed search left RUNNING and enqueue their parameters again
    (one search runs per run folder: a RUNNING trial at start is not running anywhere)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d was interrupted: retried with the same parameters", trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, seconds, its parameters (the convolutions of
    its blocks, Optuna's ``convs_block_B``, as one ``convs_per_block`` text "1,3,2"), folder."""
    rows = [{"number": t.number, "state": t.state.name, "value": t.value,
             "seconds": _seconds(t), **_readable(t.params), "folder": t.user_attrs.get("folder")}
            for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows)


def _readable(params: dict[str, Any]) -> dict[str, Any]:
    convs = [str(params[f"convs_block_{b}"]) for b in range(1, params.get("blocks", 0) + 1)
             if f"convs_block_{b}" in params]
    readable = {k: v for k, v in params.items() if not k.startswith("convs_block_")}
    if convs:  # after the first width, in the order the trial drew them
        keys = list(readable)
        at = keys.index("first_channels") + 1 if "first_channels" in keys else len(keys)
        readable = {**dict(list(readable.items())[:at]), "convs_per_block": ",".join(convs),
                    **dict(list(readable.items())[at:])}
    return readable


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def best_train_config(config: SearchConfig, trial: FrozenTrial) -> TrainConfig:
    """The training settings of ``trial`` (base + its parameters) in the search's run folder."""
    fixed = optuna.trial.FixedTrial(trial.params)
    return trial_config(config, suggest_settings(fixed, config.space), run=config.run)


def _write_results(config: SearchConfig, study: optuna.Study) -> pd.DataFrame:
    table = trials_table(study)
    folder = RunFolder(config.run).search_dir
    write_tsv(folder / "trials.tsv", table)
    if _count(study, TrialState.COMPLETE):
        best = best_train_config(config, study.best_trial)
        write_text(folder / "best_train.toml",
                   f"# best trial {study.best_trial.number}: {config.objective} "
                   f"{study.best_value:.4f}\n" + to_toml({"train": best}))
    return table


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
