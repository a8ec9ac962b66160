"""``voxplain explain``: per-session attribution maps and group maps of a run's models."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    console,
    given,
    option,
    print_table,
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import ExplainConfig, ExplainStepConfig, LocalisationConfig


def explain(
    run: Path = option(ExplainStepConfig, "run", "--run"),
    method: str = option(ExplainConfig, "method", "--method"),
    cohort: Path = option(ExplainStepConfig, "cohort", "--cohort"),
    target: str = option(ExplainConfig, "target", "--target"),
    layer: str = option(ExplainConfig, "layer", "--layer"),
    min_layer_size: int = option(ExplainConfig, "min_layer_size", "--min-layer-size"),
    batch_size: int = option(ExplainConfig, "batch_size", "--batch-size"),
    options: str = option(ExplainConfig, "options", "--options"),
    group: str = option(ExplainConfig, "group", "--group"),
    folds: str = option(ExplainStepConfig, "folds", "--folds"),
    device: str = option(ExplainStepConfig, "device", "--device"),
    evaluate_against: Path = option(ExplainStepConfig, "evaluate_against", "--evaluate-against"),
    session_truth: str = option(ExplainStepConfig, "session_truth", "--session-truth"),
    tolerance: float = option(LocalisationConfig, "tolerance", "--tolerance"),
    top_k: int = option(LocalisationConfig, "top_k", "--top-k"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Maps of every fold/run's model for its validation sessions (or --cohort), a group map per
    diagnosis, and with --evaluate-against a localisation table of every method's group maps
    (with --session-truth COLUMN: of every session map against its own truth, e.g. the lesion
    masks of mask_path). --method takes one name or several, comma separated (e.g.
    grad_cam,grad_cam_pp); without --method, --evaluate-against and --session-truth score the
    maps already in the run folder."""
    from voxplain.explain.explain_steps import explain_run

    setup_logging()
    scoring = _localisation(tolerance, top_k)
    if method is None and (evaluate_against or session_truth) and run is not None:
        if evaluate_against is not None:
            _print_localisation(absolute(run), absolute(evaluate_against), scoring)
        if session_truth is not None:
            _print_session_localisation(absolute(run), session_truth, scoring)
        return
    if method is None and config is None:
        raise typer.BadParameter("give --method NAME[,NAME...] (or only --evaluate-against or "
                                 "--session-truth to score the maps already in the run folder)")
    settings = [build_config(
        ExplainStepConfig, "explain", config, run=absolute(run), cohort=absolute(cohort),
        folds=split_list(folds, int), device=device, evaluate_against=absolute(evaluate_against),
        session_truth=session_truth,
        explain=given(method=name, target=target, layer=layer, min_layer_size=min_layer_size,
                      batch_size=batch_size,
                      options=parse_options(options), group=group))
        for name in split_list(method) or [None]]
    for step in settings:
        with reported_errors(), progress_bar() as bar:
            index = explain_run(step, progress=bar)
        console.print(f"{step.explain.method}: {len(index)} map(s) in "
                      f"{step.run / 'explanations'}", highlight=False)
    truth = settings[-1].evaluate_against
    if truth is not None:
        _print_localisation(settings[-1].run, truth, scoring)
    if settings[-1].session_truth is not None:
        _print_session_localisation(settings[-1].run, settings[-1].session_truth, scoring)


def _localisation(tolerance: float | None, top_k: int | None) -> LocalisationConfig:
    return LocalisationConfig.model_validate(given(tolerance=tolerance, top_k=top_k) or {})


def _print_localisation(run: Path, truth: Path, config: LocalisationConfig) -> None:
    from voxplain.evaluate.localisation import (
        evaluate_localisation,
        localisation_summary,
    )

    with reported_errors():
        table = evaluate_localisation(run, truth, config=config)
    summary = localisation_summary(table)
    # short headers: the table must stay readable in an 80-column log
    headers = {"key": "explanation", "auc": "AUC", "mass_inside": "mass in",
               "chance_mass": "chance", "pointing_game": "pointing",
               f"top{config.top_k}_hit": f"top{config.top_k} hit"}
    print_table(f"Localisation of the {table.diagnosis.iloc[0]} group maps against {truth.name}, "
                f"mean over {summary.models.max()} model(s) (layer: see localisation.tsv)",
                summary.rename(columns=headers), list(headers.values()))
    console.print(f"per fold/run: {run / 'evaluation' / 'localisation.tsv'}", highlight=False)


def _print_session_localisation(run: Path, column: str, config: LocalisationConfig) -> None:
    from voxplain.evaluate.localisation import (
        evaluate_session_localisation,
        session_localisation_summary,
    )

    with reported_errors():
        table = evaluate_session_localisation(run, column, config=config)
    summary = session_localisation_summary(table)
    headers = {"key": "explanation", "diagnosis": "diagnosis", "maps": "maps",
               "scored": "with truth", "auc": "AUC", "mass_inside": "mass in",
               "chance_mass": "chance", "pointing_game": "pointing"}
    print_table(f"Localisation of every session map against its own truth ({column}), mean "
                "per diagnosis", summary.rename(columns=headers), list(headers.values()))
    console.print(f"per map: {run / 'evaluation' / 'localisation_sessions.tsv'}", highlight=False)


def parse_options(text: str | None) -> dict[str, Any] | None:
    """``"n_steps=32,baseline=blur"`` -> ``{"n_steps": 32, "baseline": "blur"}``."""
    if text is None:
        return None
    options: dict[str, Any] = {}
    for item in split_list(text) or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"--options: expected NAME=VALUE, got {item!r}")
        try:
            options[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[name.strip()] = value.strip()
    return options
