"""The steps layer: the only package that reads or writes a run folder.

One module per verb, each with ``run_X(config, progress=None) -> result`` taking the config
model of :mod:`voxplain.config` that the command line builds from its flags and a pipeline file
from its sections. Steps resume: finished work is skipped, interrupted work continues.
:data:`STEPS` maps each pipeline section name to its config model and function
(:mod:`voxplain.steps.pipeline`).
"""

from voxplain.steps.classification import run_classification
from voxplain.steps.context import RunContext, load_context
from voxplain.steps.cyce import run_cyce_train, run_cyce_transfer
from voxplain.steps.explain import run_explain
from voxplain.steps.generate import run_generate_atrophy, run_generate_lesions, run_generate_ms
from voxplain.steps.imports import (import_model, run_import_clinicadl, run_import_monai,
                                    run_import_program, run_import_python)
from voxplain.steps.localisation import run_localisation
from voxplain.steps.masks import run_group_masks, run_mask_grid, run_session_masks
from voxplain.steps.pipeline import STEPS, read_pipeline, run_pipeline
from voxplain.steps.predict import run_predict
from voxplain.steps.report import run_report
from voxplain.steps.robustness import run_robustness
from voxplain.steps.search import run_search
from voxplain.steps.stats import run_stats
from voxplain.steps.study import run_study_analyse, run_study_export, run_study_make
from voxplain.steps.train import run_train

__all__ = ["STEPS", "RunContext", "import_model", "load_context", "read_pipeline",
           "run_classification",
           "run_cyce_train", "run_cyce_transfer", "run_explain", "run_generate_atrophy",
           "run_generate_lesions", "run_generate_ms", "run_group_masks", "run_import_clinicadl",
           "run_import_monai", "run_import_program", "run_import_python", "run_localisation",
           "run_mask_grid", "run_pipeline", "run_predict", "run_report", "run_robustness",
           "run_search", "run_session_masks", "run_stats", "run_study_analyse", "run_study_export",
           "run_study_make", "run_train"]
