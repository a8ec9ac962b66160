"""``voxplain study make|analyse|export``: paper 3's user study (:mod:`voxplain.study`) on the
explanations of a run folder. ``study serve`` is interactive and stays a command of its own."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.progress import Progress

from voxplain.config import StudyAnalyseConfig, StudyExportConfig, StudyMakeConfig
from voxplain.study.analyse import analyse
from voxplain.study.make import StudyFolder, make_questionnaires
from voxplain.study.serve import AnswerStore

__all__ = ["run_study_make", "run_study_analyse", "run_study_export"]


def run_study_make(config: StudyMakeConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Blinded, randomised questionnaires A and B; returns the key (the study folder keeps its
    settings in its own ``config.toml``)."""
    return make_questionnaires(config)


def run_study_analyse(config: StudyAnalyseConfig, progress: Progress | None = None) -> dict:
    """De-randomised statistics of the answers (paper 3, 3.4 and 4.2)."""
    return analyse(config)


def run_study_export(config: StudyExportConfig, progress: Progress | None = None) -> Path:
    """Every answer of the study's SQLite database as one CSV; returns its path."""
    folder = StudyFolder(config.study)
    target = config.out or folder.root / "answers.csv"
    AnswerStore(config.database or folder.database).export_csv(target)
    return target
