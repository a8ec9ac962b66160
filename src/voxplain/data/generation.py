"""What the synthetic 3D cohort generators share: seeded random streams, an output folder claimed
by its ``generator.json``, files written once.

A generator is deterministic: every random draw comes from a stream seeded by (seed, subject,
purpose, ...) (:func:`seeded_rng`), so a file that exists with the right shape would be written
again byte for byte and is skipped (:func:`exists_with_shape`), and an interrupted run resumes.
That only holds while the settings stay the same: ``generator.json`` records them, and a second
run with other settings into the same folder is refused (:func:`claim_folder`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from pydantic import BaseModel

from voxplain.config import with_defaults
from voxplain.data.grid import Grid
from voxplain.io import save_nifti, write_json, write_tsv


@dataclass(frozen=True)
class PlannedSession:
    """One session of a synthetic cohort: subject and session indices (the keys of its random
    streams), BIDS identifiers, diagnosis and covariates."""

    subject: int
    session: int
    participant_id: str
    session_id: str
    diagnosis: str
    age: float
    sex: str

    @property
    def stem(self) -> str:
        """``sub-XXX_ses-MYY``."""
        return f"{self.participant_id}_{self.session_id}"


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """Random stream for (seed, *key); negative seeds are taken modulo 2**64."""
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


def sigma_voxels(grid: Grid, sigma_mm: float) -> tuple[float, ...]:
    """A Gaussian sigma in mm converted to voxels along each axis of ``grid``."""
    return tuple(sigma_mm / size for size in grid.voxel_size)


def exists_with_shape(path: Path, shape: tuple[int, ...]) -> bool:
    """True if ``path`` is a NIfTI file of this shape (the header alone is read)."""
    return path.is_file() and tuple(nib.load(path).shape) == tuple(shape)


def save_if_absent(path: Path, array: np.ndarray, grid: Grid) -> None:
    """Save ``array`` on ``grid`` unless ``path`` already holds a volume of its shape."""
    if not exists_with_shape(path, grid.shape):
        save_nifti(path, array, grid.affine)


def claim_folder(path: Path, record: dict, schema: type[BaseModel]) -> None:
    """Write ``generator.json`` (``record``, whose ``"config"`` holds the settings of ``schema``)
    unless the file already holds this record.

    A ``generator.json`` with other settings (the output folder aside) is an error: the images
    already there were generated with them and would be silently mixed with new ones. Settings
    a later version added count as their default in an older ``generator.json``.

    Raises:
        ValueError: the folder holds a cohort generated with other settings (the message names
            each changed setting).
    """
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing == json.loads(json.dumps(record)):
            return
        recorded = with_defaults(schema, existing.get("config", {}))
        requested = record["config"]
        changed = [f"{key}: {recorded.get(key)!r} -> {requested[key]!r}" for key in requested
                   if key != "out" and recorded.get(key) != requested[key]]
        if changed:
            raise ValueError(f"{path.parent} already holds a cohort generated with other settings "
                             f"({'; '.join(changed)}); choose another folder or delete it")
    write_json(path, record)


def write_table_once(path: Path, table: pd.DataFrame) -> None:
    """Write ``cohort.tsv`` unless the file already holds this table."""
    if not (path.is_file() and path.read_text() == table.to_csv(sep="\t", index=False)):
        write_tsv(path, table)
