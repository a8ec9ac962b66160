"""``voxplain generate atrophy|lesions|ms``: synthetic cohorts with ground truth (the first step
of a pipeline; they write a cohort folder, not a run folder)."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from voxplain.config import AtrophyCohortConfig, LesionCohortConfig, MSCohortConfig
from voxplain.data.lesions import generate_lesion_cohort
from voxplain.data.ms import generate_ms_cohort
from voxplain.data.synthetic import generate_atrophy_cohort

__all__ = ["run_generate_atrophy", "run_generate_lesions", "run_generate_ms"]


def run_generate_atrophy(config: AtrophyCohortConfig, progress: Progress | None = None) -> Path:
    """A synthetic CN/AD cohort of GM maps (:func:`voxplain.data.synthetic.
    generate_atrophy_cohort`); returns its ``cohort.tsv``. A finished cohort is left as it is."""
    return generate_atrophy_cohort(config, progress=_callback(progress, "synthetic volumes"))


def run_generate_lesions(config: LesionCohortConfig, progress: Progress | None = None) -> Path:
    """Synthetic 2D lesion patches (:func:`voxplain.data.lesions.generate_lesion_cohort`);
    returns its ``cohort.tsv``."""
    return generate_lesion_cohort(config, progress=_callback(progress, "lesion patches"))


def run_generate_ms(config: MSCohortConfig, progress: Progress | None = None) -> Path:
    """A synthetic CN/RRMS/SPMS cohort of T1, T2 and FLAIR volumes with lesion masks
    (:func:`voxplain.data.ms.generate_ms_cohort`); returns its ``cohort.tsv``. A finished
    cohort is left as it is."""
    return generate_ms_cohort(config, progress=_callback(progress, "MS sessions"))


def _callback(progress: Progress | None, description: str):
    if progress is None:
        return None
    task = progress.add_task(description)
    return lambda done, total: progress.update(task, completed=done, total=total)
