"""``voxplain summary``: the headline figures of a run folder in the terminal."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from voxplain.cli.common import console, make_table, reported_errors


def summary(run: Path = typer.Option(..., "--run", help="Run folder.")) -> None:
    """Classification with CIs, group-mask top regions, robustness (intra- vs inter-subject) and
    localisation per method: whatever the run folder holds."""
    from voxplain.report.summary import run_summary

    with reported_errors():
        if not (run / "config.toml").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.toml)")
        tables = run_summary(run)
    if not tables:
        console.print(f"{run}: no evaluation yet (run voxplain evaluate / explain / mask first)")
    out = Console(width=max(Console().width, 150))  # stdout, wide enough for region names
    for title, table in tables.items():
        out.print(make_table(title, table, list(table.columns)))
