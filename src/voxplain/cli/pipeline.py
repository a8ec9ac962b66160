"""``voxplain run PIPELINE.toml``: every step of a pipeline file, in order, each resuming."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

from voxplain.cli.common import console, progress_bar, reported_errors, setup_logging


def run(
    pipeline: Path = typer.Argument(..., help="Pipeline file: one [table] per step, named like "
                                    "the verbs (train, mask_group, explain, ...), in order; a "
                                    "run folder's config.toml redoes that run."),
    run_folder: Path = typer.Option(None, "--run", help="Run folder of every step (instead of "
                                    "the file's): e.g. redo RUN/config.toml into a new folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file and list the steps; "
                                 "run nothing."),
) -> None:
    """Run the steps of PIPELINE in order; each skips the work already done."""
    from voxplain.steps.pipeline import read_pipeline

    setup_logging()
    with reported_errors():
        planned = read_pipeline(pipeline, run_folder.resolve() if run_folder else None)
    for number, step in enumerate(planned, 1):
        console.print(f"{number:>2}. {step.label}", highlight=False, markup=False)
    if dry_run:
        return
    for number, step in enumerate(planned, 1):
        console.rule(f"step {number} of {len(planned)}: {escape(step.label)}", style="dim",
                     characters="-")
        started = time.perf_counter()
        with reported_errors(), progress_bar() as bar:
            step.run(bar)
        console.print(f"{step.label} done in {time.perf_counter() - started:.0f} s",
                      highlight=False, markup=False)
    console.print(f"{len(planned)} step(s) done", highlight=False)
