"""What every verb of the command line shares: flags documented by the config models, config
files, one-line errors, progress bars and tables.

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


CONFIG_OPTION = typer.Option(None, "--config", help="TOML file of settings; flags override it.")


def split_list(text: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]`` (None stays None)."""
    return None if text is None else [cast(item.strip()) for item in text.split(",") if item.strip()]


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


