"""``voxplain split test``: draw a held-out test set matched on age and sex (paper 1, 2.2.1).

Reads and checks the cohort table (ids, diagnoses; images are not opened), draws the test
subjects with :func:`voxplain.train.splits.matched_test_split` and writes, in ``out``:
``test.tsv`` (the baseline session of each test subject: paper 1's test sets hold one session
per subject), ``train.tsv`` (every session of the other subjects, for ``voxplain train``) and
``balance.tsv`` (every balance test with its p-value). Paths are written absolute, so the
tables work from any folder. Output files are never the input TSV.
"""

from __future__ import annotations

import logging

import pandas as pd
from rich.progress import Progress

from voxplain.config import SplitTestConfig
from voxplain.data.cohort import CohortError, read_cohort_table
from voxplain.io import write_tsv
from voxplain.train.splits import matched_test_split

log = logging.getLogger("voxplain")

__all__ = ["run_split_test"]

OUTPUTS = ("test.tsv", "train.tsv", "balance.tsv")


def run_split_test(config: SplitTestConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Write ``test.tsv``, ``train.tsv`` and ``balance.tsv`` in ``config.out``; return the
    balance tests.

    Raises:
        CohortError: an unreadable cohort, a missing or empty matched column, too few subjects,
            no balanced draw, or an output that would overwrite the cohort TSV.
    """
    targets = [(config.out / name).resolve() for name in OUTPUTS]
    if config.cohort.resolve() in targets:
        raise CohortError(f"{config.cohort}: the split would overwrite its own cohort TSV; "
                          "choose another --out")
    table = read_cohort_table(config.cohort, config.diagnosis_column)
    try:
        test, rest, tests = matched_test_split(table, config.n_per_class, config.match,
                                               config.seed, config.alpha, config.max_draws)
    except ValueError as error:
        raise CohortError(f"{config.cohort}: {error}") from None
    original = {"diagnosis": config.diagnosis_column}
    write_tsv(config.out / "test.tsv", test.rename(columns=original))
    write_tsv(config.out / "train.tsv", rest.rename(columns=original))
    write_tsv(config.out / "balance.tsv", tests)
    log.info("test set: %d subjects (%d per diagnosis), smallest balance p = %.3g; rest: %d "
             "subjects", len(test), config.n_per_class, tests["p"].min(),
             rest["participant_id"].nunique())
    return tests
