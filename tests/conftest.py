"""Shared fixtures: tiny cohorts written to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

SHAPE = (20, 24, 20)
AFFINE = np.array([[-6.0, 0, 0, 90], [0, 6.0, 0, -126], [0, 0, 6.0, -72], [0, 0, 0, 1]])


def write_cohort(folder: Path, subjects: int = 12, sessions: int = 2, shape=SHAPE,
                 affine=AFFINE, seed: int = 0, contrast: float = 0.6) -> Path:
    """Volumes where AD subjects have a darker cube near the centre: an easy, learnable task."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    centre = tuple(slice(s // 2 - 3, s // 2 + 3) for s in shape)
    for subject in range(subjects):
        diagnosis = "AD" if subject % 2 else "CN"
        for session in range(sessions):
            volume = (0.5 + 0.1 * rng.standard_normal(shape)).clip(0, 1).astype(np.float32)
            if diagnosis == "AD":
                volume[centre] *= 1 - contrast
            volume.flat[0] = 1.0  # passes the paper-1 quality check (max >= 0.95)
            name = f"sub-{subject:02d}_ses-M{12 * session:02d}.nii.gz"
            nib.save(nib.Nifti1Image(volume, affine), folder / name)
            rows.append({"participant_id": f"sub-{subject:02d}",
                         "session_id": f"ses-M{12 * session:02d}",
                         "diagnosis": diagnosis, "path": name, "age": 70 + subject})
    tsv = folder / "cohort.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return tsv


@pytest.fixture
def cohort_tsv(tmp_path: Path) -> Path:
    return write_cohort(tmp_path / "cohort")


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny networks run hundreds of small ops, and on a shared,
    oversubscribed 2-core machine every multi-threaded op waits for a descheduled thread
    (~14 ms each: a 16x16 CyCE step took 15 s instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
