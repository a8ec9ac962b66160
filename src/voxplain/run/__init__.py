"""The run folder, owned here: its layout, its records and its maps (like ClinicaDL's MAPS).

- :mod:`voxplain.run.folder` -- every path, ``fold-K/run-R`` naming and parsing, the recorded
  settings (``config.toml``), the lock, leftovers of killed steps;
- :mod:`voxplain.run.maps` -- the maps a run folder holds (masks and explanations), read and
  written with their grid.

Only :mod:`voxplain.steps` (and the report and study packages that present a run folder) use
it; the layers below take arrays, tensors, models and grids.
"""

from voxplain.run.folder import (
    COHORT_PREFIX,
    RESUMABLE_FIELDS,
    FoldSkipped,
    RunFolder,
    RunFolderError,
    cohort_label,
    each_fold,
    environment,
    fold_run,
    fold_run_files,
    mask_level,
    parse_fold_run,
)

__all__ = ["COHORT_PREFIX", "RESUMABLE_FIELDS", "FoldSkipped", "RunFolder", "RunFolderError",
           "cohort_label", "each_fold", "environment", "fold_run", "fold_run_files",
           "mask_level", "parse_fold_run"]
