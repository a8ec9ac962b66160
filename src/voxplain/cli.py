"""``voxplain <verb>``: the command line on top of the Python API.

Every flag is a field of a model in :mod:`voxplain.config`: its help text and default come from
there. A ``--config FILE.toml`` supplies values first (a run folder's ``config.toml`` works: the
matching ``[section]`` is read), flags override them. Errors in the input print one line naming
the file and the problem, and exit with status 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from voxplain.config import (AtrophyCohortConfig, GroupMaskConfig, GroupMaskStepConfig,
                             LesionCohortConfig, MaskConfig, MaskGridConfig, MaskStepConfig,
                             ModelConfig, PredictConfig, SessionMaskConfig, SessionMaskStepConfig,
                             TrainConfig, read_toml)

app = typer.Typer(help="Train, explain and measure deep classifiers of medical images.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
generate = typer.Typer(help="Write synthetic cohorts with ground truth.", no_args_is_help=True)
app.add_typer(generate, name="generate")
mask = typer.Typer(help="Meaningful-perturbation masks (paper 1, 2.3).", no_args_is_help=True)
app.add_typer(mask, name="mask")

console = Console(stderr=True)
ConfigT = TypeVar("ConfigT", bound=BaseModel)


def option(model: type[BaseModel], field: str, *flags: str) -> Any:
    """A typer option documented by ``model.field``; None means "not given on the command line"."""
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    suffix = "" if default is None else f" (default: {shown})"
    return typer.Option(None, *flags, help=f"{info.description}{suffix}", show_default=False)


CONFIG_OPTION = typer.Option(None, "--config", help="TOML file of settings; flags override it.")


def split_list(text: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]`` (None stays None)."""
    return None if text is None else [cast(item.strip()) for item in text.split(",") if item.strip()]


def build_config(schema: type[ConfigT], section: str, config_file: Path | None,
                 **flags: Any) -> ConfigT:
    """Validate TOML values (``[section]`` or top level) overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if config_file is not None:
        document = read_toml(config_file)
        values = dict(document.get(section, document))
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or section}: {e['msg']}"
                             for e in error.errors())
        raise typer.BadParameter(problems) from None


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn errors in user input into one line on stderr and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def progress_bar() -> Progress:
    """The progress display of long steps (on stderr, so stdout stays parseable)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])


def _generate(generator: Callable[..., Path], settings: BaseModel, description: str) -> None:
    """Run a cohort generator with a progress bar; print the cohort.tsv it wrote."""
    with reported_errors(), progress_bar() as bar:
        task = bar.add_task(description)
        path = generator(
            settings, progress=lambda done, total: bar.update(task, completed=done, total=total))
    typer.echo(path)


