"""The one source of truth for defaults.

Every step of voxplain is configured by one pydantic model below, in pipeline order (generate,
train, predict, masks, CyCE, explain, evaluate, report, study). The Python API takes these
models, the CLI builds its flags from their fields (help text and defaults included), and a
pipeline file (``voxplain run``, one table per step) or ``--config FILE.toml`` is validated
against the same models. A run folder keeps every step's resolved model in ``config.toml``, so
``voxplain run RUN/config.toml`` redoes the run. Steps over a run folder share
:class:`RunStepConfig` (``run``, ``folds``, ``device``): one spelling per setting.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict,
                      Field, field_serializer, field_validator, model_validator)

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


#: Fewest voxels along every spatial axis of the default layer of a class activation map (see
#: :func:`voxplain.explain.layers.choose_cam_layer`).
DEFAULT_MIN_LAYER_SIZE = 4

#: One kind of data augmentation of training (see :mod:`voxplain.train.augment`).
Augmentation = Literal["none", "flip", "dihedral", "affine", "bias_field", "motion", "ghosting",
                       "spike"]


def _kinds_as_a_list(value: Any) -> Any:
    # one kind as text is how config.toml recorded the setting before it became a list ("flip"
    # must still read, and resume, as ["flip"]); commas separate kinds as on the command line
    return [kind.strip() for kind in value.split(",")] if isinstance(value, str) else value


#: Data augmentations applied one after the other; one kind, or kinds separated by commas,
#: read as the list.
Augmentations = Annotated[list[Augmentation], BeforeValidator(_kinds_as_a_list),
                          Field(min_length=1)]


# --- shared ----------------------------------------------------------------------------------

class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Device = Literal["auto", "cpu", "cuda"]


def _digits_are_a_class_index(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


#: The class a step explains, one grammar for masks, explanations and CyCE (resolved by
#: :func:`voxplain.data.classes.resolve_target`): the image's true diagnosis, the model's
#: prediction, a class name, or a class index ("1" on the command line is the index 1).
Target = Annotated[Literal["true", "predicted"] | int | str,
                   BeforeValidator(_digits_are_a_class_index)]


class ExecutorConfig(Section):
    """Where the independent units of a step (training's folds x runs, a search's trials, the
    mask steps' fold/runs and grid settings, explanations and CyCE per fold/run) run: one after
    the other in this process (``local``), or as tasks of a Ray cluster (``ray``) that share
    the run folder (:mod:`voxplain.run.executor`). Where a unit runs never changes its
    results."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: one unit after the other in this process; ray: units as "
        "Ray tasks (voxplain's 'ray' extra), the run folder on a shared file system.")
    address: str | None = Field(
        None, description="Ray cluster to join: 'auto' (the one `ray start` runs on this "
        "machine) or HOST:PORT; default: start one on this machine.")
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs (torch threads) of each unit; default: the CPUs available "
        "to this process (local), 1 (ray).")
    gpus_per_task: float = Field(
        0, ge=0, description="GPUs Ray reserves for each unit (0.5: two units share a GPU).")
    max_retries: int = Field(
        3, ge=0, description="Ray: times a unit whose worker died (killed, out of memory) is run "
        "again; it resumes from what it wrote.")
    sessions_per_unit: int | None = Field(
        None, ge=1, description="Steps that work session by session (explanations, session "
        "masks): split each fold/run's sessions into units of this many, so that one model's "
        "sessions spread over the workers; default: one unit per fold/run.")


def _kind_as_an_executor(value: Any) -> Any:
    # ``executor = "ray"`` in a TOML file is short for ``[executor] kind = "ray"``
    return {"kind": value} if isinstance(value, str) else value


#: The executor section of a step, also given as its kind alone.
Executor = Annotated[ExecutorConfig, BeforeValidator(_kind_as_an_executor)]


class RunStepConfig(Section):
    """What every step over a trained run folder shares, spelled once: the run folder, the
    folds whose models it uses, and the device."""

    run: Path = Field(description="Run folder written by `voxplain train`.")
    folds: list[int] | None = Field(None, description="Folds to process (default: all).")
    device: Device = Field("auto", description="Where to run the models.")


# --- generate: synthetic cohorts ----------------------------------------------------------

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
    heterogeneity: float = Field(
        0.0, ge=0, le=1, description="Spread of the atrophy between patients: each AD subject "
        "weighs each region by its own draw from U(1 - h, 1) (0: one pattern for all)."
    )
    ageing: float = Field(
        0.0, ge=0, lt=0.3, description="Normal ageing, in CN and AD alike: fraction of GM lost "
        "per decade of age above 60 in the atrophy regions (half of it elsewhere), so that old "
        "controls overlap mildly atrophied patients (0: no ageing)."
    )
    noise: float = Field(0.03, ge=0, description="Standard deviation of the voxel noise.")
    deformation_mm: float = Field(
        2.0, ge=0, description="Amplitude (mm) of the smooth per-subject deformation."
    )
    qc_failures: int = Field(
        0, ge=0, description="Extra sessions with a low maximum, to exercise the quality check."
    )
    sites: int = Field(
        1, ge=1, description="Number of acquisition sites; the subjects of each diagnosis are "
        "spread evenly over them, so that the site says nothing about the class."
    )
    site_effects: float = Field(
        0.0, ge=0, le=1, description="Strength s of the differences between sites: each site "
        "has its own intensity gain (1 to 1 + 0.1 s), Gaussian blur (std up to s / 2 voxels) and "
        "smooth bias field (0: no differences; needs --sites > 1)."
    )
    seed: int = Field(0, ge=0, description="Seed of every random draw of the generator.")

    @field_validator("severity")
    @classmethod
    def _severity_is_a_fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low <= high < 1:
            raise ValueError(f"severity must be a range 0 <= low <= high < 1, got {value}")
        return value

    @model_validator(mode="after")
    def _site_effects_need_several_sites(self) -> "AtrophyCohortConfig":
        if self.site_effects > 0 and self.sites == 1:
            raise ValueError(f"site_effects = {self.site_effects} needs sites > 1: with one site "
                             "there is nothing for the site to differ from (set sites or leave "
                             "site_effects at 0)")
        return self


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
    background_variation: float = Field(
        1.0,
        ge=1,
        description="Each patch scales its synthetic texture (each scale) and its pixel noise SD "
        "by its own factors, log-uniform in [1/v, v], drawn independently of the class "
        "(1 = no variation).",
    )
    seed: int = Field(0, ge=0, description="Seed of every random draw of the generator.")


#: Where the synthetic MS patients' white-matter lesions lie by default (paper 2, 3.3 and 4: RRMS
#: Grad-CAM points at the occipital lobe; SPMS at frontal, temporal/parietal and occipital areas).
DEFAULT_RRMS_LOCATIONS: tuple[str, ...] = ("periventricular", "occipital")
DEFAULT_SPMS_LOCATIONS: tuple[str, ...] = ("periventricular", "frontal", "temporal", "parietal",
                                           "occipital")
#: Where the synthetic MS patients lose grey matter fastest by default (cortex and thalamus).
DEFAULT_MS_ATROPHY_LOCATIONS: tuple[str, ...] = ("frontal", "temporal", "parietal", "Thalamus_L",
                                                 "Thalamus_R")

_LOCATIONS_HELP = ("'periventricular' (white matter within 10 mm of the lateral ventricles), a "
                   "lobe (frontal, parietal, temporal, occipital, limbic, insula, subcortical, "
                   "cerebellum) or an AAL2 region name: the white matter nearest to it. Each "
                   "lesion picks one entry at random (an entry listed twice is picked twice as "
                   "often).")


def _ordered_range(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"a range is (low, high) with low <= high, got {value}")
    return value


def _fraction_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= value[0] <= value[1] < 1:
        raise ValueError(f"must be a range 0 <= low <= high < 1, got {value}")
    return value


