"""What every verb of the command line shares: flags documented by the config models, config
files, one-line errors, progress bars and tables.

Every flag is a field of a model in :mod:`voxplain.config`: its help text and default come from
there, and :func:`config_command` turns a list of fields into a verb's flags and the flags back
into the model. A ``--config FILE.toml`` supplies values first (a run folder's ``config.toml``
works: the matching ``[section]`` is read), flags override them. Errors in the input print one
line naming the file and the problem, and exit with status 2.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from voxplain.config import read_toml

console = Console(stderr=True)
ConfigT = TypeVar("ConfigT", bound=BaseModel)


def option(model: type[BaseModel], field: str, *flags: str) -> Any:
    """A typer option documented by ``model.field``; None means "not given on the command line"."""
    info = model.model_fields[field]
    if info.is_required():
        return typer.Option(None, *flags, help=f"{info.description} (required)", show_default=False)
    default = info.get_default(call_default_factory=True)
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    suffix = "" if default is None or shown in ("", {}) else f" (default: {shown})"
    return typer.Option(None, *flags, help=f"{info.description}{suffix}", show_default=False)


#: Where the units of a step that fans out run (:class:`voxplain.config.ExecutorConfig`):
#: ``--executor ray [--address auto|HOST:PORT] [--cpus-per-task N] [--gpus-per-task X]``.
EXECUTOR_FIELDS = ["executor.kind", "executor.address", "executor.cpus_per_task",
                   "executor.gpus_per_task"]
#: The executor flags of a step that works session by session: also ``--sessions-per-unit N``.
SESSION_EXECUTOR_FIELDS = [*EXECUTOR_FIELDS, "executor.sessions_per_unit"]
EXECUTOR_FLAGS = {"executor.kind": "--executor"}

CONFIG_OPTION = typer.Option(None, "--config", help="TOML file of settings; flags override it.")


def split_list(text: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]`` (None stays None)."""
    if text is None:
        return None
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def build_config(schema: type[ConfigT], section: str, config_file: Path | None,
                 **flags: Any) -> ConfigT:
    """Validate TOML values (``[section]`` or top level) overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if config_file is not None:
        with reported_errors():  # a missing or invalid file: one line, not a traceback
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
        where = f"{config_file} [{section}] or the flags" if config_file else "the flags"
        _print_error(f"invalid settings in {where}: {problems}")
        raise typer.Exit(2) from None


def config_command(schema: type[BaseModel], section: str, fields: Sequence[str], *,
                   flags: Mapping[str, str | tuple[str, ...]] | None = None,
                   absolute_paths: bool = True,
                   ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A verb whose flags are ``fields`` of ``schema``, called with the validated settings.

    ``fields`` name the settings the verb exposes, in the order of its help: ``"run"``, or
    ``"mask.l1"`` for a field of the nested section ``mask``. Each flag is ``--field-name``
    (the last part of the path) unless ``flags`` names it, e.g. ``{"run": ("--run", "--out")}``
    or ``{"equal_var": "--equal-var/--welch"}``. A flag parses the field's type: lists as
    comma-separated text, paths made absolute (unless ``absolute_paths`` is false), literals
    and unions as text; a setting on by default that may be None takes text too ("none").

    The decorated body takes the settings (``build_config`` of ``--config`` and the given
    flags, read as ``[section]``) and keeps any further parameter of its own (e.g. ``--open``),
    shown after the fields and before ``--config``::

        @app.command()
        @config_command(ReportConfig, "report", ["run", "out", "inline"])
        def report(settings: ReportConfig) -> None:  # its docstring: the verb's help
    """
    renamed = dict(flags or {})
    declared = [_config_flag(schema, path, renamed.pop(path, None), absolute_paths)
                for path in fields]
    if renamed:
        raise ValueError(f"flags of fields not exposed by {schema.__name__}: {sorted(renamed)}")

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
        parameters = [flag.parameter for flag in declared] + [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in own] + [
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=CONFIG_OPTION,
                              annotation=Path)]

        @functools.wraps(body)
        def command(config: Path | None, **arguments: Any) -> None:
            setup_logging()
            values = _given_values(declared, arguments)  # takes the flags out of arguments
            body(build_config(schema, section, config, **values), **arguments)

        # typer reads the flags from the signature and their types from the annotations
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {parameter.name: parameter.annotation
                                   for parameter in parameters}
        return command

    return decorate


