"""``voxplain report``: the HTML report of a run folder, readable offline."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import typer

from voxplain.cli.common import (CONFIG_OPTION, absolute, build_config, console, option,
                                 reported_errors, setup_logging)
from voxplain.config import ReportConfig


def report(
    run: Path = option(ReportConfig, "run", "--run"),
    out: Path = option(ReportConfig, "out", "--out"),
    inline: bool = option(ReportConfig, "inline", "--inline"),
    max_viewers: int = option(ReportConfig, "max_viewers", "--max-viewers"),
    dpi: int = option(ReportConfig, "dpi", "--dpi"),
    open_page: bool = typer.Option(False, "--open", help="Open the report in a web browser."),
    config: Path = CONFIG_OPTION,
) -> None:
    """Write RUN/report/index.html from whatever the run folder holds (absent steps are noted)."""
    from voxplain.report import build_report

    setup_logging()
    settings = build_config(ReportConfig, "report", config, run=absolute(run), out=absolute(out),
                            inline=inline, max_viewers=max_viewers, dpi=dpi)
    with reported_errors():
        page = build_report(settings)
    console.print(f"report: {page}")
    print(page)
    if open_page:
        webbrowser.open(page.as_uri())
