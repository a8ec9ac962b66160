"""Size of a run's HTML report and the time headless Chromium takes to load it.

Usage: ``python benchmarks/report_load.py RUN [--repeats 3]``. Builds RUN/report (linked
figures) and RUN/report-inline (one file), then loads each page ``repeats`` times in headless
Chromium and prints the median navigationStart -> loadEventEnd time (issue 7: under 30 MB and
under 3 s for the demo run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from voxplain.config import ReportConfig
from voxplain.report import build_report
from voxplain.report.browser import check_page


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for label, config in (
            ("linked", ReportConfig(run=args.run)),
            ("inline", ReportConfig(run=args.run, out=args.run / "report-inline", inline=True))):
        started = time.perf_counter()
        page = build_report(config)
        build_s = time.perf_counter() - started
        loads = [check_page(page) for _ in range(args.repeats)]
        problems = [(c.console_errors, c.remote_requests, c.broken_images) for c in loads
                    if c.console_errors or c.remote_requests or c.broken_images]
        print(f"{label}: build {build_s:.1f} s; index.html {page.stat().st_size / 2**20:.2f} MB; "
              f"report folder {folder_mb(page.parent):.2f} MB; load (median of {args.repeats}) "
              f"{statistics.median(c.load_ms for c in loads):.0f} ms; images "
              f"{len(loads[0].images)}; viewers {loads[0].frames}; problems {problems or 'none'}")


if __name__ == "__main__":
    main()
