"""The run folder, owned here: its layout, its records and its maps (like ClinicaDL's MAPS).

- :mod:`voxplain.run.folder` -- every path, ``fold-K/run-R`` naming and parsing, the recorded
  settings (``config.toml``), the lock, leftovers of killed steps;
- :mod:`voxplain.run.maps` -- the maps a run folder holds (masks and explanations), read and
  written with their grid;
- :mod:`voxplain.run.executor` -- where the independent units of a step run: here, or as the
  tasks of a Ray cluster sharing the run folder.

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
    fold_unit_name,
    fold_run_files,
    map_fold_units,
    mask_level,
    parse_fold_run,
    session_unit_name,
)
from voxplain.run.executor import (Unit, UnitFailed, available_cpus, chunk_size, map_units,
                                   session_chunks)

__all__ = ["COHORT_PREFIX", "RESUMABLE_FIELDS", "FoldSkipped", "RunFolder", "RunFolderError",
           "cohort_label", "each_fold", "environment", "fold_run", "fold_run_files",
           "mask_level", "parse_fold_run", "fold_unit_name", "map_fold_units", "Unit",
           "UnitFailed", "available_cpus", "chunk_size", "map_units", "session_chunks",
           "session_unit_name"]
