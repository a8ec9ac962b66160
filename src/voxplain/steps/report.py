"""``voxplain report``: the HTML report of a run folder (:mod:`voxplain.report`)."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from voxplain.config import ReportConfig
from voxplain.report import build_report
from voxplain.run import RunFolder, RunFolderError

__all__ = ["run_report"]


def run_report(config: ReportConfig, progress: Progress | None = None) -> Path:
    """Render ``RUN/report/index.html`` (or ``config.out``); returns its path. Records the
    settings as ``[report]`` (replaced at each run: the report is rewritten whole)."""
    run = RunFolder(Path(config.run))
    if not run.root.is_dir():
        raise RunFolderError(f"{run.root}: run folder not found")
    if run.config_file.is_file():
        run.record_config("report", config, replace=True)
    return build_report(config)
