"""A step killed at any file rename resumes to the result of an uninterrupted run (issue 16).

Every file of a run folder is written to a temporary file and renamed into place
(:func:`voxplain.io.atomic_path`), so a kill can only fall next to an ``os.replace``. For
training, group masks and CyCE, a driver interpreter runs the step once uninterrupted, counting
its renames, then for each kill point N forks a child whose N-th ``os.replace`` sends it SIGKILL
just before or just after the rename, and a second child that runs the same step again to
completion. The run folder it leaves must equal the uninterrupted one: every file byte for
byte, except the timing columns (``seconds`` of history.tsv and loss.tsv,
``seconds_this_session`` of generators.json), environment.json (versions and dates) and NIfTI
files (compared by voxels, affine and header).

Children are forked from the driver rather than started as fresh interpreters: importing voxplain
takes about 4 s on the shared 2-core machine and a first step 2 s more (lazy imports, first
kernels), a warm step 0.1-0.5 s. The driver warms up with the uninterrupted run in one torch
thread (a child forked after a multi-threaded OpenMP region would hang), and every child starts
from torch's RNG state of a fresh interpreter.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_cohort
from voxplain.models.checkpoint import STATE_KEY, load_state, remove_state, save_state

DRIVER = r'''
import json, os, shutil, signal, sys, traceback
from pathlib import Path

import pandas as pd
import torch

FRESH_RNG = torch.get_rng_state()
torch.set_num_threads(1)

from voxplain.config import CyCEStepConfig, GroupMaskStepConfig, TrainConfig
from voxplain.steps.cyce import run_cyce_train
from voxplain.steps.masks import run_group_masks
from voxplain.steps.train import run_train

WORK, COHORT = Path(sys.argv[1]), Path(sys.argv[2])
PLAN = json.loads(sys.argv[3])  # step: rename numbers also killed just before the rename
RUN = WORK / "run"


def train():
    run_train(TrainConfig(cohort=COHORT, out=RUN, folds=2, epochs=3, batch_size=4,
                             device="cpu", model={"name": "cnn", "channels": [4, 8]}))


def group_mask():
    # a tiny model may predict one class only: mask the class it predicts, so that correctly
    # classified training sessions exist
    predicted = pd.read_csv(RUN / "models/fold-0/run-0/predictions-validation.tsv", sep="\t")
    run_group_masks(GroupMaskStepConfig(run=RUN, folds=[0], device="cpu",
                                    diagnosis=predicted.predicted.mode()[0],
                                    mask={"max_epochs": 3, "batch_size": 4,
                                          "dense_fraction": 1e-6}))  # always retried


def cyce():
    run_cyce_train(CyCEStepConfig(run=RUN, folds=[0], device="cpu", cyce={
        "widths": [4, 8, 8, 8], "convs_per_stage": 1, "batch_size": 4, "max_steps": 2,
        "min_steps": 2, "checkpoint_every": 1}))


def killed_at(n, when):
    """Replace os.replace by one that SIGKILLs this process at its n-th call."""
    rename, calls = os.replace, [0]

    def replace(source, target, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target, *args, **kwargs)
        if calls[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def in_child(step, n=0, when=""):
    """Exit status of ``step`` run in a forked child (killed at rename ``n`` if given)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    code = 1
    try:
        torch.set_rng_state(FRESH_RNG)
        if n:
            killed_at(n, when)
        step()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def counted_run(step):
    """The uninterrupted run (which also warms up the children); the renames it makes."""
    renames, rename = [], os.replace

    def replace(source, target, *args, **kwargs):
        renames.append(os.path.relpath(target, RUN))
        rename(source, target, *args, **kwargs)

    os.replace = replace
    try:
        torch.set_rng_state(FRESH_RNG)
        step()
    finally:
        os.replace = rename
    return renames


