"""The one source of truth for defaults.

Every step of voxplain is configured by one pydantic model below. The Python API takes these
models, the CLI builds its flags from their fields (help text and defaults included), and a TOML
file (``--config run.toml``) is validated against the same models. A run folder keeps the
resolved model in ``config.toml`` so the run can be redone.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

#: AAL2 regions that lose grey matter in the synthetic patients by default (early Alzheimer's
#: disease targets: medial temporal lobe, both hemispheres).
DEFAULT_ATROPHY_REGIONS: tuple[str, ...] = (
    "Hippocampus_L",
    "Hippocampus_R",
    "ParaHippocampal_L",
    "ParaHippocampal_R",
    "Amygdala_L",
    "Amygdala_R",
)


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AtrophyCohortConfig(Section):
    """Synthetic 3D cohort: GM maps from the MNI152 template, AD patients lose GM in regions."""

    out: Path = Field(description="Folder to write cohort.tsv, the volumes and the ground truth.")
    subjects: int = Field(120, ge=4, description="Number of subjects (half CN, half AD).")
    sessions: int = Field(2, ge=1, description="Sessions per subject (atrophy progresses).")
    downsample: int = Field(
        1, ge=1, description="Integer factor applied to the 121x145x121 1.5 mm SPM grid."
    )
    voxel_size: float | None = Field(
        None, gt=0, description="Isotropic voxel size in mm (overrides --downsample)."
    )
    regions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ATROPHY_REGIONS),
        description="AAL2 region names where AD patients lose grey matter.",
    )
    severity: tuple[float, float] = Field(
        (0.3, 0.6), description="Range of the baseline fraction of GM lost at the atrophy peak."
    )
    progression: float = Field(
        0.05, ge=0, description="Extra fraction of GM lost per follow-up session."
    )
    noise: float = Field(0.03, ge=0, description="Standard deviation of the voxel noise.")
    deformation_mm: float = Field(
        2.0, ge=0, description="Amplitude (mm) of the smooth per-subject deformation."
    )
    qc_failures: int = Field(
        0, ge=0, description="Extra sessions with a low maximum, to exercise the quality check."
    )
    seed: int = Field(0, ge=0, description="Seed of every random draw of the generator.")


    @field_validator("severity")
    @classmethod
    def _severity_is_a_fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low <= high < 1:
            raise ValueError(f"severity must be a range 0 <= low <= high < 1, got {value}")
        return value


class LesionCohortConfig(Section):
    """Synthetic 2D lesion patches: benign (round, smooth) vs malignant (irregular, spiculated)."""

    out: Path = Field(description="Folder to write cohort.tsv, the patches and the masks.")
    subjects: int = Field(200, ge=4, description="Number of patches (half benign, half malignant).")
    size: int = Field(64, ge=16, description="Patch side in pixels.")
    background: Literal["synthetic", "ct"] = Field(
        "synthetic", description="Synthetic tissue texture, or real CT slices from pydicom-data."
    )
    file_format: Literal["npy", "png"] = Field("npy", description="Image file format.")
    noise: float = Field(0.05, ge=0, description="Standard deviation of the pixel noise.")
    seed: int = Field(0, ge=0, description="Seed of every random draw of the generator.")


ModelName = Literal["cnn", "convnet", "vgg_gap"]


class ModelConfig(Section):
    """Network architecture. ``None`` fields take the network's own published default."""

    name: ModelName = Field("cnn", description="Network: cnn (paper 1), convnet (paper 3), vgg_gap.")
    channels: list[int] | None = Field(
        None, description="Output channels of each convolutional block."
    )
    convs_per_block: list[int] | None = Field(
        None, description="Convolutions in each block (paper 1 uses 1 to 3)."
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout rate before the classifier.")
    in_channels: int = Field(1, ge=1, description="Image channels (set from the cohort).")
    n_classes: int = Field(2, ge=2, description="Number of classes (set from the cohort).")
    input_shape: list[int] | None = Field(
        None, description="Spatial shape of the inputs (set from the cohort)."
    )


class TrainConfig(Section):
    """Subject-level cross-validated training (paper 1, section 2.2)."""

    cohort: Path = Field(description="cohort.tsv (participant_id, session_id, diagnosis, path).")
    out: Path = Field(description="Run folder.")
    caps: Path | None = Field(
        None, description="Clinica CAPS folder: volumes are found there instead of a path column."
    )
    caps_group: str | None = Field(None, description="CAPS DARTEL group label (group-<label>).")
    test: Path | None = Field(None, description="Optional held-out test cohort TSV.")
    diagnosis_column: str = Field("diagnosis", description="Column of the TSV holding the label.")
    classes: list[str] | None = Field(
        None,
        description="Diagnoses in class-index order. Default: sorted, with CN first if present.",
    )
    folds: int = Field(5, ge=2, description="Number of cross-validation folds.")
    split_seed: int = Field(2, description="Seed of the subject-level stratified split.")
    runs: int = Field(1, ge=1, description="Training runs per fold, each with its own seed.")
    seed: int = Field(0, description="Seed of run 0 (run r uses seed + r).")
    epochs: int = Field(30, ge=1, description="Maximum number of epochs.")
    patience: int = Field(5, ge=1, description="Early stopping patience on the validation loss.")
    batch_size: int = Field(8, ge=1, description="Images per optimisation step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay.")
    downsample: int = Field(1, ge=1, description="Average-pool the images by this factor.")
    qc_threshold: float | None = Field(
        0.95, description="Reject GM maps (3D volumes) whose maximum is below this (paper 1, "
        "2.3.1); 2D images are not checked; 'none' turns the check off."
    )
    cache: Literal["memory", "disk"] = Field(
        "memory", description="Keep decoded images in memory or in a memory-mapped file."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    model: ModelConfig = Field(default_factory=ModelConfig)

    @field_validator("qc_threshold", mode="before")
    @classmethod
    def _none_turns_the_check_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value

    @field_serializer("qc_threshold")
    def _write_off_as_none(self, value: float | None) -> float | str:
        # TOML has no null: "none" keeps "off" distinct from "default" in config.toml
        return "none" if value is None else value

    @field_validator("classes")
    @classmethod
    def _at_least_two_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < 2:
            raise ValueError(f"classes must name at least two distinct diagnoses, got {value}")
        return value


class MaskConfig(Section):
    """Meaningful-perturbation mask (paper 1, 2.3, eq. 1-2), shared by session and group level.

    The regularisers are means over voxels (see :mod:`voxplain.explain.perturbation` for why),
    so the defaults do not depend on the number of voxels.
    """

    l1: float = Field(1e-4, ge=0, description="Weight of the sparsity term mean |1 - m|^b1.")
    l2: float = Field(1e-2, ge=0, description="Weight of the smoothness term mean ||grad m||^b2.")
    b1: float = Field(0.1, gt=0, description="Exponent of the sparsity term.")
    b2: float = Field(1.0, gt=0, description="Exponent of the gradient norm.")
    learning_rate: float = Field(0.1, gt=0, description="Adam learning rate.")
    threshold: float = Field(0.95, gt=0, le=1, description="Mask values above it are set to 1.")
    perturbation: Literal["constant", "blur", "mean"] = Field(
        "constant", description="mu of eq. 1: a constant, the blurred input, or a class mean image."
    )
    constant: float = Field(1.0, description="mu for the constant perturbation (1: restore GM).")
    blur_mm: float = Field(10.0, gt=0, description="Gaussian sigma (mm) of the blurred input.")
    mean_class: str | None = Field(
        None, description="Diagnosis whose mean training image is mu (default: class 0, e.g. CN)."
    )
    target: Literal["true"] | int = Field(
        "true", description="Class whose probability f is minimised: the true class or an index."
    )
    epsilon: float = Field(
        1e-3, gt=0, description="Smoothing of |x|^b at 0, where its derivative is infinite."
    )
    seed: int = Field(0, ge=0, description="Seed of the image order (group masks).")


class SessionMaskConfig(MaskConfig):
    """One mask per image (paper 1, 2.3.4): stronger regularisation, no validation set."""

    regularisation_factor: float = Field(100.0, gt=0, description="l1 and l2 are multiplied by it.")
    tolerance: float = Field(0.01, ge=0, description="Relative improvement that resets patience.")
    patience: int = Field(200, ge=1, description="Iterations without improvement before stopping.")
    max_iterations: int = Field(5000, ge=1, description="Maximum number of iterations.")
    batch_size: int = Field(16, ge=1, description="Session masks optimised together.")


class GroupMaskConfig(MaskConfig):
    """One mask for the correctly classified patients of a fold (paper 1, 2.3.3)."""

    tolerance: float = Field(0.05, ge=0, description="Relative improvement that resets patience.")
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping.")
    max_epochs: int = Field(150, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(1, ge=1, description="Images per mask update (paper: 1).")
    qc_z: float = Field(3.5, gt=0, description="Robust z-score above which an image is flagged.")


class MaskStepConfig(Section):
    """Which models and images of a run folder a mask step works on."""

    run: Path = Field(description="Run folder written by `voxplain train`.")
    folds: list[int] | None = Field(None, description="Folds to process (default: all).")
    diagnosis: str | None = Field(
        None, description="Diagnosis of the images to mask (default: class 1, e.g. AD)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to optimise.")
    mask: MaskConfig = Field(default_factory=MaskConfig)


class GroupMaskStepConfig(MaskStepConfig):
    """``voxplain mask group``: one mask per fold/run for its correctly classified patients."""

    mask: GroupMaskConfig = Field(default_factory=GroupMaskConfig)


class SessionMaskStepConfig(MaskStepConfig):
    """``voxplain mask session``: one mask per correctly classified validation-subject session."""

    max_sessions: int | None = Field(
        None, ge=1, description="At most this many sessions per fold/run (default: all)."
    )
    mask: SessionMaskConfig = Field(default_factory=SessionMaskConfig)


class MaskGridConfig(MaskStepConfig):
    """``voxplain mask grid``: group masks over a grid of eq. 2 hyperparameters (paper 1, 2.3.2)."""

    l1: list[float] = Field(default_factory=lambda: [1e-4], description="Values of l1.")
    l2: list[float] = Field(default_factory=lambda: [1e-2], description="Values of l2.")
    b1: list[float] = Field(default_factory=lambda: [0.1], description="Values of b1.")
    b2: list[float] = Field(default_factory=lambda: [1.0], description="Values of b2.")
    mask: GroupMaskConfig = Field(default_factory=GroupMaskConfig)


class PredictConfig(Section):
    """Per-session probabilities of every model of a run folder."""

    run: Path = Field(description="Run folder written by `voxplain train`.")
    cohort: Path = Field(description="cohort.tsv of the sessions to classify.")
    caps: Path | None = Field(None, description="Clinica CAPS folder of that cohort.")
    out: Path | None = Field(None, description="Output TSV (default RUN/predictions/NAME.tsv).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run the models.")
    batch_size: int = Field(16, ge=1, description="Images per forward pass.")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file, with an error that names the file."""
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None


def to_toml(sections: dict[str, BaseModel | dict[str, Any]]) -> str:
    """Serialise configurations to TOML, one table per step (``[train]``, ...).

    None values are left out (they mean "the default"), paths become strings. The result reads
    back with :func:`read_toml` and validates against the same models.
    """
    tables = {name: config_values(config) if isinstance(config, BaseModel) else config
              for name, config in sections.items()}
    return _toml_table(tables, prefix="")


def config_values(config: BaseModel) -> dict[str, Any]:
    """Plain JSON values of a configuration without the None ("use the default") entries."""
    return _without_none(config.model_dump(mode="json"))


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    return {key: _without_none(value) if isinstance(value, dict) else value
            for key, value in table.items() if value is not None}


def _toml_table(table: dict[str, Any], prefix: str) -> str:
    scalars = [f"{key} = {_toml_value(value)}" for key, value in table.items()
               if not isinstance(value, dict)]
    text = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            text += f"\n[{name}]\n" + _toml_table(value, prefix=f"{name}.")
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
