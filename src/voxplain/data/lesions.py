"""Synthetic 2D lung-lesion patches: benign (round, smooth) vs malignant (lobulated, spiculated).

The patches imitate the LIDC-IDRI data of paper 3 (Katzmann et al. 2021): axial 64x64 patches
covering 45x45 mm around a lesion, benign against malignant. Every patch is built in Hounsfield
units, pasted into a background, then shown through a lung window ([-1000, 400] HU -> [0, 1]).

Lesion shape (the class signal). Both classes draw their radius, elongation, position jitter and
density from the same ranges, so radius and brightness carry no class information (the mask
area carries a little: lobes and spicules add pixels). A benign lesion is an ellipse with a
smooth border. A malignant lesion has a lobulated border (a few low-order
harmonics of the polar radius) and spicules: thin radial spikes tapering away from the border.
The border is therefore where a faithful explanation should point. The ground-truth mask is the
set of pixels at least half covered by the lesion (4x4 supersampling per pixel).

Backgrounds.

- ``synthetic``: lung parenchyma (-900 to -820 HU) with a smooth random texture
  (Gaussian-filtered white noise at two scales).
- ``ct``: crops of a real chest CT slice, converted to HU with RescaleSlope/RescaleIntercept and
  resampled to the patch grid (45 mm field of view, bilinear, mirrored across the slice edges).
  The lesion centre is placed on lung parenchyma of the slice. The slices used are listed in
  :data:`CT_SLICES` and are read from the installed packages only, never downloaded:
  ``CT_small.dcm`` of the ``pydicom`` package (``pydicom/data/test_files/CT_small.dcm``:
  128x128, 0.66 mm pixels, a thoracic slice at the level of a vertebra with both lungs at its
  upper corners). The other CT files installed with pydicom (``693_J2KI.dcm``,
  ``J2K_pixelrep_mismatch.dcm``: head; ``dicomdirtests/*``: 16x16 thumbnails) and pydicom-data
  (import package ``data_store``; ``693_UNCI.dcm``, ``693_UNCR.dcm``, ``693_J2KR.dcm``: head;
  ``eCT_Supplemental.dcm``: brain perfusion; ``explicit_VR-UN.dcm``: abdomen) hold no lung, so
  they are not used.

In both cases pixel noise of standard deviation ``config.noise`` is added after the lesion is
pasted, and intensities are clipped to [0, 1].

Pixel spacing. A patch on a CT background has a physical pixel size: the slice's DICOM
``PixelSpacing`` times the resampling step, i.e. 45 mm / ``size`` (0.703 mm at 64 px; not the
slice's own 0.66 mm, since the patch is resampled). ``cohort.tsv`` records it in the columns
``pixel_spacing_row`` and ``pixel_spacing_col`` (:func:`patch_spacing_mm`), which the cohort
reader puts into the images' affine (:data:`voxplain.data.cohort.PIXEL_SPACING_COLUMNS`): the
models' grid and every explanation map's NIfTI header carry it. A synthetic background has no
physical scale and no such columns: its pixels are 1 mm, as for any NPY or PNG image.

Background variation. With ``config.background_variation = v > 1`` every patch multiplies the
amplitude of each synthetic texture scale (1 px and 6 px) and the pixel-noise standard deviation
by its own factor, three independent draws, log-uniform in ``[1/v, v]`` (``v ** u``, ``u`` uniform
in [-1, 1]). The factors are drawn independently of the class, so background detail carries no
class information however much of it a patch has: with ``v = 1`` (the default) the background
is nearly the same in every patch (far-background detail SD 0.048 +/- 0.0014 at 64 px), and a
classifier may learn that any fine detail means "malignant" (the spicules are fine detail). The
factors come from a stream of their own, seeded ``(seed, i, 2)``, so every other draw is the
same as without variation; ``v = 1`` gives factors of exactly 1, i.e. the same patches as before
the option existed. With a CT background only the noise factor applies (the CT texture is
anatomy and is left as it is). ``cohort.tsv`` records the factors (``texture_fine_gain``,
``texture_coarse_gain``, ``noise_sd``) when ``v > 1``.

Counterfactual ground truth. :func:`counterfactual_patches` renders a cohort's patches again
with each lesion in the other class (:func:`counterfactual_shape`: a malignant lesion loses its
lobulation and spicules, a benign one gets new ones from the seed ``(seed, i, 3)``) over the same
background, lesion texture and noise. The difference from the real patch is the true
class-defining change, what a perfect counterfactual explanation (CyCE, paper 3) would show.

Output folder: ``images/sub-0001_ses-M00.{npy,png}`` (NPY: float32 ``(1, H, W)``; PNG: 8-bit
grey), ``masks/sub-0001_ses-M00.npy`` (uint8 ``(H, W)``), ``cohort.tsv`` and ``generator.json``.
Sample ``i`` is drawn from generators seeded with ``(seed, i)`` only, so it does not depend on the
cohort size or on the generation order, and samples whose files exist are not rendered again.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from scipy import ndimage

from voxplain.config import LesionCohortConfig, with_defaults
from voxplain.data.cohort import PIXEL_SPACING_COLUMNS
from voxplain.io import atomic_path, write_json, write_text

#: Side of the square field of view of a patch in mm (paper 3: 45x45 mm at 64x64 pixels).
FIELD_OF_VIEW_MM = 45.0
#: Lung window in HU, mapped linearly to [0, 1].
LUNG_WINDOW_HU = (-1000.0, 400.0)
#: HU range of lung parenchyma, where CT lesions are centred.
PARENCHYMA_HU = (-950.0, -500.0)
#: Least distance (mm) from a CT lesion centre to tissue that is not lung parenchyma.
PARENCHYMA_MARGIN_MM = 5.0
#: Real CT slices usable as backgrounds: (import package, path inside that package).
CT_SLICES: tuple[tuple[str, str], ...] = (("pydicom", "data/test_files/CT_small.dcm"),)
#: Sub-pixels per pixel side used to compute the lesion's coverage of each pixel.
SUPERSAMPLING = 4
DIAGNOSES = ("benign", "malignant")
SESSION_ID = "ses-M00"


@dataclass(frozen=True)
class LesionShape:
    """Geometry and density of one lesion, in patch pixels (rows, columns) and HU.

    ``harmonics`` is ``(K, 3)``: order, relative amplitude, phase of each lobulation harmonic
    of the polar radius. ``spicules`` is ``(S, 3)``: angle (rad), length (px), half-width at the
    border (px) of each spike. Both are empty for a benign lesion.
    """

    center: tuple[float, float]
    radius_px: float
    elongation: float
    orientation: float
    harmonics: np.ndarray
    spicules: np.ndarray
    lesion_hu: float

    @property
    def lobulation(self) -> float:
        """Sum of the harmonic amplitudes (0 for a smooth ellipse)."""
        return float(self.harmonics[:, 1].sum()) if len(self.harmonics) else 0.0


@dataclass(frozen=True)
class CTSlice:
    """A CT slice in HU with its pixel spacing and the parenchyma pixels lesions can sit on."""

    name: str
    hu: np.ndarray
    spacing_mm: tuple[float, float]
    parenchyma: np.ndarray


@dataclass(frozen=True)
class CTPlacement:
    """Where a patch comes from in a CT slice.

    Patch pixel ``(i, j)`` is slice pixel ``origin + (i, j) * step`` (rows, columns).
    """

    ct: CTSlice
    origin: tuple[float, float]
    step: tuple[float, float]


@dataclass(frozen=True)
class BackgroundVariation:
    """Per-patch gains of the synthetic texture (1 px, 6 px scales) and of the noise SD."""

    texture_gains: tuple[float, float]
    noise_gain: float


NO_VARIATION = BackgroundVariation((1.0, 1.0), 1.0)
#: Harmonics and spicules of a benign lesion: none.
NO_FEATURES = (np.zeros((0, 3)), np.zeros((0, 3)))


def generate_lesion_cohort(
    config: LesionCohortConfig, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a cohort of benign and malignant lesion patches with their ground-truth masks.

    Args:
        config: cohort size, patch side, background, file format, noise and seed.
        progress: called as ``progress(done, total)`` after each sample.

    Returns:
        Path of the written ``cohort.tsv``.

    Raises:
        ValueError: ``config.out`` holds a cohort made with other settings.
        FileNotFoundError: ``background="ct"`` and no CT slice of :data:`CT_SLICES` is installed.
    """
    slices = background_slices(config)
    out = Path(config.out)
    _claim_folder(out, config)
    rows = []
    for index in range(config.subjects):
        rows.append(_write_sample(config, index, slices))
        if progress is not None:
            progress(index + 1, config.subjects)
    table = pd.DataFrame(rows).to_csv(sep="\t", index=False)
    cohort = out / "cohort.tsv"
    if not cohort.exists() or cohort.read_text() != table:
        write_text(cohort, table)
    return cohort