class MSCohortConfig(Section):
    """Synthetic 3D multiple-sclerosis cohort (paper 2): CN, RRMS and SPMS subjects, co-registered
    T1-, T2- and FLAIR-like volumes with white-matter lesions and atrophy, and their truth."""

    out: Path = Field(description="Folder to write cohort.tsv, the volumes and the ground truth.")
    subjects: int = Field(60, ge=3, description="Number of subjects, a third each CN, RRMS, "
                          "SPMS (RRMS, then SPMS, get the remainder).")
    sessions: int = Field(1, ge=1, description="Sessions per subject, 12 months apart (MS "
                          "patients gain --new-lesions lesions at each follow-up).")
    downsample: int = Field(
        2, ge=1, description="Integer factor applied to the 121x145x121 1.5 mm SPM grid (2: "
        "61x73x61 voxels of 3 mm)."
    )
    voxel_size: float | None = Field(
        None, gt=0, description="Isotropic voxel size in mm (overrides --downsample)."
    )
    rrms_lesions: tuple[int, int] = Field(
        (2, 10), description="Range (inclusive) of the number of white-matter lesions of an RRMS "
        "patient at the first session."
    )
    spms_lesions: tuple[int, int] = Field(
        (6, 20), description="Range (inclusive) of the number of lesions of an SPMS patient."
    )
    rrms_lesion_radius_mm: tuple[float, float] = Field(
        (2.5, 5.0), description="Range of the mean semi-axis (mm) of an RRMS lesion (ellipsoid)."
    )
    spms_lesion_radius_mm: tuple[float, float] = Field(
        (3.0, 7.0), description="Range of the mean semi-axis (mm) of an SPMS lesion."
    )
    rrms_locations: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RRMS_LOCATIONS),
        description="Where RRMS lesions lie: " + _LOCATIONS_HELP,
    )
    spms_locations: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPMS_LOCATIONS),
        description="Where SPMS lesions lie (as --rrms-locations).",
    )
    rrms_atrophy: tuple[float, float] = Field(
        (0.0, 0.05), description="Range of an RRMS patient's atrophy: the fraction of grey "
        "matter lost at the peak of the atrophy pattern (30 % of it elsewhere), and of tissue "
        "lost at the ventricles' wall (ventricular enlargement)."
    )
    spms_atrophy: tuple[float, float] = Field(
        (0.05, 0.2), description="Range of an SPMS patient's atrophy (as --rrms-atrophy)."
    )
    atrophy_locations: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MS_ATROPHY_LOCATIONS),
        description="Lobes or AAL2 regions where MS patients lose grey matter fastest.",
    )
    new_lesions: float = Field(
        1.0, ge=0, description="Mean number (Poisson) of new lesions of an MS patient at each "
        "follow-up session."
    )
    difficulty: float = Field(
        0.0, ge=0, le=1, description="Overlap of the two MS classes: pulls the SPMS lesion count, "
        "lesion size and atrophy ranges towards the RRMS ones by this fraction (0: as set; 1: "
        "RRMS and SPMS differ only in where their lesions lie)."
    )
    lesion_contrast: float = Field(
        1.0, ge=0, le=1, description="Fraction of the full lesion contrast (bright on T2 and "
        "FLAIR, dark on T1; 0: lesions invisible, their masks unchanged)."
    )
    noise: float = Field(
        0.03, ge=0, description="Standard deviation of the Rician noise (white matter is 0.75 "
        "on T1, 0.35 on T2 and FLAIR)."
    )
    bias_field: float = Field(
        0.1, ge=0, lt=1, description="Peak relative amplitude of the smooth multiplicative bias "
        "field, drawn per sequence and session (0: none)."
    )
    deformation_mm: float = Field(
        2.0, ge=0, description="Amplitude (mm) of the smooth per-subject deformation."
    )
    seed: int = Field(0, ge=0, description="Seed of every random draw of the generator.")

    @field_validator("rrms_lesions", "spms_lesions")
    @classmethod
    def _counts_are_a_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0:
            raise ValueError(f"a lesion count cannot be negative, got {value}")
        return _ordered_range(value)

    @field_validator("rrms_lesion_radius_mm", "spms_lesion_radius_mm")
    @classmethod
    def _radii_are_a_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError(f"a lesion radius is positive, got {value}")
        return _ordered_range(value)

    @field_validator("rrms_atrophy", "spms_atrophy")
    @classmethod
    def _atrophy_is_a_fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _fraction_range(value)

    @field_validator("rrms_locations", "spms_locations", "atrophy_locations")
    @classmethod
    def _at_least_one_location(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one location")
        return value

# --- train, predict ------------------------------------------------------------------------

ModelName = Literal["cnn", "convnet", "vgg_gap", "vgg16", "vgg19", "resnet50",
                    "clinicadl_conv5_fc3", "clinicadl_conv4_fc3", "monai", "program", "python"]
#: Networks with a choice of head (paper 2, table 1), and the fields that set it.
HEADED_MODELS = ("vgg16", "vgg19", "resnet50")
HEAD_FIELDS = ("head", "pool_size", "hidden_units")
#: Fields of paper 1's CNN that its random search varies (2.2.2) and other networks do not take.
CNN_FIELDS = ("reduction", "fc_layers")


#: ``package.module:attribute.path`` of a model factory of model ``python``.
FACTORY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ModelConfig(Section):
    """Network architecture. ``None`` fields take the network's own published default."""

    name: ModelName = Field("cnn", description="Network: cnn (paper 1), convnet (paper 3), "
                            "vgg_gap, or paper 2's vgg16, vgg19, resnet50 (torchvision's "
                            "definitions and names; see --head); imported models (`voxplain "
                            "import`): clinicadl_conv5_fc3, clinicadl_conv4_fc3, monai, program "
                            "(a torch.export program stored beside the weights), python (a "
                            "factory of your own code, see factory).")
    network: str | None = Field(
        None, description="monai: the class (or factory) of monai.networks.nets, e.g. "
        "DenseNet121, resnet18, SEResNet50, EfficientNetBN."
    )
    factory: str | None = Field(
        None, description="python: 'package.module:function' (or a class) that returns the "
        "network, called with arguments. Importing it runs that module's code: name only code "
        "you trust."
    )
    arguments: dict[str, Any] | None = Field(
        None, description="monai, python: the network's constructor arguments (JSON values), "
        'e.g. {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}.'
    )
    channels: list[int] | None = Field(
        None, description="Output channels of each convolutional block (vgg16, vgg19: the 5 "
        "block widths; resnet50: the 4 stage widths, outputs 4x wider)."
    )
    convs_per_block: list[int] | None = Field(
        None, description="Convolutions in each block: one value for every block, or one "
        "per block (paper 1 uses 1 to 3)."
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout rate before the classifier.")
    reduction: Literal["maxpool", "stride"] | None = Field(
        None, description="cnn: how each block halves the image, by a max-pool of 2 (paper 1, "
        "fig. 1; the default) or by stride 2 in its last convolution (paper 1's random search)."
    )
    fc_layers: int | None = Field(
        None, ge=1, description="cnn: fully connected layers after the dropout (default 1, "
        "paper 1's fig. 1); hidden widths shrink geometrically from the flattened features to "
        "the classes."
    )
    head: Literal["gap", "fc"] | None = Field(
        None, description="vgg16, vgg19, resnet50: gap (global average pooling + one linear "
        "layer, what CAM needs) or fc (pooling to --pool-size + two hidden fully connected "
        "layers, VGG's classifier). Default: the original (vgg: fc, resnet50: gap)."
    )
    pool_size: int | None = Field(
        None, ge=1, description="fc head: voxels per axis of the average pooling before the "
        "fully connected layers (default: vgg 7 in 2D as published, 3 in 3D; resnet50 1)."
    )
    hidden_units: int | None = Field(
        None, ge=1, description="fc head: units of each hidden layer (default 4096, VGG's)."
    )
    batch_norm: bool | None = Field(
        None, description="vgg16, vgg19: batch-norm after every convolution (torchvision's "
        "vgg16_bn, vgg19_bn; trains from random weights where plain VGG stalls)."
    )
    weights: Path | None = Field(
        None, description="Initial weights matched by name and shape (e.g. torchvision's "
        "ImageNet weights): a .safetensors file or a plain state dict .pt/.pth (read with "
        "weights_only); read when training starts, not when a trained model is reloaded."
    )
    in_channels: int = Field(1, ge=1, description="Image channels (set from the cohort).")
    n_classes: int = Field(2, ge=2, description="Number of classes (set from the cohort).")
    input_shape: list[int] | None = Field(
        None, description="Spatial shape of the inputs (set from the cohort)."
    )

    @model_validator(mode="after")
    def _head_of_a_headed_model(self) -> "ModelConfig":
        given = [key for key in HEAD_FIELDS if getattr(self, key) is not None]
        if given and self.name not in HEADED_MODELS:
            raise ValueError(f"{', '.join(given)} apply to {', '.join(HEADED_MODELS)}, not to "
                             f"model {self.name!r}")
        given = [key for key in CNN_FIELDS if getattr(self, key) is not None]
        if given and self.name != "cnn":
            raise ValueError(f"{', '.join(given)} apply to model 'cnn' (paper 1), not to model "
                             f"{self.name!r}")
        if self.batch_norm is not None and self.name not in ("vgg16", "vgg19"):
            raise ValueError(f"batch_norm applies to vgg16 and vgg19 (the other networks have "
                             f"their own normalisation), not to model {self.name!r}")
        if (self.name == "monai") != (self.network is not None):
            raise ValueError("network names the MONAI class of model 'monai' (and only of it)")
        if (self.name == "python") != (self.factory is not None):
            raise ValueError("factory names the 'package.module:function' of model 'python' "
                             "(and only of it)")
        if self.factory is not None and not FACTORY_PATTERN.fullmatch(self.factory):
            raise ValueError(f"factory must read 'package.module:function', got "
                             f"{self.factory!r}")
        if self.arguments is not None and self.name not in ("monai", "python"):
            raise ValueError(f"arguments apply to models 'monai' and 'python', not to model "
                             f"{self.name!r}")
        return self

    @field_validator("arguments")
    @classmethod
    def _arguments_fit_toml(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # recorded in config.toml: TOML has no null and no table inside an array
        def check(item: Any, where: str) -> None:
            if item is None:
                raise ValueError(f"arguments {where}: null cannot be recorded; leave the "
                                 "argument out to take the network's default")
            if isinstance(item, dict):
                for key, inner in item.items():
                    check(inner, f"{where}.{key}" if where else key)
            elif isinstance(item, (list, tuple)):
                for inner in item:
                    if isinstance(inner, dict):
                        raise ValueError(f"arguments {where}: a mapping inside a list cannot "
                                         "be recorded in config.toml")
                    check(inner, where)
        if value is not None:
            check(value, "")
        return value


class TrainConfig(Section):
    """Subject-level cross-validated training (paper 1, section 2.2)."""

    #: Settings a resumed training may change (they do not change the results): the device,
    #: the executor, the image cache, and the run folder's own path (a moved or copied folder
    #: resumes). The number of folds is *not* among them: it defines the splits the models were
    #: trained on.
    resumable: ClassVar[frozenset[str]] = frozenset({"device", "cache", "executor", "run"})

    cohort: Path = Field(description="cohort.tsv (participant_id, session_id, diagnosis, path).")
    run: Path = Field(validation_alias=AliasChoices("run", "out"),
                      description="Run folder to create (or resume).")
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
    n_folds: int = Field(5, ge=1, validation_alias=AliasChoices("n_folds", "folds"),
                         description="Number of cross-validation folds, or of repeated random "
                         "splits (a count; every other step's --folds selects folds).")
    split_seed: int = Field(2, description="Seed of the subject-level stratified split.")
    runs: int = Field(1, ge=1, description="Training runs per fold, each with its own seed.")
    seed: int = Field(0, description="Seed of run 0 (run r uses seed + r).")
    epochs: int = Field(30, ge=1, description="Maximum number of epochs.")
    patience: int = Field(5, ge=1, description="Early stopping patience on the validation loss.")
    min_steps: int = Field(
        100, ge=0, description="Optimisation steps before early stopping may end a fold: the "
        "patience counts only epochs that end after them (a model still at chance is not "
        "stopped by its first noisy epochs)."
    )
    chance_alpha: float = Field(
        0.05, gt=0, lt=1, description="A fold whose validation balanced accuracy has a "
        "permutation p-value above this is flagged as at chance."
    )
    select_by: Literal["balanced_accuracy", "loss"] = Field(
        "balanced_accuracy", description="Epoch kept: highest validation balanced accuracy "
        "(ties: lower loss), or lowest validation loss (paper 2)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="Cross-entropy class weights of training: none, or balanced "
        "(N / (K n_c) of the fold's training sessions; paper 3's weighted categorical "
        "cross-entropy). The validation loss stays unweighted."
    )
    batch_size: int = Field(8, ge=1, description="Images per optimisation step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay.")
    augmentation: Augmentations = Field(
        ["none"], description="Random augmentations of the training images, applied in this "
        "order (kinds separated by commas): none; flip (each axis mirrored with probability "
        "1/2); dihedral (flips and permutations of equal-sized axes: rotations by 90 degrees, "
        "for lesion patches); affine (paper 2: rotation up to 30 degrees, shear 0.2 degrees, "
        "zoom and shift up to 20 % and 10 %, left-right mirror with probability 1/2; in the "
        "plane of the first two axes); bias_field, motion, ghosting, spike (TorchIO's MRI "
        "artefacts, with its defaults)."
    )
    downsample: int = Field(1, ge=1, description="Average-pool the images by this factor.")
    sequences: list[str] | None = Field(
        None, description="Cohort TSV columns holding one co-registered image each (e.g. "
        "t1,t2,flair), stacked as the channels of every image in this order (paper 2); "
        "default: the path column."
    )
    slice_axis: Literal["none", "axial", "coronal", "sagittal"] = Field(
        "none", description="Train a 2D model on the slices of 3D volumes cut across this "
        "axis (paper 2: axial), found from the affine; none: use the images as they are."
    )
    slice_range: tuple[int, int] | None = Field(
        None, description="First and last slice kept (voxel indices on the training grid, "
        "inclusive). Default: the slices that hold brain (--slice-min-foreground)."
    )
    slice_min_foreground: float = Field(
        0.05, ge=0, lt=1, description="Without --slice-range, the top and bottom slices are "
        "dropped while less than this fraction of their voxels exceeds 10 % of the maximum of "
        "the cohort's mean image (paper 2: slices without brain)."
    )
    slice_size: tuple[int, int] | None = Field(
        None, description="Resize every slice to this in-plane size (e.g. 256,256; "
        "bilinear); maps are resized back to the volume's grid."
    )
    split: Literal["kfold", "random"] = Field(
        "kfold", description="kfold: subject-level stratified k-fold cross-validation (paper "
        "1); random: stratified subject-level train/validation/test splits of "
        "--split-fractions, drawn n_folds times with new seeds (paper 2)."
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.65, 0.15, 0.20), description="Train, validation and test fractions of the subjects "
        "of a random split (paper 2: 65/15/20)."
    )
    qc_threshold: float | None = Field(
        0.95, description="Reject GM maps (3D volumes) whose maximum is below this (paper 1, "
        "2.3.1); 2D images are not checked; 'none' turns the check off."
    )
    cache: Literal["memory", "disk"] = Field(
        "memory", description="Keep decoded images in memory or in a memory-mapped file."
    )
    device: Device = Field("auto", description="Where to train.")
    executor: Executor = Field(default_factory=ExecutorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @field_validator("qc_threshold", mode="before")
    @classmethod
    def _none_turns_the_check_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value

    @field_serializer("qc_threshold")
    def _write_off_as_none(self, value: float | None) -> float | str:
        # TOML has no null: "none" keeps "off" distinct from "default" in config.toml
        return "none" if value is None else value

    @field_validator("split_fractions")
    @classmethod
    def _fractions_of_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or value[0] <= 0 or value[1] <= 0 or abs(sum(value) - 1) > 1e-6:
            raise ValueError("split_fractions must be train, validation and test fractions "
                             f"(train and validation > 0, test >= 0) summing to 1, got {value}")
        return value

    @model_validator(mode="after")
    def _folds_of_the_split(self) -> "TrainConfig":
        if self.split == "kfold" and self.n_folds < 2:
            raise ValueError("k-fold cross-validation needs n_folds >= 2 (one random split: "
                             "--split random --folds 1)")
        if self.slice_range is not None and not 0 <= self.slice_range[0] <= self.slice_range[1]:
            raise ValueError(f"slice_range must be first <= last, both >= 0, got "
                             f"{self.slice_range}")
        return self

    @field_validator("classes")
    @classmethod
    def _at_least_two_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < 2:
            raise ValueError(f"classes must name at least two distinct diagnoses, got {value}")
        return value


# --- import: models voxplain did not train --------------------------------------------------

class ImportConfig(Section):
    """``voxplain import``: a run folder around trained models from elsewhere, which every step
    over a run folder then takes as it takes one of `voxplain train`. The models read the
    cohort's images on the cohort's grid (no resampling), through the input they declare:
    ``input_size`` and ``normalisation``; a network with one output (a sigmoid) is given the
    two logits ``(-z / 2, z / 2)``."""

    resumable: ClassVar[frozenset[str]] = frozenset({"device", "run", "batch_size"})

    cohort: Path = Field(description="cohort.tsv of the sessions (participant_id, session_id, "
                         "diagnosis, path), preprocessed as the models were trained; it must "
                         "hold every session of the splits.")
    run: Path = Field(validation_alias=AliasChoices("run", "out"),
                      description="Run folder to create.")
    diagnosis_column: str = Field("diagnosis", description="Column of the TSV holding the label.")
    normalisation: Literal["none", "zscore", "minmax"] = Field(
        "none", description="Intensity normalisation the network expects, per image and "
        "channel, applied inside the model (voxplain.models.declared_input): zscore, minmax "
        "or none.")
    input_size: list[int] | None = Field(
        None, description="The network's input size, voxels per spatial axis: each image is "
        "centred-cropped or zero-padded to it inside the model, and every map comes back on "
        "the cohort's grid (default: the cohort's grid).")
    batch_size: int = Field(8, ge=1, description="Images per forward pass (validation "
                            "predictions).")
    device: Device = Field("auto", description="Where to run the models.")


class ClinicaDLImportConfig(ImportConfig):
    """``voxplain import clinicadl``: the image-level CNNs of a ClinicaDL MAPS folder."""

    maps: Path = Field(description="ClinicaDL MAPS folder (maps.json, groups/train/split-K/, "
                       "split-K/best-METRIC/model.pth.tar).")
    selection_metric: Literal["loss", "balanced_accuracy"] = Field(
        "loss", description="Which of each split's best models: best-loss or "
        "best-balanced_accuracy.")
    folds: list[int] | None = Field(None, description="Splits to import (default: all).")


class FoldFilesImportConfig(ImportConfig):
    """An import of one model file per fold, with the folds from a folder of splits or made by
    voxplain."""

    splits: Path | None = Field(
        None, description="Folder of split-K/{train,validation}.tsv (or fold-K/...), one per "
        "model file; default: voxplain's subject-level k-fold split with as many folds as "
        "model files.")
    split_seed: int = Field(2, description="Seed of the split made when --splits is not given.")
    classes: list[str] | None = Field(
        None, description="Diagnoses in the order of the network's outputs. Default: sorted, "
        "with CN first if present.")


#: One weights file per fold (``import monai``, ``import python``).
WEIGHTS_FIELD_DESCRIPTION = ("One weights file per fold, in fold order: safetensors or a "
                             "weights-only checkpoint (a state dict, bare or under 'model' or "
                             "'state_dict').")


class MonaiImportConfig(FoldFilesImportConfig):
    """``voxplain import monai``: a MONAI network by name, one weights file per fold."""

    network: str = Field(description="Class (or factory) of monai.networks.nets, e.g. "
                         "DenseNet121, resnet18, SEResNet50, EfficientNetBN.")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="Constructor arguments as JSON, e.g. "
        '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2}.')
    weights: list[Path] = Field(min_length=1, description=WEIGHTS_FIELD_DESCRIPTION)


class ProgramImportConfig(FoldFilesImportConfig):
    """``voxplain import program``: one torch.export program (``.pt2``) per fold, loaded
    without unpickling (:mod:`voxplain.models.programs`)."""

    programs: list[Path] = Field(
        min_length=1, description="One torch.export program (.pt2, torch.export.save) per "
        "fold, in fold order. TorchScript files are refused (torch.jit.load unpickles).")


class PythonImportConfig(FoldFilesImportConfig):
    """``voxplain import python``: a network built by a factory of your own code
    (``package.module:function``), one weights file per fold. Importing the factory runs its
    module: only for code you trust."""

    factory: str = Field(description="'package.module:function' (or class) returning the "
                         "network; its module must be importable (on sys.path).")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="The factory's keyword arguments as JSON.")
    weights: list[Path] = Field(min_length=1, description=WEIGHTS_FIELD_DESCRIPTION)


def _low_high(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"a range is (low, high) with low <= high, got {value}")
    return value


def _positive_low_high(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] <= 0:
        raise ValueError(f"a range searched on a log scale needs low > 0, got {value}")
    return _low_high(value)


#: An inclusive range of integers ``[low, high]`` searched uniformly (equal bounds fix it).
IntRange = Annotated[tuple[int, int], AfterValidator(_low_high)]
#: A range of reals ``[low, high]`` searched on a log scale (learning rate, weight decay).
LogRange = Annotated[tuple[float, float], AfterValidator(_positive_low_high)]


class SearchSpaceConfig(Section):
    """Paper 1's random search space (2.2.2), one entry per dimension. The paper names the
    dimensions but not their ranges: the defaults below are ours. A range with equal bounds or
    a list of one choice fixes a dimension. Paper 1 also searched the data preprocessing and
    the intensity normalisation; voxplain has no choice of intensity normalisation, so they are
    not searched."""

    blocks: IntRange = Field((3, 7), description="Convolutional blocks (fig. 1: 7).")
    first_channels: list[int] = Field(
        [4, 8, 16, 32], min_length=1, description="Choices of the width of the first block; "
        "every next block doubles it, up to max_channels."
    )
    max_channels: int = Field(512, ge=1, description="Widest block.")
    convs_per_block: IntRange = Field(
        (1, 3), description="Convolutions of each block, drawn block by block (fig. 1: 1 to 3)."
    )
    reduction: list[Literal["maxpool", "stride"]] = Field(
        ["maxpool", "stride"], min_length=1, description="Choices of the reduction of a block: "
        "max-pool of 2, or stride 2 in its last convolution."
    )
    fc_layers: IntRange = Field((1, 3), description="Fully connected layers (fig. 1: 1).")
    dropout: tuple[float, float] = Field((0.0, 0.9), description="Dropout rate, uniform "
                                         "(fig. 1: 0.79).")
    learning_rate: LogRange = Field((1e-5, 1e-2), description="Adam learning rate, log scale.")
    weight_decay: LogRange = Field((1e-6, 1e-2), description="Adam weight decay, log scale.")
    batch_size: list[int] = Field([4, 8, 16, 32], min_length=1,
                                  description="Choices of the batch size.")

    @field_validator("blocks", "convs_per_block", "fc_layers")
    @classmethod
    def _at_least_one(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 1:
            raise ValueError(f"the range must start at 1 or more, got {value}")
        return value

    @field_validator("dropout")
    @classmethod
    def _a_rate(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1] < 1:
            raise ValueError(f"dropout rates are a range (low, high) with 0 <= low <= high < 1, "
                             f"got {value}")
        return value

    @field_validator("first_channels", "batch_size")
    @classmethod
    def _positive_choices(cls, value: list[int]) -> list[int]:
        if min(value) < 1:
            raise ValueError(f"choices must be 1 or more, got {value}")
        return value


class SearchConfig(TrainConfig):
    """Paper 1's random search (2.2.2): the training settings of ``voxplain train`` are the
    base of every trial; a trial draws the CNN and the optimisation settings of ``space``,
    which replace the base's ``batch_size``, ``learning_rate``, ``weight_decay`` and the CNN's
    ``channels``, ``convs_per_block``, ``reduction``, ``fc_layers`` and ``dropout``."""

    #: A resumed search may ask for more trials.
    resumable: ClassVar[frozenset[str]] = TrainConfig.resumable | {"n_trials"}

    n_trials: int = Field(20, ge=1, description="Finished trials wanted; a resumed search runs "
                          "only the missing ones.")
    sampler: Literal["random", "tpe"] = Field(
        "random", description="Optuna sampler: random (paper 1) or tpe.")
    sampler_seed: int = Field(0, description="Seed of the sampler (trial n draws with seed + n).")
    objective: Literal["balanced_accuracy", "loss"] = Field(
        "balanced_accuracy", description="Objective of a trial: validation balanced accuracy "
        "(maximised; paper 1) or validation loss (minimised), averaged over its models.")
    trial_folds: Literal["first", "all"] = Field(
        "first", description="Folds trained per trial: the first split only (paper 1) or all.")
    space: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)

    @model_validator(mode="after")
    def _space_of_the_cnn(self) -> "SearchConfig":
        if self.model.name != "cnn":
            raise ValueError(f"the search space describes paper 1's CNN (model 'cnn'), not "
                             f"model {self.model.name!r}")
        return self


class PredictConfig(Section):
    """Per-session probabilities of every model of a run folder."""

    run: Path = Field(description="Run folder written by `voxplain train`.")
    cohort: Path = Field(description="cohort.tsv of the sessions to classify.")
    caps: Path | None = Field(None, description="Clinica CAPS folder of that cohort.")
    out: Path | None = Field(None, description="Output TSV (default RUN/predictions/NAME.tsv).")
    device: Device = Field("auto", description="Where to run the models.")
    batch_size: int = Field(16, ge=1, description="Images per forward pass.")


class SplitTestConfig(Section):
    """``voxplain split test``: a held-out test set matched on age and sex (paper 1, 2.2.1)."""

    cohort: Path = Field(description="cohort.tsv to split (participant_id, session_id, "
                         "diagnosis and the matched columns).")
    out: Path = Field(description="Folder to write test.tsv (baseline sessions of the test "
                      "subjects), train.tsv (every session of the others) and balance.tsv.")
    n_per_class: int = Field(100, ge=1, description="Test subjects per diagnosis (paper 1: 100).")
    match: list[str] = Field(default_factory=lambda: ["age", "sex"], description="Columns the "
                             "test set is matched on (numeric: t-test or ANOVA; others: "
                             "chi-squared).")
    diagnosis_column: str = Field("diagnosis", description="Column of the TSV holding the label.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Every balance test must have p above "
                         "this.")
    max_draws: int = Field(10_000, ge=1, description="Random draws tried before giving up.")
    seed: int = Field(2, ge=0, description="Seed of the first draw (draw k: seed + k).")


# --- masks (paper 1) ----------------------------------------------------------------------

#: The smoothness term of eq. 2 (paper 1): ``sum_i |d_i m(u)|^b2`` as written (anisotropic), or
#: ``||grad m(u)||_2^b2`` (isotropic, voxplain's form before it followed the paper).
Smoothness = Literal["anisotropic", "isotropic"]


class MaskConfig(Section):
    """Meaningful-perturbation mask (paper 1, 2.3, eq. 1-2), shared by session and group level.

    The regularisers are means over voxels (see :mod:`voxplain.explain.perturbation` for why),
    so the defaults do not depend on the number of voxels.
    """

    #: Settings a run folder recorded before they existed, read with the value its masks were
    #: made with rather than today's default (see ``voxplain.run.folder``): a missing
    #: ``smoothness`` means isotropic, so a resumed step does not mix the two forms.
    absent_in_records: ClassVar[dict[str, Any]] = {"smoothness": "isotropic"}

    l1: float = Field(1e-4, ge=0, description="Weight of the sparsity term mean |1 - m|^b1.")
    l2: float = Field(1e-2, ge=0,
                      description="Weight of the smoothness term mean ||grad m||_b2^b2.")
    b1: float = Field(0.1, gt=0, description="Exponent of the sparsity term.")
    b2: float = Field(1.0, gt=0, description="Exponent of the gradient norm.")
    smoothness: Smoothness = Field(
        "anisotropic", description="Smoothness term: 'anisotropic' sum_i |d_i m|^b2 (paper 1, "
        "eq. 2 as written), or 'isotropic' ||grad m||_2^b2 (voxplain's earlier form; the "
        "same at b2 = 2)."
    )
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
    target: Target = Field(
        "true", description="Class whose probability f is minimised: the true class (the masked "
        "images are classified correctly, so 'predicted' is the same), a class name or an index."
    )
    epsilon: float = Field(
        1e-3, gt=0, description="Smoothing of |x|^b at 0, where its derivative is infinite."
    )
    seed: int = Field(0, ge=0, description="Seed of the image order (group masks).")


class SessionMaskConfig(MaskConfig):
    """One mask per image (paper 1, 2.3.4): stronger regularisation, no validation set."""

    regularisation_factor: float = Field(100.0, gt=0, description="l1 and l2 are multiplied by it.")
    tolerance: float = Field(0.01, ge=0, description="Relative distance above the lowest loss "
                             "that counts towards patience (paper 1, 2.3.5).")
    patience: int = Field(200, ge=1, description="Iterations in a row with the loss more than "
                          "the tolerance above its lowest before stopping.")
    max_iterations: int = Field(5000, ge=1, description="Maximum number of iterations.")
    batch_size: int = Field(16, ge=1, description="Session masks optimised together.")
    qc_z: float = Field(
        3.5, gt=0, description="Robust z-score of a mask's lowest loss, among the session masks "
        "of one model, above which the mask is flagged as not converged."
    )


class GroupMaskConfig(MaskConfig):
    """One mask for the correctly classified patients of a fold (paper 1, 2.3.3)."""

    #: A run folder recorded before ``qc_step2`` existed only flagged the images of quality
    #: check step 2; it resumes so (``voxplain.steps.masks``), never re-optimising its masks.
    absent_in_records: ClassVar[dict[str, Any]] = {**MaskConfig.absent_in_records,
                                                   "qc_step2": "flag", "dense_retry": False}

    tolerance: float = Field(0.05, ge=0, description="Relative distance above the lowest "
                             "validation loss that counts towards patience (paper 1, 2.3.5).")
    patience: int = Field(5, ge=1, description="Epochs in a row with the validation loss more "
                          "than the tolerance above its lowest before stopping.")
    max_epochs: int = Field(150, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(1, ge=1, description="Images per mask update (paper: 1).")
    qc_step2: Literal["remove", "flag"] = Field(
        "remove", description="Quality check step 2 (paper 1, 2.3.1): 'remove': the training "
        "images whose loss jumps are removed and the group mask is optimised again without them "
        "(the first mask is kept in first/); 'flag': they are only listed in qc_flags.tsv.")
    qc_z: float = Field(
        3.5, gt=0, description="Quality check step 2: robust z-score of an image's mean loss "
        "above which it is flagged (with qc_min_excess); a group mask whose masked fraction has "
        "a robust z-score above it among the run's group masks is flagged too (with "
        "outlier_fraction).")
    qc_min_excess: float = Field(
        0.1, ge=0, description="Quality check step 2: an image is flagged only if its loss "
        "also exceeds the median loss of its epoch by this much (median over the epochs after "
        "the first; loss units: about the masked class's probability).")
    dense_fraction: float = Field(
        0.25, gt=0, le=1, description="A group mask that hides more than this fraction of the "
        "image is flagged: it is no localised explanation (e.g. the dense plateau Adam can "
        "stop on).")
    outlier_fraction: float = Field(
        0.05, ge=0, le=1, description="A group mask is flagged when it masks at least this "
        "fraction of the image more than the median group mask of the run (and its robust "
        "z-score exceeds qc_z), or when it does not halve the validation probability of the "
        "masked class.")
    dense_retry: bool = Field(
        True, description="A group mask that hides more than dense_fraction of the image is "
        "optimised again from the start at a tenth of the learning rate (paper 1, fig. 4: lr "
        "0.01 where 0.1 did not converge); the dense mask is kept in dense/ and the retry "
        "named in summary.json (group masks; a grid keeps its own learning rates). Adam's "
        "first steps at lr 0.1 move every voxel by about 0.1, and a saturated model's mask can "
        "settle on hiding nearly everything.")


class MaskStepConfig(RunStepConfig):
    """Which models and images of a run folder a mask step works on, and where its fold/runs
    (and grid settings) run."""

    diagnosis: str | None = Field(
        None, description="Diagnosis of the images to mask (default: the patient class: the "
        "only class that is not a control label, else class 1)."
    )
    mask: MaskConfig = Field(default_factory=MaskConfig)
    executor: Executor = Field(default_factory=ExecutorConfig)


def external_cohort_field() -> Any:
    """``cohort`` of a mask step: masks of the run's models on another cohort (paper 1, 3.2.1)."""
    return Field(
        None, description="cohort.tsv of another cohort on the training grid (an external test "
        "cohort, e.g. AIBL for models trained on ADNI): its correctly classified sessions are "
        "masked instead of the run's own, written under masks/cohort-LABEL/ (paper 1, 3.2.1)."
    )


#: Group-mask settings that differ when the images come from an external cohort (paper 1,
#: 2.3.5: "for the group level masking on AIBL, the patience was increased to 25 and the
#: maximum number of epochs to 300 as the number of AD subjects is smaller").
EXTERNAL_GROUP_MASK: dict[str, Any] = {"patience": 25, "max_epochs": 300}


class GroupMaskStepConfig(MaskStepConfig):
    """``voxplain mask group``: one mask per fold/run for its correctly classified patients.

    With ``cohort``, each fold/run's mask is trained on every correctly classified session of
    the masked diagnosis in that cohort and stopped on the fold's own validation patients (the
    paper's AIBL masks); ``mask.patience`` and ``mask.max_epochs`` then default to 25 and 300
    (:data:`EXTERNAL_GROUP_MASK`) unless given."""

    cohort: Path | None = external_cohort_field()
    mask: GroupMaskConfig = Field(default_factory=GroupMaskConfig)

    @model_validator(mode="after")
    def _external_defaults(self) -> "GroupMaskStepConfig":
        if self.cohort is not None:
            unset = {key: value for key, value in EXTERNAL_GROUP_MASK.items()
                     if key not in self.mask.model_fields_set}
            if unset:
                self.mask = self.mask.model_copy(update=unset)
                self.mask.model_fields_set.update(unset)
        return self


class SessionMaskStepConfig(MaskStepConfig):
    """``voxplain mask session``: one mask per correctly classified validation-subject session."""

    max_sessions: int | None = Field(
        None, ge=1, description="At most this many sessions per fold/run (default: all)."
    )
    cohort: Path | None = external_cohort_field()
    mask: SessionMaskConfig = Field(default_factory=SessionMaskConfig)


class MaskGridConfig(MaskStepConfig):
    """``voxplain mask grid``: group masks over a grid of eq. 2 hyperparameters (paper 1, 2.3.2)."""

    l1: list[float] = Field(default_factory=lambda: [1e-4], description="Values of l1.")
    l2: list[float] = Field(default_factory=lambda: [1e-2], description="Values of l2.")
    b1: list[float] = Field(default_factory=lambda: [0.1], description="Values of b1.")
    b2: list[float] = Field(default_factory=lambda: [1.0], description="Values of b2.")
    learning_rate: list[float] | None = Field(
        None, description="Values of the Adam learning rate (default: mask.learning_rate "
        "only; paper 1, fig. 4 uses 0.01 where 0.1 did not converge).")
    design: Literal["full", "one-at-a-time"] = Field(
        "full", description="'full': every combination of the values; 'one-at-a-time': each "
        "hyperparameter over its values with the others at the [mask] settings (paper 1, "
        "tables 2-3)."
    )
    mask: GroupMaskConfig = Field(default_factory=GroupMaskConfig)

    @field_validator("learning_rate")
    @classmethod
    def _positive_learning_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or min(value) <= 0):
            raise ValueError(f"learning_rate needs positive values, got {value}")
        return value


# --- CyCE (paper 3) -----------------------------------------------------------------------

class CyCEConfig(Section):
    """CyCE: cycle-consistent activation maximisation (paper 3, 2-3.2); defaults sized for a CPU."""

    widths: list[int] = Field(
        default_factory=lambda: [16, 32, 64, 128],
        description="Kernels of U-Net stages 0-3 of generators and discriminators "
                    "(paper: 48,96,192,384).")
    convs_per_stage: int = Field(3, ge=1, description="Convolutions per U-Net stage (paper: 3).")
    symmetric_discriminator: bool = Field(
        True, description="Tie the two output neurons so swapping a pair swaps the logits.")
    discriminator_normalisation: Literal["group", "none"] = Field(
        "group", description="Discriminator encoder normalisation (paper: not stated): 'group' "
                             "as in the generator, or 'none' (sees global brightness/contrast).")
    cycle_weight: float = Field(1.0, ge=0, description="Weight of the cycle-consistency loss.")
    similarity_weight: float = Field(1.0, ge=0, description="Weight of the similarity loss.")
    similarity_l1_weight: float = Field(
        0.0, ge=0, description="Weight of mean |x - G(x)| added to the similarity loss's DSSIM "
                               "(paper: DSSIM only, 0).")
    adversarial_weight: float = Field(1.0, ge=0, description="Weight of the adversarial loss.")
    activation_weight: float = Field(
        1.0, ge=0, description="Weight of the activation-maximisation loss.")
    ssim_kernel: int | None = Field(
        None, ge=1, description="SSIM window (odd); default: chosen from the image size.")
    ssim_scales: int | None = Field(
        None, ge=1, le=5, description="MS-SSIM scales; default: as many as the image size allows.")
    ssim_k1: float = Field(0.01, gt=0, description="SSIM constant k1 (c1 = (k1 L)^2; paper .01).")
    ssim_k2: float = Field(0.03, gt=0, description="SSIM constant k2 (c2 = (k2 L)^2; paper .03).")
    data_range: float = Field(1.0, gt=0, description="Intensity range L of the images.")
    positive_class: Annotated[int | str, BeforeValidator(_digits_are_a_class_index)] = Field(
        1, description="Class G+ maximises, by index or name (G- maximises the other one); "
        "resolved against the classifier's classes like every explained class.")
    batch_size: int = Field(8, ge=1, description="Image pairs (x_a, x_b) per step.")
    learning_rate: float = Field(2e-4, gt=0, description="Adam learning rate of all networks.")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (CycleGAN's 0.5).")
    max_steps: int = Field(1500, ge=1, description="Maximum number of training steps.")
    max_seconds: float | None = Field(
        None, gt=0, description="Time budget: stop after this many seconds of training.")
    min_steps: int = Field(300, ge=0, description="Steps before convergence may stop training.")
    window: int = Field(50, ge=1, description="Steps in the moving average of the generator loss.")
    tolerance: float = Field(
        0.01, ge=0, description="Relative fall of the moving average that resets patience.")
    patience: int = Field(
        300, ge=1, description="Steps without such a fall before training stops (converged).")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, pairs and shuffles.")


class CyCEStepConfig(RunStepConfig):
    """``voxplain cyce train``: CyCE generators for the classifiers of a run folder."""

    cyce: CyCEConfig = Field(default_factory=CyCEConfig)
    executor: Executor = Field(default_factory=ExecutorConfig)


class CyCETransferConfig(RunStepConfig):
    """``voxplain cyce transfer``: classifier output on x, G-(x), G+(x) (paper 3, 3.3 and 4.1)."""

    subset: Literal["validation", "train"] = Field(
        "validation", description="Sessions evaluated (validation: unseen by classifier and CyCE).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the confidence intervals.")
    batch_size: int = Field(32, ge=1, description="Images per forward pass.")


# --- explain -----------------------------------------------------------------------------

class ExplainConfig(Section):
    """One per-sample explanation method and how it is applied (``voxplain explain``)."""

    method: str = Field(description="Explanation method, e.g. grad_cam, integrated_gradients.")
    layer: str | None = Field(
        None, description="Layer a class activation map reads (grad_cam, grad_cam_pp, hires_cam, "
        "layer_cam): any module of the model that outputs a feature map; default: the deepest "
        "activated feature map keeping --min-layer-size voxels along every axis."
    )
    min_layer_size: int = Field(
        DEFAULT_MIN_LAYER_SIZE, ge=1, description="Fewest voxels along every axis of the default "
        "layer of a class activation map (a coarser layer is recorded and flagged)."
    )
    target: Target = Field(
        "true", description="Class explained: the true diagnosis, the predicted class, or a class "
        "(index or name)."
    )
    batch_size: int = Field(8, ge=1, description="Images explained together.")
    options: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="Extra options of the method (e.g. n_steps=32)."
    )
    baseline_class: str | None = Field(
        None, description="Class whose mean training image is the baseline of the methods that "
        "take one: integrated_gradients, occlusion, region_ablation and region_shapley start "
        "from it instead of 0; the class activation maps (grad_cam, grad_cam_pp, hires_cam, "
        "layer_cam) weight A(x) - A(mean) instead of A(x). The mean is over the fold's training "
        "sessions of that class, so a map shows how a session departs from that class's average "
        "(e.g. CN) instead of from an empty image. Default: none."
    )
    group: Literal["correct", "all"] = Field(
        "correct", description="Sessions averaged into a diagnosis's group map: the correctly "
        "classified ones, or all."
    )


class ExplainStepConfig(RunStepConfig):
    """``voxplain explain``: maps of every model of a run folder for its validation sessions.

    Only explanation settings: scoring the maps is ``voxplain evaluate localisation``
    (:class:`LocalisationStepConfig`), recorded in its own section."""

    cohort: Path | None = Field(
        None, description="cohort.tsv of other sessions to explain (default: each fold's "
        "validation sessions)."
    )
    subset: Literal["validation", "test"] = Field(
        "validation", description="Sessions of each fold explained: its validation subjects, "
        "or the test subjects of a random split (--split random, paper 2)."
    )
    explain: ExplainConfig
    executor: Executor = Field(default_factory=ExecutorConfig)


# --- evaluate: localisation, classification, robustness, statistics (paper 2) ----------------

class LocalisationConfig(Section):
    """Scores of group maps against a ground-truth map (synthetic cohorts)."""

    truth_fraction: float = Field(
        0.5, ge=0, le=1, description="The true region: voxels where the ground truth reaches "
        "at least this fraction of its maximum (0.5: half maximum; 0: every voxel it touches)."
    )
    tolerance: float = Field(
        0.0, ge=0, description="Pointing game: distance (voxels) allowed between the map's "
        "maximum and the true region."
    )
    top_k: int = Field(5, ge=1, description="Number of most attributed AAL2 regions checked.")


class LocalisationStepConfig(LocalisationConfig):
    """``voxplain evaluate localisation``: the run's explanations scored against a known truth."""

    run: Path = Field(description="Run folder with explanations (`voxplain explain`).")
    against: Path | None = Field(
        None, description="Ground-truth map (e.g. ground_truth.nii.gz): score the group maps "
        "of the patient class against it."
    )
    session_truth: str | None = Field(
        None, description="Cohort column naming each session's own ground truth (e.g. "
        "mask_path of a lesion cohort, atrophy_path of a synthetic one): score every session "
        "map against it."
    )
    methods: list[str] | None = Field(
        None, description="Explanation methods scored (default: every one in the run folder)."
    )
    diagnosis: str | None = Field(
        None, description="Class whose group maps are scored (default: the patient class)."
    )
    baselines: bool = Field(
        True, description="Score baselines beside the methods, as rows baseline:random, "
        "baseline:input, baseline:edge (the image and its gradient magnitude), baseline:t_map "
        "(Welch t of the fold's training set), baseline:linear_weights and "
        "baseline:linear_pattern (an L2 logistic regression on its voxels); see "
        "voxplain.evaluate.baselines."
    )
    seed: int = Field(0, ge=0, description="Seed of the random and linear baselines.")


class FaithfulnessStepConfig(RunStepConfig):
    """``voxplain evaluate faithfulness``: deletion and insertion curves (Petsiuk et al. 2018)
    of the run's explanations, masks and baselines on the same sessions."""

    methods: list[str] | None = Field(
        None, description="Explanation methods scored (default: every one in the run folder); "
        "group_mask, session_mask and baseline:NAME select those rows."
    )
    diagnosis: str | None = Field(
        None, description="Class whose validation sessions are scored, for that class "
        "(default: the patient class, the class the masks explain)."
    )
    sessions: int = Field(
        8, ge=1, description="Validation sessions of that class scored per fold/run (the "
        "first in cohort order)."
    )
    step: float = Field(
        0.05, gt=0, le=1, description="Fraction of the brain's voxels changed per point of a "
        "curve (21 points at 0.05)."
    )
    perturbation: Literal["constant", "blur"] = Field(
        MaskConfig.model_fields["perturbation"].default,
        description="What a deleted voxel becomes (and an inserted one starts from): a "
        "constant, or the image blurred; as the masks' mu (1: restored grey matter)."
    )
    constant: float = Field(
        MaskConfig.model_fields["constant"].default,
        description="The value of the constant perturbation."
    )
    blur_mm: float = Field(
        MaskConfig.model_fields["blur_mm"].default, gt=0,
        description="Gaussian sigma (mm) of the blurred perturbation."
    )
    baselines: bool = Field(
        True, description="Score the baselines of voxplain.evaluate.baselines as rankings "
        "beside the methods (baseline:random, input, edge, t_map, linear_weights, "
        "linear_pattern)."
    )
    masks: bool = Field(
        True, description="Score the run's group and session masks (ranking 1 - mask) where "
        "they exist."
    )
    batch_size: int = Field(16, ge=1, description="Perturbed images per forward pass.")
    seed: int = Field(0, ge=0, description="Seed of the random and linear baselines.")


class ClassificationEvaluationConfig(Section):
    """``voxplain evaluate classification``: metrics with bootstrap CIs of a run's models."""

    run: Path = Field(description="Run folder written by `voxplain train`.")
    subset: str = Field("validation", description="Predictions evaluated: predictions-SUBSET.tsv.")
    n_boot: int = Field(1000, ge=1, description="Bootstrap resamples (stratified by class).")
    seed: int = Field(0, ge=0, description="Seed of the bootstrap resampling.")
    level: float = Field(0.95, gt=0, lt=1, description="Level of the confidence intervals.")
    positive: str | None = Field(
        None, description="Positive class of binary metrics (default: class 1, e.g. AD)."
    )
    cohort: Path | None = Field(
        None, description="Evaluate the run's models on another cohort instead: the "
        "predictions `voxplain predict --cohort` wrote (RUN/predictions/LABEL.tsv), per fold, "
        "into RUN/evaluation/cohort-LABEL/ (paper 1's AIBL)."
    )


class RandomisationConfig(RunStepConfig):
    """``voxplain evaluate randomisation``: the model- and data-randomisation sanity checks of
    Adebayo et al. (2018) for explanation methods, fold by fold."""

    methods: list[str] = Field(description="Explanation methods tested (e.g. grad_cam, "
                               "integrated_gradients).")
    sessions: int = Field(8, ge=1, description="Validation sessions of each fold explained "
                          "(the first in cohort order).")
    data: bool = Field(True, description="Also the data-randomisation test: train the run's "
                       "models again on permuted diagnoses (RUN/randomisation/data) and compare "
                       "their maps; costs one more training of every fold.")
    options: dict[str, dict[str, bool | int | float | str]] = Field(
        default_factory=dict, description="Options of each method's explainer, by method (e.g. "
        "{integrated_gradients = {n_steps = 16}} in the pipeline file): cheaper settings of "
        "the expensive methods, as given to voxplain explain --options."
    )
    seed: int = Field(0, ge=0, description="Seed of the layer re-initialisations and of the "
                      "label permutation.")


class RobustnessConfig(Section):
    """``voxplain evaluate robustness``: similarity of maps across folds, runs, sessions,
    hyperparameters and datasets (paper 1, 3.2-3.3)."""

    run: Path = Field(description="Run folder with masks and/or explanations.")
    methods: list[str] | None = Field(
        None, description="Methods compared: 'mask' and/or explanation methods (default: all "
        "found in the run folder)."
    )
    other_run: Path | None = Field(
        None, description="Run folder with maps of the same models on another cohort (across "
        "datasets, paper 1, 3.2.1)."
    )
    prob_cnn: bool = Field(
        False, description="Also compare group and session masks by prob_CNN (forward passes "
        "of every model on masked images)."
    )
    batch_size: int = Field(16, ge=1, description="Images per forward pass for prob_CNN.")
    device: Device = Field("auto", description="Where to run prob_CNN.")
    executor: Executor = Field(
        default_factory=ExecutorConfig, description="Where prob_CNN's units run: a row of the "
        "group-mask matrix (one model on every mask) or one fold/run's session matrix each.")
    include_flagged: bool = Field(
        False, description="Keep flagged masks: session masks flagged as not converged (column "
        "'flagged' of masks/session/*/index.tsv) and group masks flagged in their summary.json "
        "(far denser than the run's others, or not halving the masked class's probability); "
        "by default they are left out, with a message."
    )


class StatsConfig(Section):
    """``voxplain stats``: heatmap statistics of one method's session maps (paper 2, 2.4)."""

    run: Path = Field(description="Run folder with session masks or explanations.")
    method: str = Field("mask", description="'mask' or an explanation method under explanations/.")
    groups: list[str] | None = Field(
        None, description="One or two diagnoses to test (default: those with maps, if at most 2)."
    )
    folds: list[int] | None = Field(None, description="Folds whose maps are used (default: all).")
    percentile: float = Field(
        95.0, gt=0, lt=100, description="Percentile compared between groups and used as each "
        "map's threshold."
    )
    correction: Literal["bonferroni", "fdr", "none"] = Field(
        "bonferroni", description="Multiple-comparison correction of the cluster table."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level (corrected p).")
    equal_var: bool = Field(
        True, description="Student's two-sample test (pooled variance); false: Welch's test."
    )
    connectivity: int = Field(
        1, ge=1, le=3, description="Neighbours joining voxels into clusters (1 faces, 3 corners)."
    )
    include_flagged: bool = Field(
        False, description="Keep session masks flagged as not converged (left out by default)."
    )
    unit: Literal["subject", "session"] = Field(
        "subject", description="Unit of observation: one map per subject (mean of its sessions; "
        "sessions of a subject are not independent) or per session."
    )
    permutations: int = Field(
        1000, ge=0, description="Permutations of the permutation tests (nilearn permuted_ols: "
        "max-T FWE; TFCE and cluster FWE with --tfce, --cluster-threshold) beside the "
        "parametric ones, on the same thresholded maps; 0: none. Needs unit 'subject'."
    )
    covariates: list[str] = Field(
        default_factory=list, description="Cohort columns adjusted for in the permutation tests "
        "(e.g. age, sex, site; text columns dummy-coded)."
    )
    tfce: bool = Field(False, description="Also TFCE FWE p-values (permutation tests).")
    cluster_threshold: float | None = Field(
        None, gt=0, lt=1, description="Cluster-forming two-sided p of the cluster-size and "
        "cluster-mass FWE p-values (permutation tests; e.g. 0.001); none: no cluster inference."
    )
    paired_sessions: list[str] | None = Field(
        None, description="Two sessions (e.g. ses-M00,ses-M12): per group, a paired permutation "
        "test of the second minus the first, over the subjects with both."
    )
    seed: int = Field(0, description="Random state of the permutations.")


# --- report ------------------------------------------------------------------------------

class ReportConfig(Section):
    """``voxplain report``: the HTML report of a run folder (RUN/report/index.html)."""

    run: Path = Field(description="Run folder to report on.")
    out: Path | None = Field(None, description="Report folder (default: RUN/report).")
    inline: bool = Field(
        False, description="Embed figures and viewers in index.html (one file to share) instead "
        "of linking report/figures and report/viewers."
    )
    formats: list[Literal["png", "svg", "pdf"]] = Field(
        default_factory=lambda: ["png", "svg"],
        description="Formats of the vector figures (curves, box plots) under report/figures; "
        "brain maps and heatmaps are rasters, saved as PNG only.",
    )
    dpi: int = Field(110, ge=30, le=600, description="Resolution of the PNG figures.")
    max_viewers: int = Field(
        4, ge=0, description="Interactive 3D viewers (nilearn view_img) of group maps, at most."
    )
    max_columns: int = Field(
        6, ge=1, description="Folds/runs shown side by side in a brain figure, at most."
    )
    max_sessions_2d: int = Field(
        4, ge=1, description="2D sessions shown as overlays (original and maps side by side)."
    )
    compare: list[Path] | None = Field(
        None, description="Other run folders (e.g. other networks on the same cohort) whose "
        "classification results are tabulated beside this run's (paper 2, table 1)."
    )


# --- user study (paper 3) -------------------------------------------------------------------

#: The criteria of paper 3's user study (3.4), in its words.
DEFAULT_STUDY_CRITERIA: tuple[str, ...] = (
    "intuitive validity",
    "semantic meaningfulness",
    "image quality",
)


class StudyMakeConfig(Section):
    """``voxplain study make``: blinded, randomised questionnaires A and B (paper 3, 3.4)."""

    run: Path = Field(description="Run folder with explanations/METHOD/fold-K/run-R/index.tsv.")
    methods: list[str] | None = Field(
        None, description="Explanation methods to compare (default: every one in the run folder)."
    )
    fold: int = Field(0, ge=0, description="Fold whose explanations are shown.")
    model_run: int = Field(0, ge=0, description="Run (seed) of that fold whose explanations are shown.")
    samples_per_class: int = Field(
        12, ge=1, description="Correctly classified samples drawn per class (paper: 12)."
    )
    seed: int = Field(0, description="Seed of the sample draw, the method orders and the image ids.")
    criteria: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STUDY_CRITERIA),
        description="Criteria every image is scored on.",
    )
    score_min: int = Field(-4, description="Lowest score (paper: -4).")
    score_max: int = Field(4, description="Highest score (paper: 4).")
    colormap: str = Field(
        "RdBu_r", description="Diverging matplotlib colormap of every overlay, centred on 0."
    )
    opacity: float = Field(
        0.8, gt=0, le=1, description="Overlay opacity where the map reaches its largest |value|."
    )
    pixels: int = Field(256, ge=16, description="Shorter side of each rendered image, in pixels.")
    out: Path | None = Field(None, description="Study folder (default RUN/study).")

    @field_validator("criteria")
    @classmethod
    def _distinct_criteria(cls, criteria: list[str]) -> list[str]:
        if not criteria or len(set(criteria)) != len(criteria):
            raise ValueError(f"criteria must be distinct and not empty, got {criteria}")
        return criteria


