"""``voxplain <verb>``: the command line on top of the Python API.

One module per group of verbs; each registers its commands on :data:`app` here. Shared pieces
(flags built from the config models, one-line errors, progress, tables) live in
:mod:`voxplain.cli.common`.
"""

from __future__ import annotations

import typer

from voxplain.cli import cohort as _cohort
from voxplain.cli import cyce as _cyce
from voxplain.cli import evaluate as _evaluate
from voxplain.cli import explain as _explain
from voxplain.cli import generate as _generate
from voxplain.cli import imports as _imports
from voxplain.cli import masks as _masks
from voxplain.cli import pipeline as _pipeline
from voxplain.cli import report as _report
from voxplain.cli import search as _search
from voxplain.cli import study as _study
from voxplain.cli import summary as _summary
from voxplain.cli import train as _train
from voxplain.cli.common import build_config

app = typer.Typer(help="Train, explain and measure deep classifiers of medical images.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("run")(_pipeline.run)
app.add_typer(_generate.generate, name="generate")
app.command("bids-ids")(_cohort.bids_ids)
app.add_typer(_cohort.split, name="split")
app.command()(_search.search)
app.command()(_train.train)
app.command()(_train.predict)
app.add_typer(_imports.imports, name="import")
app.add_typer(_masks.mask, name="mask")
app.add_typer(_cyce.cyce, name="cyce")
app.command()(_explain.explain)
app.add_typer(_study.study, name="study")
app.command()(_report.report)
app.add_typer(_evaluate.evaluate, name="evaluate")
app.command()(_evaluate.stats)
app.command()(_summary.summary)

__all__ = ["app", "build_config"]