def background_slices(config: LesionCohortConfig) -> list[CTSlice]:
    """The CT slices a cohort's backgrounds come from (none for synthetic backgrounds)."""
    if config.background != "ct":
        return []
    return [load_ct_slice(name, path) for name, path in find_ct_slices().items()]


def _claim_folder(out: Path, config: LesionCohortConfig) -> None:
    """Write ``generator.json``, or check that the one already in ``out`` has the same settings.

    The output folder itself may move, so ``out`` is left out of the comparison. A setting added
    after a folder was generated counts as its default in that folder's older ``generator.json``
    (a new setting's default renders what older versions did).
    """
    settings = config.model_dump(mode="json")
    path = out / "generator.json"
    if not path.exists():
        write_json(path, settings)
        return
    previous = with_defaults(LesionCohortConfig, json.loads(path.read_text()))
    changed = sorted(key for key in settings if key != "out" and previous.get(key) != settings[key])
    if changed:
        details = ", ".join(f"{key}: {previous.get(key)!r} -> {settings[key]!r}" for key in changed)
        raise ValueError(
            f"{out}: holds a lesion cohort generated with other settings ({details}); "
            "choose another folder or delete it"
        )


def _write_sample(
    config: LesionCohortConfig, index: int, slices: list[CTSlice]
) -> dict[str, object]:
    """Render sample ``index`` unless its files exist; return its cohort.tsv row."""
    width = max(4, len(str(config.subjects)))
    participant = f"sub-{index + 1:0{width}d}"
    image_path = Path("images") / f"{participant}_{SESSION_ID}.{config.file_format}"
    mask_path = Path("masks") / f"{participant}_{SESSION_ID}.npy"
    design = design_sample(config, index, slices)
    diagnosis, shape, placement, variation = design
    out = Path(config.out)
    if not ((out / image_path).exists() and (out / mask_path).exists()):
        image, mask = render_sample(config, index, design)
        _save_image(out / image_path, image)
        with atomic_path(out / mask_path) as temporary, open(temporary, "wb") as stream:
            np.save(stream, mask)
    row = {
        "participant_id": participant,
        "session_id": SESSION_ID,
        "diagnosis": diagnosis,
        "path": image_path.as_posix(),
        "mask_path": mask_path.as_posix(),
        "radius_px": round(shape.radius_px, 3),
        "spicules": len(shape.spicules),
        "lobulation": round(shape.lobulation, 4),
        "elongation": round(shape.elongation, 4),
        "lesion_hu": round(shape.lesion_hu, 1),
        "center_row": round(shape.center[0], 3),
        "center_col": round(shape.center[1], 3),
    }
    if config.background_variation > 1:
        row |= {
            "texture_fine_gain": round(variation.texture_gains[0], 4),
            "texture_coarse_gain": round(variation.texture_gains[1], 4),
            "noise_sd": round(config.noise * variation.noise_gain, 5),
        }
    if placement is not None:
        row |= {
            "background_file": placement.ct.name,
            "background_origin_row": placement.origin[0],
            "background_origin_col": placement.origin[1],
            "background_step_row": placement.step[0],
            "background_step_col": placement.step[1],
            **dict(zip(PIXEL_SPACING_COLUMNS, patch_spacing_mm(placement))),
        }
    return row