class StudyServeConfig(Section):
    """``voxplain study serve``: one questionnaire as a local web form, answers into SQLite."""

    study: Path = Field(description="Study folder written by `voxplain study make`.")
    variant: Literal["A", "B"] = Field("A", description="Questionnaire variant to show.")
    port: int = Field(8765, ge=0, le=65535, description="Port on 127.0.0.1 (0: any free port).")
    database: Path | None = Field(None, description="SQLite file (default STUDY/answers.sqlite).")
    raters: list[str] = Field(
        default_factory=list,
        description="Raters given a secret link, printed at start (repeat the flag); a rater "
                    "who has a link keeps it.",
    )
    new_links: bool = Field(
        False, description="Give the named raters new links; their old links stop working."
    )
    request_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send its request (then 408)."
    )

    @field_validator("raters")
    @classmethod
    def _named_raters(cls, raters: list[str]) -> list[str]:
        names = [rater.strip() for rater in raters]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"rater names must be distinct and not empty, got {raters}")
        return names


class StudyAnalyseConfig(Section):
    """``voxplain study analyse``: de-randomised statistics of the answers (paper 3, 3.4, 4.2)."""

    study: Path = Field(description="Study folder written by `voxplain study make`.")
    database: Path | None = Field(None, description="SQLite file (default STUDY/answers.sqlite).")
    answers_csv: list[Path] = Field(
        default_factory=list,
        description="Extra answer CSVs (rater, variant, question, image, criterion, score), "
                    "e.g. from paper questionnaires.",
    )
    out: Path | None = Field(None, description="Output folder (default STUDY/analysis).")


class StudyExportConfig(Section):
    """``voxplain study export``: every answer of the SQLite database as one CSV."""

    study: Path = Field(description="Study folder written by `voxplain study make`.")
    database: Path | None = Field(None, description="SQLite file (default STUDY/answers.sqlite).")
    out: Path | None = Field(None, description="CSV file (default STUDY/answers.csv).")


# --- TOML ------------------------------------------------------------------------------------

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


def with_defaults(schema: type[BaseModel], recorded: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` settings (JSON values) completed with the defaults of the ``schema`` fields
    it lacks: a setting added after a file was written counts as its default there."""
    defaults = {key: json.loads(json.dumps(field.get_default(call_default_factory=True)))
                for key, field in schema.model_fields.items() if not field.is_required()}
    return {**defaults, **recorded}


def is_field(schema: type[BaseModel], key: str) -> bool:
    """Whether ``key`` names a field of ``schema``, by its name or by one of its aliases (the
    earlier spelling of a renamed setting, e.g. ``folds`` of ``n_folds``)."""
    for name, info in schema.model_fields.items():
        aliases = getattr(info.validation_alias, "choices", None) or [info.validation_alias]
        if key == name or key in aliases:
            return True
    return False


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
