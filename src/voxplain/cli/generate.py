"""``voxplain generate atrophy|lesions``: synthetic cohorts with ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from pydantic import BaseModel

from voxplain.cli.common import (
    CONFIG_OPTION,
    build_config,
    option,
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import AtrophyCohortConfig, LesionCohortConfig

generate = typer.Typer(help="Write synthetic cohorts with ground truth.", no_args_is_help=True)


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
    heterogeneity: float = option(AtrophyCohortConfig, "heterogeneity", "--heterogeneity"),
    severity: str = option(AtrophyCohortConfig, "severity", "--severity"),
    progression: float = option(AtrophyCohortConfig, "progression", "--progression"),
    ageing: float = option(AtrophyCohortConfig, "ageing", "--ageing"),
    qc_failures: int = option(AtrophyCohortConfig, "qc_failures", "--qc-failures"),
    seed: int = option(AtrophyCohortConfig, "seed", "--seed"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Synthetic 3D GM maps: AD patients lose grey matter in chosen AAL2 regions."""
    from voxplain.data.synthetic import generate_atrophy_cohort

    setup_logging()
    settings = build_config(AtrophyCohortConfig, "generate_atrophy", config, out=out,
                            subjects=subjects, sessions=sessions, downsample=downsample,
                            voxel_size=voxel_size, regions=split_list(regions), noise=noise,
                            heterogeneity=heterogeneity, severity=split_list(severity, float),
                            progression=progression, ageing=ageing, qc_failures=qc_failures,
                            seed=seed)
    _generate(generate_atrophy_cohort, settings, "generating sessions")


@generate.command("lesions")
def generate_lesions(
    out: Path = option(LesionCohortConfig, "out", "--out"),
    subjects: int = option(LesionCohortConfig, "subjects", "--subjects"),
    size: int = option(LesionCohortConfig, "size", "--size"),
    background: str = option(LesionCohortConfig, "background", "--background"),
    file_format: str = option(LesionCohortConfig, "file_format", "--format"),
    background_variation: float = option(LesionCohortConfig, "background_variation",
                                         "--background-variation"),
    seed: int = option(LesionCohortConfig, "seed", "--seed"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Synthetic 2D lesion patches: benign (round) vs malignant (spiculated), with masks."""
    from voxplain.data.lesions import generate_lesion_cohort

    setup_logging()
    settings = build_config(LesionCohortConfig, "generate_lesions", config, out=out,
                            subjects=subjects, size=size, background=background,
                            file_format=file_format, background_variation=background_variation,
                            seed=seed)
    _generate(generate_lesion_cohort, settings, "generating patches")
