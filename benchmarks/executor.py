"""Wall time of the steps that fan out, on the local executor and on Ray (issue 21).

On a tiny synthetic cohort (20x24x20 volumes, a darker cube in the patients), each executor
runs, in a fresh run folder:

- ``train``: 4-fold training (4 units, one per fold);
- ``grid``: a 4-setting mask grid on the best fold of the local run (4 units, one per setting);

with one torch thread per unit: ``local`` (one unit after the other in this process, each
step after a warm-up of one epoch), ``ray-1`` and ``ray-2`` (a Ray cluster of 1 and 2 CPUs on
this machine, 1 CPU per task). ``speed-up`` is local / executor. Ray's fixed costs are measured apart: ``ray.init`` of a local cluster,
``workers up`` (one unit per worker importing voxplain's steps and torch, before the steps
run), and the time per task of 40 empty units once the workers are up (``per task``). The
step times on Ray also hold what each worker does once per step: read the cohort (training:
check and split it) and load the models.

Run: ``.venv/bin/python benchmarks/executor.py [--epochs 60] [--mask-epochs 200]`` (about 2
minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import ray
import torch

from voxplain.config import ExecutorConfig, MaskGridConfig, TrainConfig
from voxplain.run.executor import Unit, map_units
from voxplain.steps.masks import run_mask_grid
from voxplain.steps.train import run_train

SHAPE = (20, 24, 20)


def write_cohort(folder: Path, subjects: int, sessions: int = 2) -> Path:
    """``subjects`` subjects of ``sessions`` sessions, every other one a patient with a darker
    cube."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = []
    for subject, session in itertools.product(range(subjects), range(sessions)):
        diagnosis = "AD" if subject % 2 else "CN"
        volume = (0.5 + 0.1 * rng.standard_normal(SHAPE)).clip(0, 1).astype(np.float32)
        if diagnosis == "AD":
            volume[7:13, 9:15, 7:13] *= 0.4
        volume.flat[0] = 1.0  # passes the quality check
        name = f"sub-{subject:02d}_ses-M{12 * session:02d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), folder / name)
        rows.append({"participant_id": f"sub-{subject:02d}", "session_id":
                     f"ses-M{12 * session:02d}", "diagnosis": diagnosis, "path": name})
    pd.DataFrame(rows).to_csv(folder / "cohort.tsv", sep="\t", index=False)
    return folder / "cohort.tsv"


def train(cohort: Path, run: Path, executor: ExecutorConfig, epochs: int) -> float:
    started = time.perf_counter()
    run_train(TrainConfig(cohort=cohort, out=run, folds=4, epochs=epochs, patience=epochs,
                          batch_size=4,
                          learning_rate=3e-3, device="cpu", executor=executor,
                          model={"name": "cnn", "channels": [4, 8, 8]}))
    return time.perf_counter() - started


def grid(trained: Path, run: Path, executor: ExecutorConfig, epochs: int) -> float:
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("masks"))
    scores = pd.read_csv(run / "evaluation" / "cross_validation.tsv", sep="\t")
    fold = int(scores.sort_values("balanced_accuracy").fold.iloc[-1])  # one that masks AD
    started = time.perf_counter()
    run_mask_grid(MaskGridConfig(run=run, folds=[fold], l1=[1e-3, 1e-4], l2=[1e-2, 1e-3],
                                 device="cpu", executor=executor,
                                 mask={"max_epochs": epochs, "patience": epochs,
                                       "batch_size": 4, "qc_step2": "flag"}))
    return time.perf_counter() - started


def nothing(unit: int) -> int:
    return unit


def import_steps(unit: int) -> int:
    import voxplain.steps.masks  # noqa: F401  (torch, nibabel, ...)

    return unit


def worker_start_up(executor: ExecutorConfig, workers: int) -> float:
    """Seconds until ``workers`` workers have imported voxplain's steps (and torch)."""
    started = time.perf_counter()
    map_units([Unit(str(i), i) for i in range(workers)], import_steps, executor, "start-up")
    return time.perf_counter() - started


def per_task_seconds(executor: ExecutorConfig, tasks: int = 40) -> float:
    map_units([Unit(str(i), i) for i in range(4)], nothing, executor, "warm-up")
    started = time.perf_counter()
    map_units([Unit(str(i), i) for i in range(tasks)], nothing, executor, "empty")
    return (time.perf_counter() - started) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="training epochs per fold")
    parser.add_argument("--mask-epochs", type=int, default=200, help="epochs per grid mask")
    arguments = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the Ray workers
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, ray {ray.__version__}, CPUs available "
          f"{len(os.sched_getaffinity(0))}, 1 thread per unit")
    root = Path(tempfile.mkdtemp(prefix="voxplain-executor-"))
    cohort = write_cohort(root / "cohort", subjects=24)
    local = ExecutorConfig(cpus_per_task=1)
    # warm-ups: this process's first steps pay for lazy imports and the atlas, as a Ray
    # worker's first unit does ("workers up" below)
    train(cohort, root / "warm-up", local, 1)
    local_train = train(cohort, root / "local", local, arguments.epochs)
    grid(root / "local", root / "warm-up-grid", local, 1)
    times = {"local": (local_train, grid(root / "local", root / "local-grid", local,
                                         arguments.mask_epochs))}
    overhead = {}
    for workers in (1, 2):
        name = f"ray-{workers}"
        started = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        start_up = time.perf_counter() - started
        on_ray = ExecutorConfig(kind="ray", cpus_per_task=1)
        workers_up = worker_start_up(on_ray, workers)
        times[name] = (train(cohort, root / name, on_ray, arguments.epochs),
                       grid(root / "local", root / f"{name}-grid", on_ray,
                            arguments.mask_epochs))
        overhead[name] = (start_up, workers_up, per_task_seconds(on_ray))
        ray.shutdown()
    print("\n| executor | train 4 folds (s) | speed-up | grid 4 settings (s) | speed-up |")
    print("|---|---|---|---|---|")
    for name, (train_s, grid_s) in times.items():
        print(f"| {name} | {train_s:.1f} | {times['local'][0] / train_s:.2f} | {grid_s:.1f} | "
              f"{times['local'][1] / grid_s:.2f} |")
    print("\n| cluster | ray.init (s) | workers up (s) | per task (ms) |\n|---|---|---|---|")
    for name, (start_up, workers_up, per_task) in overhead.items():
        print(f"| {name} | {start_up:.1f} | {workers_up:.1f} | {1000 * per_task:.1f} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