record = {}
for name, step, base in (("train", train, None), ("group_mask", group_mask, "train"),
                         ("cyce", cyce, "train")):
    fresh = (lambda: shutil.copytree(WORK / base / "reference", RUN)) if base else (lambda: None)
    (WORK / name).mkdir()
    fresh()
    renames = counted_run(step)
    RUN.rename(WORK / name / "reference")
    trials = []
    for n in range(1, len(renames) + 1):
        for when in ("before", "after") if n in PLAN[name] else ("after",):
            fresh()
            killed = in_child(step, n, when)
            resumed = in_child(step)
            RUN.rename(WORK / name / f"{when}-{n}")
            trials.append({"n": n, "when": when, "folder": f"{when}-{n}", "killed":
                           os.WIFSIGNALED(killed) and os.WTERMSIG(killed) == signal.SIGKILL,
                           "resumed": os.waitstatus_to_exitcode(resumed)})
    record[name] = {"renames": renames, "trials": trials}
(WORK / "record.json").write_text(json.dumps(record))
'''

#: Rename numbers killed just before the rename as well as just after it (see the tests).
BEFORE = {"train": [1, 10, 11, 17], "group_mask": [3, 6, 9, 16], "cyce": [3, 7]}


@pytest.fixture(scope="module")
def kill_trials(tmp_path_factory) -> tuple[Path, dict, str]:
    """Run :data:`DRIVER` once for the three steps: its folder, record and stderr."""
    folder = tmp_path_factory.mktemp("kills")
    cohort = write_cohort(folder / "cohort", subjects=8, sessions=1, shape=(12, 12, 12))
    work = folder / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", DRIVER, str(work), str(cohort),
                           json.dumps(BEFORE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return work, json.loads((work / "record.json").read_text()), done.stderr


def _kill_point(record: dict, trial: dict) -> str:
    return (f"killed {trial['when']} rename {trial['n']} of {len(record['renames'])} "
            f"({record['renames'][trial['n'] - 1]})")


def _outputs(run: Path, ignored: set[str]) -> dict[str, object]:
    """Comparable contents of every file under ``run`` (temporary files of killed writers and
    ``.lock`` left out)."""
    contents: dict[str, object] = {}
    for path in sorted(run.rglob("*")):
        if path.is_dir() or path.name.startswith(".") or path.name in ignored:
            continue
        name = path.relative_to(run).as_posix()
        if path.name.endswith(".tsv"):
            contents[name] = _without_column(path.read_text(), "seconds")
        elif path.name == "generators.json":
            contents[name] = {k: v for k, v in json.loads(path.read_text()).items()
                              if k != "seconds_this_session"}
        elif path.name.endswith(".nii.gz"):
            image = nib.load(path)
            contents[name] = (np.asarray(image.dataobj).tobytes(), image.affine.tobytes(),
                              image.header.binaryblock)
        else:
            contents[name] = path.read_bytes()
    return contents


def _without_column(table: str, column: str) -> str:
    rows = [line.split("\t") for line in table.splitlines()]
    if column not in rows[0]:
        return table
    index = rows[0].index(column)
    return "\n".join("\t".join(row[:index] + row[index + 1:]) for row in rows)


def _assert_resumed_runs_equal_the_uninterrupted_one(kill_trials: tuple[Path, dict, str],
                                                     step: str, ignored: set[str]) -> dict:
    """Every trial of ``step``: killed where planned, resumed to the uninterrupted result."""
    work, records, stderr = kill_trials
    record = records[step]
    reference = _outputs(work / step / "reference", ignored)
    assert not [name for name in reference if "checkpoint" in name]
    for trial in record["trials"]:
        point = _kill_point(record, trial)
        assert trial["killed"], f"{point}: the child was not killed"
        assert trial["resumed"] == 0, f"{point}: the resumed run failed\n{stderr[-4000:]}"
        resumed = _outputs(work / step / trial["folder"], ignored)
        differing = sorted(name for name in set(reference) | set(resumed)
                           if reference.get(name) != resumed.get(name))
        assert not differing, f"{point}: {differing} differ from the uninterrupted run"
    return record


def test_checkpoint_is_one_safetensors_file_with_its_state_in_the_metadata(tmp_path):
    state = {"epoch": 3, "lowest": float("inf"), "history": [{"loss": 0.1 + 0.2}]}
    save_state(tmp_path, {"mask": torch.rand(2, 3)}, state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as checkpoint:
        assert json.loads(checkpoint.metadata()[STATE_KEY]) == state
    tensors, loaded = load_state(tmp_path)
    assert loaded == state and loaded["history"][0]["loss"] == 0.1 + 0.2  # exact round trip
    assert tensors["mask"].shape == (2, 3)
    remove_state(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_an_older_version_is_ignored_and_removed(tmp_path, caplog):
    # before issue 16 the state was a second file, NAME.json: a kill between the two renames
    # left tensors and counters of different epochs, which cannot be told from a complete pair
    save_file({"mask": torch.ones(2)}, str(tmp_path / "checkpoint.safetensors"))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"epoch": 1}))
    with caplog.at_level(logging.WARNING, logger="voxplain"):
        assert load_state(tmp_path) is None
    assert "older voxplain" in caplog.text and "starts again" in caplog.text
    remove_state(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_killed_at_any_rename_resumes_to_the_uninterrupted_result(kill_trials):
    # 2 folds x 3 epochs: 9 files before training (config.toml, environment.json, qc_rejected,
    # cohort, grid, 4 splits), per fold 3 checkpoints then model.safetensors, model.json,
    # history, predictions and metrics (the fold's marker), last cross_validation.tsv; killed
    # after each, and before the first file, the first two checkpoints and fold 0's marker
    record = _assert_resumed_runs_equal_the_uninterrupted_one(kill_trials, "train",
                                                              ignored={"environment.json"})
    renames = record["renames"]
    assert renames[9:12] == ["models/fold-0/run-0/checkpoint.safetensors"] * 3
    assert renames[16] == "models/fold-0/run-0/metrics.tsv" and len(renames) == 26
    assert len(record["trials"]) == len(renames) + len(BEFORE["train"])


@pytest.mark.slow
def test_group_mask_killed_at_any_rename_resumes_to_the_uninterrupted_result(kill_trials):
    # config.toml, environment.json, 3 epoch checkpoints (of the first pass, in first/: QC
    # step 2 may re-optimise without a flagged image; none is flagged here, so there is no
    # second pass), then the dense retry (every mask counts as dense here): the first mask's
    # files in dense/ and 3 checkpoints of the retry there; the retry's mask.nii.gz, loss,
    # image_losses, qc_flags, summary.json (the marker) and its rewrite by the run-level quality
    # check; killed after each, and before the first checkpoint, the dense files, the retry's
    # first checkpoint and the marker
    record = _assert_resumed_runs_equal_the_uninterrupted_one(kill_trials, "group_mask",
                                                              ignored={"environment.json"})
    renames = record["renames"]
    folder = "masks/group/fold-0/run-0"
    assert renames[2:5] == [f"{folder}/first/checkpoint.safetensors"] * 3
    assert renames[5:8] == [f"{folder}/dense/{name}" for name in
                            ("mask.nii.gz", "loss.tsv", "image_losses.tsv")]
    assert renames[8:11] == [f"{folder}/dense/checkpoint.safetensors"] * 3
    assert renames[15] == f"{folder}/summary.json" and len(renames) == 17
    assert len(record["trials"]) == len(renames) + len(BEFORE["group_mask"])


@pytest.mark.slow
def test_cyce_killed_at_any_rename_resumes_to_the_uninterrupted_result(kill_trials):
    # 2 steps, a checkpoint after each: config.toml, environment.json, 2 checkpoints, loss.tsv,
    # generators.safetensors, generators.json (the marker); killed after each, and before the
    # first checkpoint and the marker. A kill between generators.json and the checkpoint's
    # removal leaves the checkpoint behind (a finished fold/run is skipped without removing
    # it): harmless, and not compared.
    record = _assert_resumed_runs_equal_the_uninterrupted_one(
        kill_trials, "cyce", ignored={"environment.json", "checkpoint.safetensors"})
    renames = record["renames"]
    assert renames[2:4] == ["cyce/fold-0/run-0/checkpoint.safetensors"] * 2
    assert renames[-1] == "cyce/fold-0/run-0/generators.json" and len(renames) == 7
    assert len(record["trials"]) == len(renames) + len(BEFORE["cyce"])
