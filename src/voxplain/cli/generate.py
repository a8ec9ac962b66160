"""``voxplain generate atrophy|lesions|ms``: synthetic cohorts with ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from pydantic import BaseModel

from voxplain.cli.common import config_command, progress_bar, reported_errors
from voxplain.config import AtrophyCohortConfig, LesionCohortConfig, MSCohortConfig

generate = typer.Typer(help="Write synthetic cohorts with ground truth.", no_args_is_help=True)


def _generate(generator: Callable[..., Path], settings: BaseModel, description: str) -> None:
    """Run a cohort generator with a progress bar; print the cohort.tsv it wrote."""
    with reported_errors(), progress_bar() as bar:
        task = bar.add_task(description)
        path = generator(
            settings, progress=lambda done, total: bar.update(task, completed=done, total=total))
    typer.echo(path)


@generate.command("atrophy")
@config_command(AtrophyCohortConfig, "generate_atrophy",
                ["out", "subjects", "sessions", "downsample", "voxel_size", "regions", "noise",
                 "heterogeneity", "severity", "progression", "ageing", "qc_failures", "sites",
                 "site_effects", "seed"],
                absolute_paths=False)
def generate_atrophy(settings: AtrophyCohortConfig) -> None:
    """Synthetic 3D GM maps: AD patients lose grey matter in chosen AAL2 regions."""
    from voxplain.data.synthetic import generate_atrophy_cohort

    _generate(generate_atrophy_cohort, settings, "generating sessions")


@generate.command("lesions")
@config_command(LesionCohortConfig, "generate_lesions",
                ["out", "subjects", "size", "background", "file_format", "background_variation",
                 "seed"],
                flags={"file_format": "--format"}, absolute_paths=False)
def generate_lesions(settings: LesionCohortConfig) -> None:
    """Synthetic 2D lesion patches: benign (round) vs malignant (spiculated), with masks."""
    from voxplain.data.lesions import generate_lesion_cohort

    _generate(generate_lesion_cohort, settings, "generating patches")


@generate.command("ms")
@config_command(MSCohortConfig, "generate_ms",
                ["out", "subjects", "sessions", "downsample", "voxel_size", "rrms_lesions",
                 "spms_lesions", "rrms_lesion_radius_mm", "spms_lesion_radius_mm",
                 "rrms_locations", "spms_locations", "rrms_atrophy", "spms_atrophy",
                 "atrophy_locations", "new_lesions", "difficulty", "lesion_contrast", "noise",
                 "bias_field", "deformation_mm", "seed"],
                absolute_paths=False)
def generate_ms(settings: MSCohortConfig) -> None:
    """Synthetic 3D T1, T2 and FLAIR volumes of controls, RRMS and SPMS patients (paper 2):
    white-matter lesions and atrophy, with lesion masks."""
    from voxplain.data.ms import generate_ms_cohort

    _generate(generate_ms_cohort, settings, "generating sessions")
