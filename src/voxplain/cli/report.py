"""``voxplain report``: the HTML report of a run folder, readable offline."""

from __future__ import annotations

import webbrowser

import typer

from voxplain.cli.common import config_command, console, reported_errors
from voxplain.config import ReportConfig


@config_command(ReportConfig, "report", ["run", "out", "inline", "max_viewers", "dpi", "compare"])
def report(
    settings: ReportConfig,
    open_page: bool = typer.Option(False, "--open", help="Open the report in a web browser."),
) -> None:
    """Write RUN/report/index.html from whatever the run folder holds (absent steps are noted)."""
    from voxplain.report import build_report

    with reported_errors():
        page = build_report(settings)
    console.print(f"report: {page}")
    print(page)
    if open_page:
        webbrowser.open(page.as_uri())