def design_sample(
    config: LesionCohortConfig, index: int, slices: list[CTSlice]
) -> tuple[str, LesionShape, CTPlacement | None, BackgroundVariation]:
    """Diagnosis, lesion, CT placement (``None`` for a synthetic background) and background
    variation of sample ``index``, from its own seeds ``(seed, index, 0)`` and ``(seed, index, 2)``."""
    diagnosis = DIAGNOSES[index % 2]
    design = np.random.default_rng([config.seed, index, 0])
    shape = draw_lesion_shape(design, diagnosis == "malignant", config.size)
    placement = draw_ct_placement(design, slices, shape.center, config.size) if slices else None
    variation = draw_background_variation(
        np.random.default_rng([config.seed, index, 2]), config.background_variation)
    return diagnosis, shape, placement, variation


def render_sample(config: LesionCohortConfig, index: int,
                  design: tuple[str, LesionShape, CTPlacement | None, BackgroundVariation],
                  counterfactual: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` of sample ``index`` drawn as ``design`` (:func:`design_sample`), as
    :func:`generate_lesion_cohort` writes them.

    With ``counterfactual=True``: the same patch with its lesion drawn in the other class
    (:func:`counterfactual_shape`, new features from the seed ``(seed, index, 3)``). Background,
    lesion texture and pixel noise are the same draws, so the image differs from the real one only
    where the lesion's class features are (and where clipping to [0, 1] differs).
    """
    _, shape, placement, variation = design
    if counterfactual:
        shape = counterfactual_shape(shape, np.random.default_rng([config.seed, index, 3]),
                                     config.size)
    texture = np.random.default_rng([config.seed, index, 1])
    return render_patch(shape, placement, config.size, config.noise, texture, variation)


def counterfactual_patches(cohort: Path, participants: list[str]) -> np.ndarray:
    """The counterfactual images ``(N, 1, H, W)`` of the named participants of a lesion cohort.

    Args:
        cohort: folder written by :func:`generate_lesion_cohort` (its ``generator.json`` holds
            the settings that rendered it).
        participants: participant ids (``sub-0001``: sample 0).

    Raises:
        FileNotFoundError: ``cohort`` has no ``generator.json``.
        ValueError: a participant id is not ``sub-<number>``.
    """
    settings = Path(cohort) / "generator.json"
    if not settings.is_file():
        raise FileNotFoundError(f"{settings}: not found; is {cohort} a lesion cohort folder "
                                "written by `voxplain generate lesions`?")
    config = LesionCohortConfig.model_validate(
        with_defaults(LesionCohortConfig, json.loads(settings.read_text())))
    slices = background_slices(config)
    images = []
    for participant in participants:
        number = participant.removeprefix("sub-")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{settings.parent}: participant id {participant!r} is not "
                             "sub-<number> (sample <number> - 1)")
        index = int(number) - 1
        images.append(render_sample(config, index, design_sample(config, index, slices),
                                    counterfactual=True)[0])
    return np.stack(images)


def draw_lesion_shape(rng: np.random.Generator, malignant: bool, size: int) -> LesionShape:
    """Draw a lesion for a ``size`` x ``size`` patch.

    Radius (8-18 % of the side, i.e. 5.1-11.5 px or 3.6-8.1 mm at 64 px), elongation
    (axis ratio 1-1.5), orientation, centre jitter (up to 8 % of the side) and density
    (-200 to 100 HU: part-solid to solid) come from the same ranges for both classes. Only a
    malignant lesion gets lobulation (2-3 harmonics of order 3-7, total amplitude 0.08-0.2 of
    the radius) and 3-10 spicules (length 0.4-0.9 radius, half-width 0.7-1.1 px at 64 px).
    """
    middle = (size - 1) / 2
    center = (middle + rng.uniform(-0.08, 0.08) * size, middle + rng.uniform(-0.08, 0.08) * size)
    radius = rng.uniform(0.08, 0.18) * size
    elongation = rng.uniform(1.0, 1.5)
    orientation = rng.uniform(0, np.pi)
    lesion_hu = rng.uniform(-200.0, 100.0)
    harmonics, spicules = NO_FEATURES
    if malignant:
        harmonics, spicules = draw_malignant_features(rng, radius, size)
    return LesionShape(center, radius, elongation, orientation, harmonics, spicules, lesion_hu)


def draw_malignant_features(rng: np.random.Generator, radius: float,
                            size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lobulation harmonics ``(K, 3)`` and spicules ``(S, 3)`` of a malignant lesion of mean
    radius ``radius`` px in a ``size`` x ``size`` patch (ranges: see :func:`draw_lesion_shape`)."""
    count = int(rng.integers(2, 4))
    orders = rng.choice(np.arange(3, 8), size=count, replace=False)
    amplitudes = rng.uniform(0.08, 0.2) * rng.dirichlet(np.ones(count))
    harmonics = np.column_stack([orders, amplitudes, rng.uniform(0, 2 * np.pi, count)])
    n_spicules = int(rng.integers(3, 11))
    spicules = np.column_stack([
        rng.uniform(0, 2 * np.pi, n_spicules),
        rng.uniform(0.4, 0.9, n_spicules) * radius,
        np.maximum(rng.uniform(0.7, 1.1, n_spicules) * size / 64, 0.5),
    ])
    return harmonics, spicules


def counterfactual_shape(shape: LesionShape, rng: np.random.Generator, size: int) -> LesionShape:
    """The same lesion drawn in the other class: the ground truth of a counterfactual explanation.

    A malignant lesion loses its lobulation and spicules (its smooth ellipse stays); a benign one
    gets lobulation and spicules drawn from ``rng`` as :func:`draw_lesion_shape` draws them.
    Centre, radius, elongation, orientation and density are kept, so the two lesions differ by
    exactly the features that define the class.
    """
    if len(shape.harmonics) or len(shape.spicules):
        return replace(shape, harmonics=NO_FEATURES[0], spicules=NO_FEATURES[1])
    harmonics, spicules = draw_malignant_features(rng, shape.radius_px, size)
    return replace(shape, harmonics=harmonics, spicules=spicules)


def border_radius(shape: LesionShape, theta: np.ndarray) -> np.ndarray:
    """Distance (px) from the lesion centre to its border (spicules excluded) at angles ``theta``.

    An area-preserving ellipse of mean radius ``radius_px`` times ``1 + sum_k a_k cos(k t + p_k)``.
    """
    relative = theta - shape.orientation
    q = shape.elongation
    radius = shape.radius_px / np.sqrt(np.cos(relative) ** 2 / q + q * np.sin(relative) ** 2)
    lobes = np.ones_like(theta)
    for order, amplitude, phase in shape.harmonics:
        lobes = lobes + amplitude * np.cos(order * theta + phase)
    return radius * lobes


def lesion_coverage(shape: LesionShape, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the lesion body and its spicules, ``(size, size)``.

    Pixel ``(i, j)`` is the unit square centred on ``(i, j)``, sampled by
    ``SUPERSAMPLING**2`` points.
    """
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING - 0.5
    axis = (np.arange(size)[:, None] + offsets[None, :]).ravel()
    dy = axis[:, None] - shape.center[0]
    dx = axis[None, :] - shape.center[1]
    inside = np.hypot(dy, dx) <= border_radius(shape, np.arctan2(dy, dx))
    for angle, length, half_width in shape.spicules:
        base = float(border_radius(shape, np.array([angle]))[0])
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = np.abs(dy * np.cos(angle) - dx * np.sin(angle))
        # Full width up to the border, then a linear taper to 30 % at the tip.
        taper = np.clip((along - base) / length, 0.0, 1.0)
        spike = (along >= 0) & (along <= base + length)
        inside |= spike & (across <= half_width * (1 - 0.7 * taper))
    return inside.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))


def draw_background_variation(rng: np.random.Generator, variation: float) -> BackgroundVariation:
    """Gains of the two texture scales and of the noise SD, each ``variation ** U(-1, 1)``."""
    fine, coarse, noise = (float(variation ** u) for u in rng.uniform(-1.0, 1.0, 3))
    return BackgroundVariation((fine, coarse), noise)


def synthetic_background_hu(
    rng: np.random.Generator, size: int, texture_gains: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Lung parenchyma in HU, ``(size, size)``: a level in [-900, -820] plus smooth texture.

    The texture sums unit-variance Gaussian-filtered white noise at 1 and 6 px (at 64 px,
    scaled with the patch side) with amplitudes 25 and 40 HU, times ``texture_gains``.
    """
    scale = size / 64
    level = rng.uniform(-900.0, -820.0)
    texture = np.zeros((size, size))
    for sigma, amplitude, gain in zip((1.0, 6.0), (25.0, 40.0), texture_gains):
        smooth = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * scale)
        texture += amplitude * gain * smooth / smooth.std()
    return level + texture


def find_ct_slices() -> dict[str, Path]:
    """Installed CT slices of :data:`CT_SLICES`, looked up on disk (never downloaded).

    Returns:
        ``{"package/path/in/package": absolute path}`` for every listed file that exists and
        whose Modality is CT.

    Raises:
        FileNotFoundError: none qualifies; the message names every package and path searched.
    """
    found, searched = {}, []
    for package, relative in CT_SLICES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            searched.append(f"{package}/{relative} (package {package!r} not installed)")
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.is_file():
            searched.append(f"{path} (missing)")
            continue
        modality = pydicom.dcmread(path, stop_before_pixels=True).get("Modality")
        if modality != "CT":
            searched.append(f"{path} (modality {modality!r}, not CT)")
            continue
        found[f"{package}/{relative}"] = path
    if not found:
        raise FileNotFoundError(
            "background='ct' needs a real CT slice and none was found; searched: "
            + "; ".join(searched)
            + ". Install pydicom (it ships data/test_files/CT_small.dcm) or use "
            "background='synthetic'."
        )
    return found


@lru_cache(maxsize=8)
def load_ct_slice(name: str, path: Path) -> CTSlice:
    """Read the CT slice ``path`` (called ``name``) in HU: RescaleSlope * value + RescaleIntercept.

    ``parenchyma`` lists the ``(row, col)`` pixels whose 2 px-smoothed HU lie in
    :data:`PARENCHYMA_HU`, eroded by :data:`PARENCHYMA_MARGIN_MM` so that lesions sit in the lung.

    Raises:
        ValueError: the file is not one 2D slice or holds no lung parenchyma.
    """
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"{path}: expected one 2D CT slice, got pixel data shaped {stored.shape}")
    slope = float(dataset.get("RescaleSlope", 1.0))
    intercept = float(dataset.get("RescaleIntercept", 0.0))
    hu = stored.astype(np.float64) * slope + intercept
    row_mm, col_mm = (float(value) for value in dataset.PixelSpacing)
    smooth = ndimage.gaussian_filter(hu, 2.0)
    lung = (smooth >= PARENCHYMA_HU[0]) & (smooth <= PARENCHYMA_HU[1])
    margin = max(1, round(PARENCHYMA_MARGIN_MM / min(row_mm, col_mm)))
    parenchyma = np.argwhere(ndimage.binary_erosion(lung, iterations=margin))
    if len(parenchyma) == 0:
        raise ValueError(
            f"{path}: no lung parenchyma ({PARENCHYMA_HU} HU, {PARENCHYMA_MARGIN_MM} mm from other "
            "tissue) to place lesions on"
        )
    return CTSlice(name, hu, (row_mm, col_mm), parenchyma)


def draw_ct_placement(
    rng: np.random.Generator, slices: list[CTSlice], center: tuple[float, float], size: int
) -> CTPlacement:
    """Pick a slice and a parenchyma pixel of it, and map the patch so the lesion lands there.

    The patch spans :data:`FIELD_OF_VIEW_MM` on each side, so one patch pixel is
    ``FIELD_OF_VIEW_MM / size / spacing`` slice pixels; patch pixel ``center`` falls on the
    chosen parenchyma pixel.
    """
    ct = slices[int(rng.integers(len(slices)))]
    target = ct.parenchyma[int(rng.integers(len(ct.parenchyma)))]
    step = tuple(FIELD_OF_VIEW_MM / size / spacing for spacing in ct.spacing_mm)
    origin = tuple(float(target[axis] - center[axis] * step[axis]) for axis in range(2))
    return CTPlacement(ct, origin, step)


def patch_spacing_mm(placement: CTPlacement) -> tuple[float, float]:
    """Pixel spacing (mm) of a patch on a CT background, rows then columns: the slice's DICOM
    ``PixelSpacing`` times the resampling step (slice pixels per patch pixel), i.e.
    :data:`FIELD_OF_VIEW_MM` / size, rounded to 1e-6 mm."""
    return tuple(round(step * spacing, 6)
                 for step, spacing in zip(placement.step, placement.ct.spacing_mm))


def ct_background_hu(placement: CTPlacement, size: int) -> np.ndarray:
    """HU of the slice at the patch pixels, ``(size, size)``: bilinear, mirrored at the edges."""
    rows = placement.origin[0] + np.arange(size) * placement.step[0]
    cols = placement.origin[1] + np.arange(size) * placement.step[1]
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(placement.ct.hu, grid, order=1, mode="mirror")


def lung_window(hu: np.ndarray) -> np.ndarray:
    """Map HU to [0, 1] through :data:`LUNG_WINDOW_HU` (values outside are clipped)."""
    low, high = LUNG_WINDOW_HU
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def render_patch(
    shape: LesionShape,
    placement: CTPlacement | None,
    size: int,
    noise: float,
    rng: np.random.Generator,
    variation: BackgroundVariation = NO_VARIATION,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a lesion into its background.

    The lesion's opacity is its pixel coverage blurred by a 0.5 px Gaussian (a scanner's point
    spread); inside, its density varies by a smooth 20 HU texture. The blend is
    ``(1 - opacity) * background + opacity * lesion`` in HU, then the lung window, then pixel
    noise of standard deviation ``noise``, clipped to [0, 1].

    Args:
        placement: where the CT background comes from; ``None`` draws a synthetic one.
        variation: gains of the synthetic texture scales and of ``noise`` for this patch.

    Returns:
        ``(image, mask)``: float32 ``(1, size, size)`` in [0, 1], uint8 ``(size, size)`` that is
        1 where at least half of the pixel is covered by the lesion.
    """
    coverage = lesion_coverage(shape, size)
    if placement is None:
        background = synthetic_background_hu(rng, size, variation.texture_gains)
    else:
        background = ct_background_hu(placement, size)
    opacity = ndimage.gaussian_filter(coverage, 0.5)
    inner = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.5)
    lesion = shape.lesion_hu + 20.0 * inner / inner.std()
    image = lung_window((1 - opacity) * background + opacity * lesion)
    image = np.clip(image + rng.normal(0.0, noise * variation.noise_gain, image.shape), 0.0, 1.0)
    return image[None].astype(np.float32), (coverage >= 0.5).astype(np.uint8)


def _save_image(path: Path, image: np.ndarray) -> None:
    """Save a ``(1, H, W)`` image in [0, 1] as float32 NPY, or as 8-bit grey PNG (rounded)."""
    with atomic_path(path) as temporary:
        if path.suffix == ".png":
            grey = np.round(image[0] * 255).astype(np.uint8)
            Image.fromarray(grey).save(temporary, format="PNG")
        else:
            with open(temporary, "wb") as stream:
                np.save(stream, image)
