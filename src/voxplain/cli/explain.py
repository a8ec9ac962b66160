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
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import ExecutorConfig, ExplainConfig, ExplainStepConfig


def explain(
    run: Path = option(ExplainStepConfig, "run", "--run"),
    method: str = option(ExplainConfig, "method", "--method"),
    cohort: Path = option(ExplainStepConfig, "cohort", "--cohort"),
    subset: str = option(ExplainStepConfig, "subset", "--subset"),
    target: str = option(ExplainConfig, "target", "--target"),
    layer: str = option(ExplainConfig, "layer", "--layer"),
    min_layer_size: int = option(ExplainConfig, "min_layer_size", "--min-layer-size"),
    batch_size: int = option(ExplainConfig, "batch_size", "--batch-size"),
    options: str = option(ExplainConfig, "options", "--options"),
    baseline_class: str = option(ExplainConfig, "baseline_class", "--baseline-class"),
    group: str = option(ExplainConfig, "group", "--group"),
    folds: str = option(ExplainStepConfig, "folds", "--folds"),
    device: str = option(ExplainStepConfig, "device", "--device"),
    executor: str = option(ExecutorConfig, "kind", "--executor"),
    address: str = option(ExecutorConfig, "address", "--address"),
    cpus_per_task: int = option(ExecutorConfig, "cpus_per_task", "--cpus-per-task"),
    gpus_per_task: float = option(ExecutorConfig, "gpus_per_task", "--gpus-per-task"),
    sessions_per_unit: int = option(ExecutorConfig, "sessions_per_unit", "--sessions-per-unit"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Maps of every fold/run's model for its validation (or --subset test) sessions (or
    --cohort) and a group map
    per diagnosis. --method takes one name or several, comma separated (e.g.
    grad_cam,grad_cam_pp). Score them with `voxplain evaluate localisation`."""
    from voxplain.steps.explain import run_explain

    setup_logging()
    if method is None and config is None:
        raise typer.BadParameter("give --method NAME[,NAME...]")
    settings = [build_config(
        ExplainStepConfig, "explain", config, run=absolute(run), cohort=absolute(cohort),
        subset=subset, folds=split_list(folds, int), device=device,
        executor=given(kind=executor, address=address, cpus_per_task=cpus_per_task,
                       gpus_per_task=gpus_per_task, sessions_per_unit=sessions_per_unit),
        explain=given(method=name, target=target, layer=layer, min_layer_size=min_layer_size,
                      batch_size=batch_size, options=parse_options(options), group=group,
                      baseline_class=baseline_class))
        for name in split_list(method) or [None]]
    for step in settings:
        with reported_errors(), progress_bar() as bar:
            index = run_explain(step, progress=bar)
        console.print(f"{step.explain.method}: {len(index)} map(s) in "
                      f"{step.run / 'explanations'}", highlight=False)


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
