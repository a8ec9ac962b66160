"""``voxplain study make|serve|export|analyse``: blinded user studies (paper 3, 3.4 and 4.2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    console,
    option,
    print_table,
    reported_errors,
    setup_logging,
    split_list,
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
def study_make(
    run: Path = option(StudyMakeConfig, "run", "--run"),
    methods: str = option(StudyMakeConfig, "methods", "--methods"),
    fold: int = option(StudyMakeConfig, "fold", "--fold"),
    model_run: int = option(StudyMakeConfig, "model_run", "--model-run"),
    samples_per_class: int = option(StudyMakeConfig, "samples_per_class", "--samples-per-class"),
    seed: int = option(StudyMakeConfig, "seed", "--seed"),
    criteria: str = option(StudyMakeConfig, "criteria", "--criteria"),
    score_min: int = option(StudyMakeConfig, "score_min", "--score-min"),
    score_max: int = option(StudyMakeConfig, "score_max", "--score-max"),
    colormap: str = option(StudyMakeConfig, "colormap", "--colormap"),
    pixels: int = option(StudyMakeConfig, "pixels", "--pixels"),
    out: Path = option(StudyMakeConfig, "out", "--out"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Questionnaires A and B (method names hidden behind random ids) and their key."""
    from voxplain.study.make import make_questionnaires

    setup_logging()
    settings = build_config(
        StudyMakeConfig, "study_make", config, run=absolute(run), methods=split_list(methods),
        fold=fold, model_run=model_run, samples_per_class=samples_per_class, seed=seed,
        criteria=split_list(criteria), score_min=score_min, score_max=score_max,
        colormap=colormap, pixels=pixels, out=absolute(out))
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
def study_export(
    study_folder: Path = option(StudyExportConfig, "study", "--study"),
    database: Path = option(StudyExportConfig, "database", "--database"),
    out: Path = option(StudyExportConfig, "out", "--out"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Every answer in the database as one CSV."""
    from voxplain.study.make import StudyFolder
    from voxplain.study.serve import AnswerStore

    settings = build_config(StudyExportConfig, "study_export", config,
                            study=absolute(study_folder), database=absolute(database),
                            out=absolute(out))
    folder = StudyFolder(settings.study)
    target = settings.out or folder.root / "answers.csv"
    with reported_errors():
        AnswerStore(settings.database or folder.database).export_csv(target)
    console.print(f"answers written to {target}")


@study.command("analyse")
def study_analyse(
    study_folder: Path = option(StudyAnalyseConfig, "study", "--study"),
    database: Path = option(StudyAnalyseConfig, "database", "--database"),
    answers_csv: str = option(StudyAnalyseConfig, "answers_csv", "--answers-csv"),
    out: Path = option(StudyAnalyseConfig, "out", "--out"),
    config: Path = CONFIG_OPTION,
) -> None:
    """De-randomise the answers and write tables 2-4, t-tests, reliability, A vs B, order
    effect, KMO, PCA and figures to STUDY/analysis."""
    from voxplain.study.analyse import analyse

    setup_logging()
    settings = build_config(
        StudyAnalyseConfig, "study_analyse", config, study=absolute(study_folder),
        database=absolute(database),
        answers_csv=[absolute(Path(p)) for p in split_list(answers_csv) or []] or None,
        out=absolute(out))
    with reported_errors():
        summary = analyse(settings)
    print_table("User study", pd.DataFrame([{k: v for k, v in summary.items()
                                             if not isinstance(v, (dict, list))}]),
                ["raters", "answers", "questions", "kmo", "phi_explained_variance"])
