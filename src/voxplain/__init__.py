"""voxplain: train deep classifiers of medical images, explain them, and measure whether the
explanations and the classifiers behind them can be trusted.

``import voxplain`` gives what a user needs, loaded on first use (so the command line starts
fast): the settings of every step (``voxplain.TrainConfig``, ...), the steps over a run folder
(``voxplain.run_train``, ``voxplain.run_explain``, ..., ``voxplain.run_pipeline``), the run
folder (``voxplain.RunFolder``) and the explainers (``voxplain.explainer``,
``voxplain.METHODS``). The same config objects drive the command line and pipeline files.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it.
_PUBLIC = {
    **dict.fromkeys(
        ["AtrophyCohortConfig", "LesionCohortConfig", "MSCohortConfig", "TrainConfig",
         "ModelConfig", "SearchConfig", "SearchSpaceConfig", "PredictConfig",
         "GroupMaskStepConfig", "SessionMaskStepConfig",
         "MaskGridConfig", "ExplainStepConfig", "ExplainConfig", "LocalisationStepConfig",
         "ClassificationEvaluationConfig", "RobustnessConfig", "StatsConfig", "ReportConfig",
         "CyCEStepConfig", "CyCETransferConfig", "StudyMakeConfig", "StudyAnalyseConfig",
         "ClinicaDLImportConfig", "MonaiImportConfig", "ProgramImportConfig",
         "PythonImportConfig"],
        "voxplain.config"),
    **dict.fromkeys(
        ["run_generate_atrophy", "run_generate_lesions", "run_generate_ms", "run_search",
         "run_train", "run_import_clinicadl", "run_import_monai", "run_import_program",
         "run_import_python", "import_model",
         "run_predict", "run_group_masks", "run_session_masks", "run_mask_grid", "run_explain",
         "run_localisation", "run_classification", "run_robustness", "run_stats",
         "run_report", "run_cyce_train", "run_cyce_transfer", "run_study_make",
         "run_study_analyse", "run_pipeline", "load_context"],
        "voxplain.steps"),
    **dict.fromkeys(["RunFolder", "RunFolderError"], "voxplain.run"),
    **dict.fromkeys(["Explainer", "METHODS", "explainer"], "voxplain.explain"),
    **dict.fromkeys(["Cohort", "Grid", "Atlas"], "voxplain.data"),
    **dict.fromkeys(["build_model", "load_model"], "voxplain.models"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'voxplain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
