"""``voxplain run PIPELINE.toml``: the steps of a pipeline file, in order, each resuming.

A pipeline file has one table per step, named like the step's verb (:data:`STEPS`), in the
order they run::

    run = "demo/run"              # top-level keys: defaults of every step that has the field

    [generate_atrophy]
    out = "demo/cohort"
    subjects = 80

    [train]
    cohort = "demo/cohort/cohort.tsv"
    n_folds = 5

    [mask_group]
    max_epochs = 50               # a key of the step's nested section (here [mask]) may be
                                  # written in the step's table
    [explain]
    method = ["grad_cam", "integrated_gradients"]   # one explanation per method

A table named ``VERB_SUFFIX`` runs the step ``VERB`` (``[explain_grad_cam]``,
``[stats_grad_cam]``): every step records its settings in ``RUN/config.toml`` under such a
name, so ``voxplain run RUN/config.toml`` redoes a run (or resumes it: finished work is skipped).
Relative paths are relative to the current folder, as on the command line.

Bad input (an unknown step, an unknown key, a value of the wrong type) is one error naming the
file, the table and the key, raised before any step runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.progress import Progress

from voxplain.config import (AtrophyCohortConfig, ClassificationEvaluationConfig,
                             ClinicaDLImportConfig, CyCEStepConfig, ExecutorConfig,
                             CyCETransferConfig, ExplainStepConfig, FaithfulnessStepConfig,
                             GroupMaskStepConfig,
                             LesionCohortConfig, LocalisationStepConfig, MaskGridConfig,
                             MonaiImportConfig, MSCohortConfig, PredictConfig,
                             ProgramImportConfig, PythonImportConfig, ReportConfig,
                             RandomisationConfig, RobustnessConfig, SearchConfig,
                             SessionMaskStepConfig, SplitTestConfig, StatsConfig, StudyAnalyseConfig,
                             StudyExportConfig, StudyMakeConfig, TrainConfig, is_field,
                             read_toml)
from voxplain.steps.classification import run_classification
from voxplain.steps.cyce import run_cyce_train, run_cyce_transfer
from voxplain.steps.explain import run_explain
from voxplain.steps.faithfulness import run_faithfulness
from voxplain.steps.generate import run_generate_atrophy, run_generate_lesions, run_generate_ms
from voxplain.steps.imports import (run_import_clinicadl, run_import_monai, run_import_program,
                                    run_import_python)
from voxplain.steps.localisation import run_localisation
from voxplain.steps.masks import run_group_masks, run_mask_grid, run_session_masks
from voxplain.steps.predict import run_predict
from voxplain.steps.report import run_report
from voxplain.steps.randomisation import run_randomisation
from voxplain.steps.robustness import run_robustness
from voxplain.steps.search import run_search
from voxplain.steps.split import run_split_test
from voxplain.steps.stats import run_stats
from voxplain.steps.study import run_study_analyse, run_study_export, run_study_make
from voxplain.steps.train import run_train

log = logging.getLogger("voxplain")

__all__ = ["STEPS", "PipelineError", "Step", "PlannedStep", "read_pipeline", "run_pipeline"]


class PipelineError(ValueError):
    """A pipeline file that cannot run: the message names the file, the table and the key."""


@dataclass(frozen=True)
class Step:
    """One verb: its settings model and its function ``run_X(config, progress)``.

    ``lists``: fields the pipeline may give as a list to run the step once per value (the
    explained method).
    """

    schema: type[BaseModel]
    function: Callable[[Any, Progress | None], Any]
    lists: tuple[str, ...] = field(default=())


#: Every step a pipeline may name, in the order of a full pipeline.
STEPS: dict[str, Step] = {
    "generate_atrophy": Step(AtrophyCohortConfig, run_generate_atrophy),
    "generate_lesions": Step(LesionCohortConfig, run_generate_lesions),
    "generate_ms": Step(MSCohortConfig, run_generate_ms),
    "split_test": Step(SplitTestConfig, run_split_test),
    "search": Step(SearchConfig, run_search),
    "train": Step(TrainConfig, run_train),
    "import_clinicadl": Step(ClinicaDLImportConfig, run_import_clinicadl),
    "import_monai": Step(MonaiImportConfig, run_import_monai),
    "import_program": Step(ProgramImportConfig, run_import_program),
    "import_python": Step(PythonImportConfig, run_import_python),
    "predict": Step(PredictConfig, run_predict),
    "mask_group": Step(GroupMaskStepConfig, run_group_masks),
    "mask_session": Step(SessionMaskStepConfig, run_session_masks),
    "mask_grid": Step(MaskGridConfig, run_mask_grid),
    "cyce_train": Step(CyCEStepConfig, run_cyce_train),
    "cyce_transfer": Step(CyCETransferConfig, run_cyce_transfer),
    "explain": Step(ExplainStepConfig, run_explain, lists=("method",)),
    "evaluate_localisation": Step(LocalisationStepConfig, run_localisation),
    "evaluate_faithfulness": Step(FaithfulnessStepConfig, run_faithfulness),
    "evaluate_classification": Step(ClassificationEvaluationConfig, run_classification),
    "evaluate_robustness": Step(RobustnessConfig, run_robustness),
    "evaluate_randomisation": Step(RandomisationConfig, run_randomisation),
    "stats": Step(StatsConfig, run_stats),
    "report": Step(ReportConfig, run_report),
    "study_make": Step(StudyMakeConfig, run_study_make),
    "study_analyse": Step(StudyAnalyseConfig, run_study_analyse),
    "study_export": Step(StudyExportConfig, run_study_export),
}


@dataclass(frozen=True)
class PlannedStep:
    """One step of a pipeline, validated: the table it came from, its verb, its settings."""

    table: str
    name: str
    config: BaseModel

    @property
    def label(self) -> str:
        """``[table]``, followed by the value of a listed field (``[explain] grad_cam``)."""
        values = [_listed_value(self.config, name) for name in STEPS[self.name].lists]
        return " ".join([f"[{self.table}]", *[str(v) for v in values if v is not None]])

    def run(self, progress: Progress | None = None) -> Any:
        return STEPS[self.name].function(self.config, progress)


def _listed_value(config: BaseModel, name: str) -> Any:
    if name in type(config).model_fields:
        return getattr(config, name)
    inner = _nested_field(type(config))
    return getattr(getattr(config, inner), name, None) if inner else None


def step_name(table: str) -> str | None:
    """The verb a table runs: its name, or the longest verb ``V`` with the name ``V_...``."""
    if table in STEPS:
        return table
    prefixes = [name for name in STEPS if table.startswith(f"{name}_")]
    return max(prefixes, key=len) if prefixes else None


def read_pipeline(path: str | Path, run: Path | None = None) -> list[PlannedStep]:
    """The validated steps of a pipeline file (``run``: the run folder of every step, instead
    of the file's). Raises :class:`PipelineError` on any problem, before anything runs."""
    path = Path(path)
    try:
        document = read_toml(path)
    except (FileNotFoundError, ValueError) as error:
        raise PipelineError(str(error)) from None
    shared = {key: value for key, value in document.items() if not isinstance(value, dict)}
    if run is not None:
        shared["run"] = str(run)
    tables = {key: value for key, value in document.items() if isinstance(value, dict)}
    if not tables:
        raise PipelineError(f"{path}: no step (a table named like a step: "
                            f"{', '.join(STEPS)})")
    used = {key for table in tables if step_name(table)
            for key in _shared_for(STEPS[step_name(table)].schema, shared)}
    unused = sorted(set(shared) - used - ({"run"} if run is not None else set()))
    if unused:
        raise PipelineError(f"{path} {unused[0]}: a top-level setting no step of the file has")
    planned = []
    for table, values in tables.items():
        name = step_name(table)
        if name is None:
            raise PipelineError(f"{path} [{table}]: unknown step; steps are "
                                f"{', '.join(STEPS)}")
        step = STEPS[name]
        values = _nested(step.schema, {**_shared_for(step.schema, shared), **values}, path, table)
        if run is not None and "run" in step.schema.model_fields:
            values["run"] = str(run)
        for expanded in _expanded(step, values):
            config = _absolute(_validated(step.schema, expanded, path, table))
            planned.append(PlannedStep(table, name, config))
    return planned


def run_pipeline(path: str | Path, run: Path | None = None,
                 progress: Progress | None = None) -> list[tuple[PlannedStep, Any]]:
    """Run every step of the pipeline file in order; returns each step with its result."""
    planned = read_pipeline(path, run)
    results = []
    for number, step in enumerate(planned, 1):
        started = time.perf_counter()
        log.info("step %d of %d: %s", number, len(planned), step.label)
        results.append((step, step.run(progress)))
        log.info("step %d of %d: %s done in %.0f s", number, len(planned), step.label,
                 time.perf_counter() - started)
    return results


def _shared_for(schema: type[BaseModel], shared: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in shared.items() if key in schema.model_fields}


def _nested_field(schema: type[BaseModel]) -> str | None:
    """The one field of ``schema`` that holds a nested settings model (``mask``, ``explain``,
    ``cyce``, ``model``), if any; the ``executor`` section (where the units run) is given as a
    table of its own, or as its kind (``executor = "ray"``)."""
    nested = [name for name, info in schema.model_fields.items()
              if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
              and info.annotation is not ExecutorConfig]
    return nested[0] if len(nested) == 1 else None


def _nested(schema: type[BaseModel], values: dict[str, Any], path: Path,
            table: str) -> dict[str, Any]:
    """``values`` with the keys that belong to the step's nested section moved into it; a key
    of neither is an error naming it."""
    inner = _nested_field(schema)
    inner_schema = schema.model_fields[inner].annotation if inner else None
    result: dict[str, Any] = {}
    for key, value in values.items():
        if is_field(schema, key):
            result[key] = {**result.get(key, {}), **value} if isinstance(value, dict) and \
                isinstance(result.get(key), dict) else value
        elif inner_schema is not None and is_field(inner_schema, key):
            result.setdefault(inner, {})[key] = value
        else:
            raise PipelineError(f"{path} [{table}] {key}: unknown setting of the "
                                f"{step_name(table)} step")
    return result


def _expanded(step: Step, values: dict[str, Any]) -> list[dict[str, Any]]:
    """One set of values per item of a list given for one of the step's ``lists`` fields
    (top level or in its nested section)."""
    inner = _nested_field(step.schema)
    for name in step.lists:
        for where in (values, values.get(inner) if inner else None):
            if isinstance(where, dict) and isinstance(where.get(name), list):
                items = where[name]
                copies = []
                for item in items:
                    copy = {**values}
                    if where is values:
                        copy[name] = item
                    else:
                        copy[inner] = {**values[inner], name: item}
                    copies.append(copy)
                return copies
    return [values]


def _absolute(config: BaseModel) -> BaseModel:
    """``config`` with every relative path made absolute (relative to the current folder), so
    that the settings a step records still hold when the pipeline is run from elsewhere."""
    update: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = value.resolve()
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            update[name] = [v.resolve() for v in value]
        elif isinstance(value, BaseModel):
            update[name] = _absolute(value)
    return config.model_copy(update=update) if update else config


def _validated(schema: type[BaseModel], values: dict[str, Any], path: Path,
               table: str) -> BaseModel:
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or table}: {e['msg']}"
                             for e in error.errors())
        raise PipelineError(f"{path} [{table}] {problems}") from None