@generate.command("atrophy")
def generate_atrophy(
    out: Path = option(AtrophyCohortConfig, "out", "--out"),
    subjects: int = option(AtrophyCohortConfig, "subjects", "--subjects"),
    sessions: int = option(AtrophyCohortConfig, "sessions", "--sessions"),
    downsample: int = option(AtrophyCohortConfig, "downsample", "--downsample"),
    voxel_size: float = option(AtrophyCohortConfig, "voxel_size", "--voxel-size"),
    regions: str = option(AtrophyCohortConfig, "regions", "--regions"),
    noise: float = option(AtrophyCohortConfig, "noise", "--noise"),
    qc_failures: int = option(AtrophyCohortConfig, "qc_failures", "--qc-failures"),
    seed: int = option(AtrophyCohortConfig, "seed", "--seed"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Synthetic 3D GM maps: AD patients lose grey matter in chosen AAL2 regions."""
    from voxplain.data.synthetic import generate_atrophy_cohort

    _setup_logging()
    settings = build_config(AtrophyCohortConfig, "generate_atrophy", config, out=out,
                            subjects=subjects, sessions=sessions, downsample=downsample,
                            voxel_size=voxel_size, regions=split_list(regions), noise=noise,
                            qc_failures=qc_failures, seed=seed)
    _generate(generate_atrophy_cohort, settings, "generating sessions")


@generate.command("lesions")
def generate_lesions(
    out: Path = option(LesionCohortConfig, "out", "--out"),
    subjects: int = option(LesionCohortConfig, "subjects", "--subjects"),
    size: int = option(LesionCohortConfig, "size", "--size"),
    background: str = option(LesionCohortConfig, "background", "--background"),
    file_format: str = option(LesionCohortConfig, "file_format", "--format"),
    seed: int = option(LesionCohortConfig, "seed", "--seed"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Synthetic 2D lesion patches: benign (round) vs malignant (spiculated), with masks."""
    from voxplain.data.lesions import generate_lesion_cohort

    _setup_logging()
    settings = build_config(LesionCohortConfig, "generate_lesions", config, out=out,
                            subjects=subjects, size=size, background=background,
                            file_format=file_format, seed=seed)
    _generate(generate_lesion_cohort, settings, "generating patches")


@app.command()
def train(
    cohort: Path = option(TrainConfig, "cohort", "--cohort"),
    out: Path = option(TrainConfig, "out", "--out"),
    caps: Path = option(TrainConfig, "caps", "--caps"),
    test: Path = option(TrainConfig, "test", "--test"),
    diagnosis_column: str = option(TrainConfig, "diagnosis_column", "--diagnosis-column"),
    classes: str = option(TrainConfig, "classes", "--classes"),
    folds: int = option(TrainConfig, "folds", "--folds"),
    runs: int = option(TrainConfig, "runs", "--runs"),
    seed: int = option(TrainConfig, "seed", "--seed"),
    epochs: int = option(TrainConfig, "epochs", "--epochs"),
    patience: int = option(TrainConfig, "patience", "--patience"),
    batch_size: int = option(TrainConfig, "batch_size", "--batch-size"),
    learning_rate: float = option(TrainConfig, "learning_rate", "--learning-rate"),
    downsample: int = option(TrainConfig, "downsample", "--downsample"),
    qc_threshold: str = option(TrainConfig, "qc_threshold", "--qc-threshold"),
    cache: str = option(TrainConfig, "cache", "--cache"),
    device: str = option(TrainConfig, "device", "--device"),
    model: str = option(ModelConfig, "name", "--model"),
    channels: str = option(ModelConfig, "channels", "--channels"),
    dropout: float = option(ModelConfig, "dropout", "--dropout"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Subject-level cross-validated training; writes models and metrics to the run folder."""
    from voxplain.train.trainer import train_cohort

    _setup_logging()
    model_flags = {k: v for k, v in {"name": model, "channels": split_list(channels, int),
                                     "dropout": dropout}.items() if v is not None}
    settings = build_config(
        TrainConfig, "train", config, cohort=_absolute(cohort), out=_absolute(out),
        caps=_absolute(caps), test=_absolute(test), diagnosis_column=diagnosis_column,
        classes=split_list(classes), folds=folds, runs=runs, seed=seed, epochs=epochs,
        patience=patience, batch_size=batch_size, learning_rate=learning_rate,
        downsample=downsample, qc_threshold=qc_threshold, cache=cache, device=device, model=model_flags or None)
    with reported_errors(), progress_bar() as bar:
        summary = train_cohort(settings, progress=bar)
    _print_summary(summary)
    typer.echo(settings.out)


@app.command()
def predict(
    run: Path = option(PredictConfig, "run", "--run"),
    cohort: Path = option(PredictConfig, "cohort", "--cohort"),
    caps: Path = option(PredictConfig, "caps", "--caps"),
    out: Path = option(PredictConfig, "out", "--out"),
    device: str = option(PredictConfig, "device", "--device"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Per-session class probabilities of every model of a run folder."""
    from voxplain.train.predict import predict_cohort

    _setup_logging()
    settings = build_config(PredictConfig, "predict", config, run=run, cohort=cohort, caps=caps,
                            out=out, device=device)
    with reported_errors(), progress_bar() as bar:
        predictions = predict_cohort(settings, progress=bar)
    typer.echo(predictions.to_csv(sep="\t", index=False), nl=False)


def _given(**values: Any) -> dict[str, Any] | None:
    """The flags that were given, as a nested section (None when none was)."""
    given = {key: value for key, value in values.items() if value is not None}
    return given or None


@mask.command("group")
def mask_group(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    l1: float = option(MaskConfig, "l1", "--l1"),
    l2: float = option(MaskConfig, "l2", "--l2"),
    b1: float = option(MaskConfig, "b1", "--b1"),
    b2: float = option(MaskConfig, "b2", "--b2"),
    perturbation: str = option(MaskConfig, "perturbation", "--perturbation"),
    max_epochs: int = option(GroupMaskConfig, "max_epochs", "--max-epochs"),
    patience: int = option(GroupMaskConfig, "patience", "--patience"),
    batch_size: int = option(GroupMaskConfig, "batch_size", "--batch-size"),
    config: Path = CONFIG_OPTION,
) -> None:
    """One mask per fold for its correctly classified patients (training set; validation set
    for early stopping)."""
    from voxplain.explain.mask_steps import group_masks

    _setup_logging()
    settings = build_config(
        GroupMaskStepConfig, "mask_group", config, run=_absolute(run),
        folds=split_list(folds, int), diagnosis=diagnosis, device=device,
        mask=_given(l1=l1, l2=l2, b1=b1, b2=b2, perturbation=perturbation, max_epochs=max_epochs,
                    patience=patience, batch_size=batch_size))
    with reported_errors(), progress_bar() as bar:
        summary = group_masks(settings, progress=bar)
    _print_table("Group masks", summary, ["fold", "run", "n_train", "n_validation", "best_epoch",
                                          "probability_before", "probability_after",
                                          "top_regions"])


@mask.command("session")
def mask_session(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    max_sessions: int = option(SessionMaskStepConfig, "max_sessions", "--max-sessions"),
    l1: float = option(MaskConfig, "l1", "--l1"),
    l2: float = option(MaskConfig, "l2", "--l2"),
    perturbation: str = option(MaskConfig, "perturbation", "--perturbation"),
    max_iterations: int = option(SessionMaskConfig, "max_iterations", "--max-iterations"),
    patience: int = option(SessionMaskConfig, "patience", "--patience"),
    batch_size: int = option(SessionMaskConfig, "batch_size", "--batch-size"),
    config: Path = CONFIG_OPTION,
) -> None:
    """One mask per correctly classified session of each fold's validation subjects, batched."""
    from voxplain.explain.mask_steps import session_masks

    _setup_logging()
    settings = build_config(
        SessionMaskStepConfig, "mask_session", config, run=_absolute(run),
        folds=split_list(folds, int), diagnosis=diagnosis, device=device,
        max_sessions=max_sessions,
        mask=_given(l1=l1, l2=l2, perturbation=perturbation, max_iterations=max_iterations,
                    patience=patience, batch_size=batch_size))
    with reported_errors(), progress_bar() as bar:
        index = session_masks(settings, progress=bar)
    _print_table("Session masks", index, ["fold", "participant_id", "session_id", "iterations",
                                          "probability_before", "probability_after"])


@mask.command("grid")
def mask_grid_command(
    run: Path = option(MaskStepConfig, "run", "--run"),
    folds: str = option(MaskStepConfig, "folds", "--folds"),
    diagnosis: str = option(MaskStepConfig, "diagnosis", "--diagnosis"),
    device: str = option(MaskStepConfig, "device", "--device"),
    l1: str = option(MaskGridConfig, "l1", "--l1"),
    l2: str = option(MaskGridConfig, "l2", "--l2"),
    b1: str = option(MaskGridConfig, "b1", "--b1"),
    b2: str = option(MaskGridConfig, "b2", "--b2"),
    max_epochs: int = option(GroupMaskConfig, "max_epochs", "--max-epochs"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Group masks for every combination of l1, l2, b1, b2 (paper 1, 2.3.2), keyed by setting."""
    from voxplain.explain.mask_steps import mask_grid

    _setup_logging()
    settings = build_config(
        MaskGridConfig, "mask_grid", config, run=_absolute(run), folds=split_list(folds, int),
        diagnosis=diagnosis, device=device, l1=split_list(l1, float), l2=split_list(l2, float),
        b1=split_list(b1, float), b2=split_list(b2, float), mask=_given(max_epochs=max_epochs))
    with reported_errors(), progress_bar() as bar:
        summary = mask_grid(settings, progress=bar)
    _print_table("Mask grid", summary, ["l1", "l2", "b1", "b2", "fold", "run",
                                        "probability_after", "top_regions"])


def _print_table(title: str, frame: Any, columns: list[str]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in frame.to_dict("records"):
        table.add_row(*[_cell(row.get(column, "")) for column in columns])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.resolve()


def _print_summary(summary: Any) -> None:
    _print_table("Cross-validation (best model of each fold and run)", summary,
                 ["fold", "run", "subset", "best_epoch", "balanced_accuracy", "auc", "loss"])
    for subset, group in summary.groupby("subset"):
        console.print(f"mean {subset} balanced accuracy: {group.balanced_accuracy.mean():.3f} "
                      f"(per fold: {', '.join(f'{v:.2f}' for v in group.balanced_accuracy)})")


if __name__ == "__main__":
    app()