@dataclass(frozen=True)
class _ConfigFlag:
    path: str  # "run", "mask.l1"
    parameter: inspect.Parameter
    convert: Callable[[Any], Any]  # the parsed flag -> the field's value


def _given_values(declared: list[_ConfigFlag], arguments: dict[str, Any]) -> dict[str, Any]:
    """The flags given on the command line as settings: ``mask.l1`` -> ``{"mask": {"l1": v}}``."""
    values: dict[str, Any] = {}
    for flag in declared:
        value = arguments.pop(flag.parameter.name)
        if value is not None:
            *sections, name = flag.path.split(".")
            table = values
            for part in sections:
                table = table.setdefault(part, {})
            table[name] = flag.convert(value)
    return values


def _config_flag(schema: type[BaseModel], path: str, names: str | tuple[str, ...] | None,
                 absolute_paths: bool) -> _ConfigFlag:
    *sections, name = path.split(".")
    model = schema
    for part in sections:
        model = _section_model(model, part)
    if name not in model.model_fields:
        raise ValueError(f"{model.__name__} has no field {name!r} (flag of {path!r})")
    if names is None:
        names = "--" + name.replace("_", "-")
    annotation, convert = _flag_type(model.model_fields[name], absolute_paths)
    parameter = inspect.Parameter(path.replace(".", "_"), inspect.Parameter.KEYWORD_ONLY,
                                  default=option(model, name, *_as_tuple(names)),
                                  annotation=annotation)
    return _ConfigFlag(path, parameter, convert)


def _section_model(schema: type[BaseModel], name: str) -> type[BaseModel]:
    section = schema.model_fields[name].annotation if name in schema.model_fields else None
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        raise TypeError(f"{schema.__name__}.{name} is not a nested section")
    return section


def _flag_type(info: FieldInfo, absolute_paths: bool) -> tuple[Any, Callable[[Any], Any]]:
    """The type typer parses a field's flag as, and the conversion into the field's value."""
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        optional = len(members) < len(get_args(annotation))
        if len(members) > 1 or (optional and not info.is_required()
                                and info.get_default(call_default_factory=True) is not None):
            # a class name or index; or "none", the only way to turn off a default on the
            # command line (the model's validator reads it)
            return str, _unchanged
        annotation = members[0]
    if get_origin(annotation) in (list, tuple):
        item = _item_cast(get_args(annotation)[0], absolute_paths)
        return str, functools.partial(split_list, cast=item)
    if get_origin(annotation) in (Literal, dict):
        return str, _unchanged
    if annotation is Path and absolute_paths:
        return Path, absolute
    return annotation, _unchanged


def _item_cast(item: Any, absolute_paths: bool) -> Callable[[str], Any]:
    if item is Path:
        return (lambda text: Path(text).resolve()) if absolute_paths else Path
    return item if item in (int, float) else str


def _unchanged(value: Any) -> Any:
    return value


def _as_tuple(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else names


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn errors in user input into one line on stderr and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _print_error(str(error))
        raise typer.Exit(2) from None


def _print_error(message: str) -> None:
    # as plain text: messages quote config sections such as "[train]", not rich markup
    console.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False,
                  soft_wrap=True)


def progress_bar() -> Progress:
    """The progress display of long steps (on stderr, so stdout stays parseable)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])


def given(**values: Any) -> dict[str, Any] | None:
    """The flags that were given, as a nested section (None when none was)."""
    given = {key: value for key, value in values.items() if value is not None}
    return given or None


def print_table(title: str, frame: Any, columns: list[str]) -> None:
    """Print ``frame``'s ``columns`` as a table on stderr (stdout stays parseable)."""
    console.print(make_table(title, frame, columns))


def make_table(title: str, frame: Any, columns: list[str]) -> Table:
    """A rich table of ``frame``'s ``columns`` (floats with 3 significant digits)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in frame.to_dict("records"):
        table.add_row(*[_cell(row.get(column, "")) for column in columns])
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def absolute(path: Path | None) -> Path | None:
    return None if path is None else path.resolve()


