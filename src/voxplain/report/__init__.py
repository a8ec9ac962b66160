"""The HTML report of a run folder: ``build_report(ReportConfig(run=...))`` -> RUN/report/index.html."""

from voxplain.report.html import build_report

__all__ = ["build_report"]
