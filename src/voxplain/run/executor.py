"""Where the independent units of a step run (:class:`~voxplain.config.ExecutorConfig`).

A step that fans out (training's folds x runs, a mask grid's settings, masks per fold) names
its units and hands them to :func:`map_units` with the function that does one unit. The same
function runs in this process, one unit after the other (``local``), or as a task of a Ray
cluster (``ray``): it takes small picklable arguments (configs, fold and run numbers), reloads
what it needs from the run folder, writes there atomically and skips what is already written,
so a unit run twice (a retried Ray task, a resumed step) gives the same files. Ray is an
optional dependency, imported only when asked for.

Threads: a unit runs with ``cpus_per_task`` torch threads; locally, by default, with the CPUs
this process may use (its affinity and cgroup quota, not the machine's count: two torch
processes spinning on the same cores slow each other down several-fold).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from voxplain.config import ExecutorConfig

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["NoUnitProcessed", "ProcessShared", "Unit", "UnitFailed", "UnitSkipped",
           "available_cpus",
           "chunk_size", "map_units", "parallel_units", "session_chunks",
           "with_absolute_paths"]

log = logging.getLogger("voxplain")
T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C", bound=BaseModel)

#: How to install the optional dependency (named in the error when it is missing).
RAY_INSTALL = "pip install 'voxplain[ray]' (or: pip install -c constraints.txt 'ray==2.60.0')"


@dataclass(frozen=True)
class Unit(Generic[T]):
    """One independent piece of a step: its name in messages (``fold 0 run 1``,
    ``l1-0.001_l2-0.01_b1-0.1_b2-1 fold 0 run 0``) and the argument of the step's work
    function (small and picklable: it travels to a Ray worker)."""

    name: str
    argument: T


class UnitSkipped(Exception):
    """A unit that cannot serve its step (e.g. a fold without a correctly classified patient):
    named in a warning, the other units go on."""


class NoUnitProcessed(ValueError):
    """Every unit of a step was skipped; ``reasons``: ``UNIT: REASON`` of each."""

    def __init__(self, step: str, reasons: list[str]) -> None:
        super().__init__(f"{step}: no unit could be processed ({'; '.join(reasons)})")
        self.reasons = reasons


class UnitFailed(RuntimeError):
    """A unit that raised on a Ray worker (or whose worker died more than ``max_retries``
    times): the message names the step, the unit and the last line of the remote traceback."""


@dataclass(frozen=True)
class _Skipped:
    reason: str


def map_units(units: Iterable[Unit[T]], work: Callable[[T], R], executor: ExecutorConfig,
              name: str, progress: Progress | None = None) -> list[R]:
    """``work(unit.argument)`` for every unit, on ``executor``; the results in unit order.

    A unit that raises :class:`UnitSkipped` is named in a warning and left out of the results;
    :class:`NoUnitProcessed` when every unit was skipped. Locally, any other error of a unit
    propagates as it is and stops the step; on Ray it stops the step as :class:`UnitFailed`
    (the units still running are cancelled; what they finished stays written).

    ``progress``: on Ray, one bar for the step, moved as each unit finishes and naming the
    last one (the units' own bars, which ``work`` may move here, cannot move from a worker).
    """
    if executor.kind == "ray":
        units = list(units)
        outcomes = _on_ray(units, work, executor, name, progress)
    else:
        outcomes = _here(units, work, executor)
    results, reasons = [], []
    for unit, outcome in outcomes:
        if isinstance(outcome, _Skipped):
            log.warning("%s: %s skipped: %s", name, unit.name, outcome.reason)
            reasons.append(f"{unit.name}: {outcome.reason}")
        else:
            results.append(outcome)
    if reasons and not results:
        raise NoUnitProcessed(name, reasons)
    return results


def run_unit(work: Callable[[T], R], argument: T, threads: int | None) -> R | _Skipped:
    """One unit, here or in a Ray task: ``work(argument)`` with ``threads`` torch threads (None:
    as they are), a skipped unit as its reason."""
    with torch_threads(threads):
        try:
            return work(argument)
        except UnitSkipped as reason:
            return _Skipped(str(reason))


def _here(units: Iterable[Unit[T]], work: Callable[[T], R],
          executor: ExecutorConfig) -> Iterator[tuple[Unit[T], R | _Skipped]]:
    # lazily: the units of each_fold load a model each, one at a time
    threads = executor.cpus_per_task or min(_torch().get_num_threads(), available_cpus())
    for unit in units:
        yield unit, run_unit(work, unit.argument, threads)


def _on_ray(units: list[Unit[T]], work: Callable[[T], R], executor: ExecutorConfig,
            name: str, progress: Progress | None = None
            ) -> list[tuple[Unit[T], R | _Skipped]]:
    if not units:
        return []
    ray = _ray_cluster(executor)
    cpus = executor.cpus_per_task or 1
    task = ray.remote(run_unit).options(num_cpus=cpus, num_gpus=executor.gpus_per_task,
                                        max_retries=executor.max_retries, name=name)
    references = [task.remote(work, unit.argument, cpus) for unit in units]
    unit_of = dict(zip(references, units))
    outcomes = {}
    pending = list(references)
    log.info("%s: %d unit(s) sent to Ray (%s CPU, %s GPU each)", name, len(units), cpus,
             executor.gpus_per_task)
    bar = (progress.add_task(f"{name} on Ray: {len(units)} units", total=len(units))
           if progress is not None else None)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for reference in done:
            try:
                outcomes[reference] = ray.get(reference)
            except ray.exceptions.RayError as error:
                for other in pending:
                    ray.cancel(other)
                raise UnitFailed(f"{name}: {unit_of[reference].name} failed on Ray: "
                                 f"{_last_line(error)}") from error
            if progress is not None and bar is not None:
                progress.update(bar, advance=1, description=f"{name} on Ray: "
                                f"{unit_of[reference].name} done")
    return [(unit_of[reference], outcomes[reference]) for reference in references]


def _ray_cluster(executor: ExecutorConfig) -> Any:
    """Ray, connected to the executor's cluster (started on this machine's available CPUs
    without an address; joined at ``address`` otherwise) unless this process already is."""
    ray = _import_ray()
    if not ray.is_initialized():
        if executor.address is None:
            ray.init(num_cpus=available_cpus(), include_dashboard=False)
        else:
            ray.init(address=executor.address)
    return ray


def parallel_units(executor: ExecutorConfig) -> int:
    """How many units the executor runs at once: 1 here; on Ray, as many as the cluster's
    CPUs (and GPUs, with ``gpus_per_task``) hold tasks of the executor's size, at least 1. A
    step that must decide what its units are before running them (a search asks its sampler
    for that many trials at a time) reads it."""
    if executor.kind != "ray":
        return 1
    resources = _ray_cluster(executor).cluster_resources()
    slots = resources.get("CPU", 1) // (executor.cpus_per_task or 1)
    if executor.gpus_per_task:
        slots = min(slots, resources.get("GPU", 0) // executor.gpus_per_task)
    return max(1, int(slots))


def chunk_size(requested: int, batch: int, what: str) -> int:
    """Sessions per unit: ``requested`` rounded up to a multiple of ``batch`` (said in a log
    line when rounded), so that the units' batches are those of one unit per fold/run."""
    size = -(-requested // batch) * batch
    if size != requested:
        log.info("%s: %d sessions per unit rounded up to %d, a multiple of the batch of %d "
                 "sessions", what, requested, size, batch)
    return size


def session_chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of ``size`` of ``total`` sessions (the last one
    shorter)."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


class ProcessShared(Generic[T]):
    """What the units of one step share in one process (e.g. training's prepared inputs): one
    value at a time, keyed by the step's settings and its cohort file's modification time, so a
    Ray worker prepares it once for all the units it runs, and other settings or a rewritten
    cohort are prepared afresh. The driver lends its own value to the units it runs itself
    (:meth:`sharing`); a unit takes the value with :meth:`get`."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: T | None = None

    @staticmethod
    def key(config: BaseModel, cohort: Path) -> tuple:
        return config.model_dump_json(), cohort.stat().st_mtime_ns if cohort.is_file() else None

    def get(self, config: BaseModel, cohort: Path, make: Callable[[], T]) -> T:
        """The value for ``config`` and ``cohort``, made (and kept) when this process has
        none for them; the previous one is released first."""
        key = self.key(config, cohort)
        if self._key != key:
            self.clear()
            value = make()
            self._key, self._value = key, value
        return self._value  # type: ignore[return-value]

    @contextmanager
    def sharing(self, config: BaseModel, cohort: Path, value: T) -> Iterator[None]:
        """Lend ``value`` to the units run in this process for ``config`` and ``cohort`` while
        the block runs; released afterwards, also on failure."""
        self._key, self._value = self.key(config, cohort), value
        try:
            yield
        finally:
            self.clear()

    def clear(self) -> None:
        self._key = self._value = None


def with_absolute_paths(config: C) -> C:
    """``config`` with its relative paths made absolute: a Ray worker runs in another
    directory (and a relative run folder would name another folder there)."""
    update = {}
    for name, value in config:
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = value.resolve()
        elif isinstance(value, BaseModel) and with_absolute_paths(value) is not value:
            update[name] = with_absolute_paths(value)  # e.g. [train.model] weights
    return config.model_copy(update=update) if update else config


def _last_line(error: BaseException) -> str:
    """The last line of a remote traceback (``ValueError: ...``), or of the error itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}"
                          ) from None
    return ray


def _torch() -> Any:
    import torch  # here: the run layer reads configs and paths without torch

    return torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``threads`` in the block (None: left as they are)."""
    if threads is None:
        yield
        return
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity (``taskset``, SLURM's ``--cpus-per-task``),
    capped by a cgroup CPU quota (containers), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota()
    return max(1, min(cpus or 1, quota or cpus or 1))


def _cgroup_quota() -> int | None:
    """Whole CPUs of the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None without."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                                     "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
            if fields[0] in ("max", "-1"):
                return None
            return max(1, math.floor(int(fields[0]) / int(fields[1])))
        except (OSError, ValueError, IndexError):
            continue
    return None
