"""``voxplain bids-ids`` and ``voxplain split test``: prepare a cohort before training (BIDS
labels; a matched held-out test set)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from voxplain.cli.common import config_command, console, print_table, reported_errors
from voxplain.config import SplitTestConfig

split = typer.Typer(help="Split a cohort before training.", no_args_is_help=True)


@split.command("test")
@config_command(SplitTestConfig, "split_test",
                ["cohort", "out", "n_per_class", "match", "diagnosis_column", "alpha",
                 "max_draws", "seed"], absolute_paths=False)
def split_test(settings: SplitTestConfig) -> None:
    """Draw a held-out test set of N subjects per diagnosis matched on age and sex (paper 1,
    2.2.1); write test.tsv, train.tsv and balance.tsv."""
    from voxplain.steps.split import run_split_test

    with reported_errors():
        tests = run_split_test(settings)
    print_table("Balance tests (every p must exceed alpha)", tests,
                ["comparison", "column", "test", "statistic", "p"])
    typer.echo(settings.out)


def bids_ids(
    tsv: Path = typer.Argument(..., help="Cohort TSV whose participant_id/session_id are not "
                               "BIDS labels (e.g. 002_S_0295, bl)."),
    out: Path = typer.Option(..., "--out", help="Cohort TSV to write (its ids: sub-/ses- then "
                             "letters and digits; the source ids kept in source_participant_id "
                             "and source_session_id)."),
) -> None:
    """Rewrite participant and session ids as BIDS labels (they become file names: only
    letters and digits after sub-/ses-); two source ids that would share a label are refused."""
    from voxplain.data.cohort import CohortError, bids_ids as to_bids
    from voxplain.io import write_tsv

    with reported_errors():
        if not tsv.is_file():
            raise FileNotFoundError(f"{tsv}: cohort TSV not found")
        # ids as written: an id "NA" is not missing
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
        try:
            mapped = to_bids(table)
        except CohortError as error:
            raise CohortError(f"{tsv}: {error}") from None
        if "path" in mapped and out.resolve().parent != tsv.resolve().parent:
            mapped["path"] = [path if pd.isna(path) or Path(path).is_absolute()
                              else str((tsv.parent / path).resolve()) for path in mapped["path"]]
        write_tsv(out, mapped)
    changed = int((mapped.participant_id != table.participant_id).sum()
                  + (mapped.session_id != table.session_id).sum())
    console.print(f"{changed} id(s) rewritten; {out}", highlight=False)
