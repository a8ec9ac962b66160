"""``voxplain import clinicadl|monai|program|python``: a run folder around models voxplain did
not train, which every later verb (explain, mask, evaluate, report) takes."""

from __future__ import annotations

import json
from typing import Any

import typer
from pydantic import ValidationError

from voxplain.cli.common import config_command, print_table, progress_bar, reported_errors
from voxplain.config import (ClinicaDLImportConfig, ModelConfig, MonaiImportConfig,
                             ProgramImportConfig, PythonImportConfig)

imports = typer.Typer(help="Import trained models into a run folder.", no_args_is_help=True)

_SUMMARY = ["fold", "run", "subset", "best_epoch", "balanced_accuracy", "auc", "loss",
            "at_chance"]


@imports.command("clinicadl")
@config_command(ClinicaDLImportConfig, "import_clinicadl",
                ["maps", "cohort", "run", "selection_metric", "folds", "diagnosis_column",
                 "normalisation", "input_size", "batch_size", "device"],
                flags={"run": ("--run", "--out")})
def clinicadl(settings: ClinicaDLImportConfig) -> None:
    """The image-level CNNs (Conv5_FC3, Conv4_FC3) of a ClinicaDL MAPS folder, one per split,
    with the MAPS's splits; --cohort must hold every session of the splits, preprocessed as
    the models' training images."""
    from voxplain.steps.imports import run_import_clinicadl

    with reported_errors(), progress_bar() as bar:
        summary = run_import_clinicadl(settings, progress=bar)
    print_table("Imported models (validation)", summary, _SUMMARY)
    typer.echo(settings.run)


@imports.command("monai")
@config_command(MonaiImportConfig, "import_monai",
                ["network", "weights", "cohort", "run", "splits", "split_seed", "classes",
                 "diagnosis_column", "normalisation", "input_size", "batch_size", "device"],
                flags={"run": ("--run", "--out")})
def monai(settings: MonaiImportConfig,
          args: str = typer.Option(None, "--args", help="The network's constructor arguments "
                                   "as a JSON object, e.g. '{\"spatial_dims\": 3, "
                                   "\"in_channels\": 1, \"out_channels\": 2}'.")) -> None:
    """A network of monai.networks.nets by name (--network, --args), one weights file per fold
    (--weights fold-0.safetensors,fold-1.safetensors), the folds from --splits DIR
    (split-K/{train,validation}.tsv) or voxplain's subject-level k-fold."""
    from voxplain.steps.imports import run_import_monai

    with reported_errors():
        if args is not None:
            settings.arguments = parse_arguments(args)
    with reported_errors(), progress_bar() as bar:
        summary = run_import_monai(settings, progress=bar)
    print_table("Imported models (validation)", summary, _SUMMARY)
    typer.echo(settings.run)


@imports.command("program")
@config_command(ProgramImportConfig, "import_program",
                ["programs", "cohort", "run", "splits", "split_seed", "classes",
                 "diagnosis_column", "normalisation", "input_size", "batch_size", "device"],
                flags={"run": ("--run", "--out"), "programs": ("--program", "--programs")})
def program(settings: ProgramImportConfig) -> None:
    """One torch.export program per fold (--program fold-0.pt2,fold-1.pt2, saved with
    torch.export.save), loaded without unpickling: TorchScript and archives holding pickled
    objects or compiled code are refused. The folds from --splits DIR
    (split-K/{train,validation}.tsv) or voxplain's subject-level k-fold. LRP, Deep Taylor,
    CAM and DeepLift-SHAP need the network's modules and refuse a program."""
    from voxplain.steps.imports import run_import_program

    with reported_errors(), progress_bar() as bar:
        summary = run_import_program(settings, progress=bar)
    print_table("Imported models (validation)", summary, _SUMMARY)
    typer.echo(settings.run)


@imports.command("python")
@config_command(PythonImportConfig, "import_python",
                ["factory", "weights", "cohort", "run", "splits", "split_seed", "classes",
                 "diagnosis_column", "normalisation", "input_size", "batch_size", "device"],
                flags={"run": ("--run", "--out")})
def python(settings: PythonImportConfig,
           args: str = typer.Option(None, "--args", help="The factory's keyword arguments as "
                                    "a JSON object.")) -> None:
    """A network of your own code: --factory package.module:function (its module must be on
    PYTHONPATH; importing it runs that code, here and in every later step: only for code you
    trust), --args JSON, one weights file per fold (--weights), the folds from --splits DIR or
    voxplain's subject-level k-fold."""
    from voxplain.steps.imports import run_import_python

    with reported_errors():
        if args is not None:
            settings.arguments = parse_arguments(args)
    with reported_errors(), progress_bar() as bar:
        summary = run_import_python(settings, progress=bar)
    print_table("Imported models (validation)", summary, _SUMMARY)
    typer.echo(settings.run)


def parse_arguments(text: str) -> dict[str, Any]:
    """``--args``: a JSON object whose values config.toml can record (no null)."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--args: not JSON ({error})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"--args: expected a JSON object {{...}}, got {text}")
    try:
        return ModelConfig(name="monai", network="-", arguments=arguments).arguments or {}
    except ValidationError as error:
        raise ValueError(f"--args: {error.errors()[0]['msg']}") from None
