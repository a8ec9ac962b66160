"""``voxplain study make|serve|export|analyse``: blinded user studies (paper 3, 3.4 and 4.2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    config_command,
    console,
    option,
    print_table,
    reported_errors,
    setup_logging,
)
from voxplain.config import (
    StudyAnalyseConfig,
    StudyExportConfig,
    StudyMakeConfig,
    StudyServeConfig,
)

study = typer.Typer(help="Blinded user studies of explanation methods (paper 3, 3.4).",
                    no_args_is_help=True)


@study.command("make")
@config_command(StudyMakeConfig, "study_make",
                ["run", "methods", "fold", "model_run", "samples_per_class", "seed", "criteria",
                 "score_min", "score_max", "colormap", "pixels", "out"])
def study_make(settings: StudyMakeConfig) -> None:
    """Questionnaires A and B (method names hidden behind random ids) and their key."""
    from voxplain.study.make import make_questionnaires

    with reported_errors():
        key = make_questionnaires(settings)
    counts = key.groupby("diagnosis", as_index=False).agg(questions=("question", "nunique"))
    print_table("Questions per class", counts, ["diagnosis", "questions"])


@study.command("serve")
def study_serve(
    study_folder: Path = option(StudyServeConfig, "study", "--study"),
    variant: str = option(StudyServeConfig, "variant", "--variant"),
    port: int = option(StudyServeConfig, "port", "--port"),
    database: Path = option(StudyServeConfig, "database", "--database"),
    raters: list[str] = option(StudyServeConfig, "raters", "--rater"),
    new_links: bool = option(StudyServeConfig, "new_links", "--new-links"),
    request_timeout: float = option(StudyServeConfig, "request_timeout", "--request-timeout"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Show one questionnaire on http://127.0.0.1:PORT/ and save each answer to SQLite; print
    a secret link (RATER<tab>URL on stdout) for each --rater who has none yet."""
    from voxplain.study.serve import serve

    setup_logging()
    settings = build_config(StudyServeConfig, "study_serve", config, study=absolute(study_folder),
                            variant=variant, port=port, database=absolute(database),
                            raters=raters or None, new_links=new_links,
                            request_timeout=request_timeout)
    with reported_errors():
        serve(settings)


@study.command("export")
@config_command(StudyExportConfig, "study_export", ["study", "database", "out"])
def study_export(settings: StudyExportConfig) -> None:
    """Every answer in the database as one CSV."""
    from voxplain.study.make import StudyFolder
    from voxplain.study.serve import AnswerStore

    folder = StudyFolder(settings.study)
    target = settings.out or folder.root / "answers.csv"
    with reported_errors():
        AnswerStore(settings.database or folder.database).export_csv(target)
    console.print(f"answers written to {target}")


@study.command("analyse")
@config_command(StudyAnalyseConfig, "study_analyse", ["study", "database", "answers_csv", "out"])
def study_analyse(settings: StudyAnalyseConfig) -> None:
    """De-randomise the answers and write tables 2-4, t-tests, reliability, A vs B, order
    effect, KMO, PCA and figures to STUDY/analysis."""
    from voxplain.study.analyse import analyse

    with reported_errors():
        summary = analyse(settings)
    print_table("User study", pd.DataFrame([{k: v for k, v in summary.items()
                                             if not isinstance(v, (dict, list))}]),
                ["raters", "answers", "questions", "kmo", "phi_explained_variance"])
