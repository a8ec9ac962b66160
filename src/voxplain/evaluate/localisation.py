"""Ground-truth localisation: does a map point at the regions that truly carry the signal?

Synthetic cohorts (:mod:`voxplain.data.synthetic`) record where the patients lose grey matter, so
an explanation can be *measured*, not only looked at. Conventions, shared by every score:

- **Relevance.** Localisation asks *where* a map puts its weight, not in which direction. A
  signed map (gradients, integrated gradients, LRP, ...) is scored on ``|map|``; an unsigned map
  (Grad-CAM, masks turned into ``1 - m``, ...) on its positive part ``max(map, 0)`` (Grad-CAM is
  non-negative already, so this changes nothing for it). See :func:`relevance`.
- **Truth.** The true region is where the ground-truth map reaches at least ``fraction`` of its
  maximum (default 0.5, the half maximum; :func:`true_region`). For the synthetic atrophy, whose
  pattern is the Gaussian-smoothed indicator of the chosen AAL2 regions, that is the regions
  themselves (the smoothed indicator is 0.5 at their border); for a binary lesion mask, the mask;
  for a session's own atrophy map (peak ``s_k``), the same regions scaled to that session. An
  earlier default took every voxel the smoothed pattern touches at all (``fraction = 0``): on the
  demo grid that is 29 % of the brain, mostly Gaussian tails where grey matter changes by less
  than a thousandth, and the voxel-wise t-map of the data itself scored an AUC of 0.59 against
  it (0.999 against the half-maximum region).
- **Brain.** Scores are computed over brain voxels only (a boolean mask, e.g.
  :func:`voxplain.data.template.brain_mask`); background voxels are neither hits nor misses.
  Voxels where the map has no value (NaN: the slices a slice model did not read) are left out
  the same way by :func:`localisation_scores`.

Scores:

- :func:`localisation_auc`: ROC AUC of the relevance as a score for "voxel is in the true
  region" (Mann-Whitney U with average ranks for ties, as scikit-learn's ``roc_auc_score``);
  0.5 is chance, 1 a perfect separation.
- :func:`relevance_mass_inside`: share of the relevance mass inside the true region (the
  "relevance mass accuracy" of Arras et al. 2022, CLEVR-XAI); chance level is the share of brain
  voxels inside the true region (:func:`chance_mass`).
- :func:`pointing_game`: is the map's maximum inside the true region (within ``tolerance``
  voxels)? Every voxel that attains the maximum must be, so a constant map does not score.
- :func:`top_region_hit_rate`: of the ``k`` AAL2 regions with the highest mean relevance, the
  share that are truly affected (hits / min(k, number of true regions), so 1 is attainable
  when fewer than ``k`` regions are affected).

All scores are vectorised numpy over the whole grid; 2D and 3D maps share the code (the region
score needs an atlas, i.e. a 3D grid).

On a run folder, :func:`voxplain.steps.localisation.evaluate_localisation` scores the group map
of the patient class of every explanation method and fold/run (``voxplain evaluate localisation
--against ground_truth.nii.gz``) and writes ``evaluation/localisation.tsv``. The ground truth must lie on the cohort's grid; when
the run was trained on downsampled images, it is downsampled the same way
(:func:`voxplain.data.grid.downsample`, block average) before it is binarised. Brain voxels are
those of the MNI GM template's brain mask on that grid (:func:`voxplain.data.template.brain_mask`).

When every session has a ground truth of its own (the lesion masks of
:mod:`voxplain.data.lesions`, column ``mask_path`` of its cohort.tsv: lesions lie at different
places, so a group map means nothing), :func:`voxplain.steps.localisation.
evaluate_session_localisation` scores every session map against its session's truth instead
(``voxplain evaluate localisation --session-truth mask_path``) and
writes ``evaluation/localisation_sessions.tsv``: one row per map, same scores and conventions
(2D maps are scored over the whole image).

Both tables also score maps no explanation method made (a random map, the input, its edge
filter, the training set's t-map and a linear classifier's weights and pattern; method names
``baseline:NAME``, :mod:`voxplain.evaluate.baselines`), so that a score can be read against
what these reach on the same sessions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid, downsample, downsample_affine, downsampled_shape
from voxplain.data.images import read_image
from voxplain.data.regions import region_means, top_regions

log = logging.getLogger("voxplain")


def relevance(attribution: np.ndarray, signed: bool) -> np.ndarray:
    """What the scores measure: ``|attribution|`` for a signed map, ``max(attribution, 0)``
    for an unsigned one; float64, same shape."""
    values = np.asarray(attribution, dtype=np.float64)
    return np.abs(values) if signed else np.maximum(values, 0.0)


def true_region(truth: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Boolean ground truth: voxels where ``truth`` reaches at least ``fraction`` of its maximum
    (``fraction = 0``: every voxel where it is above 0). An all-zero truth (a control's atrophy)
    has no true region."""
    truth = np.asarray(truth)
    peak = float(truth.max()) if truth.size else 0.0
    if peak <= 0:
        return np.zeros(truth.shape, dtype=bool)
    return truth > 0 if fraction == 0 else truth >= fraction * peak


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``positive`` (same shape), ties counted half.

    Computed as the Mann-Whitney U statistic from average ranks, ``U / (n_pos n_neg)``, which
    equals the area under the empirical ROC curve. NaN when one class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_positive = int(positive.sum())
    n_negative = positive.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    u = ranks[positive].sum() - n_positive * (n_positive + 1) / 2
    return float(u / (n_positive * n_negative))


def scored_voxels(values: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    """Boolean selection of the voxels scored (the brain, or all voxels)."""
    if brain is None:
        return np.ones(np.shape(values), dtype=bool)
    brain = np.asarray(brain, dtype=bool)
    if brain.shape != np.shape(values):
        raise ValueError(f"brain mask shape {brain.shape} differs from the map's "
                         f"{np.shape(values)}")
    return brain


def _check_shapes(relevance_map: np.ndarray, truth: np.ndarray) -> None:
    if np.shape(relevance_map) != np.shape(truth):
        raise ValueError(f"map shape {np.shape(relevance_map)} differs from the ground truth's "
                         f"{np.shape(truth)}; put both on one grid first")


def localisation_auc(relevance_map: np.ndarray, truth: np.ndarray,
                     brain: np.ndarray | None = None) -> float:
    """ROC AUC of ``relevance_map`` against the boolean ``truth`` over ``brain`` voxels."""
    _check_shapes(relevance_map, truth)
    inside = scored_voxels(relevance_map, brain)
    return roc_auc(np.asarray(relevance_map)[inside], np.asarray(truth, dtype=bool)[inside])


def relevance_mass_inside(relevance_map: np.ndarray, truth: np.ndarray,
                          brain: np.ndarray | None = None) -> float:
    """Share of the (non-negative) relevance mass over ``brain`` that lies in ``truth``.

    NaN for a map with no mass; an error for negative values (pass the map through
    :func:`relevance` first).
    """
    _check_shapes(relevance_map, truth)
    values = np.asarray(relevance_map, dtype=np.float64)
    if (values < 0).any():
        raise ValueError("relevance mass needs a non-negative map; use relevance(map, signed)")
    inside = scored_voxels(values, brain)
    total = values[inside].sum()
    if total <= 0:
        return float("nan")
    return float(values[inside & np.asarray(truth, dtype=bool)].sum() / total)


def chance_mass(truth: np.ndarray, brain: np.ndarray | None = None) -> float:
    """Relevance mass inside ``truth`` of a uniform map: the share of scored voxels in it."""
    inside = scored_voxels(truth, brain)
    return float(np.asarray(truth, dtype=bool)[inside].mean())


def pointing_game(relevance_map: np.ndarray, truth: np.ndarray,
                  brain: np.ndarray | None = None, tolerance: float = 0.0) -> bool:
    """True when every voxel attaining the maximum of the map over ``brain`` lies within
    ``tolerance`` voxels (Euclidean, on the voxel grid) of the true region."""
    _check_shapes(relevance_map, truth)
    truth = np.asarray(truth, dtype=bool)
    if not truth.any():
        raise ValueError("the ground truth holds no voxel: nothing to point at")
    values = np.asarray(relevance_map, dtype=np.float64)
    inside = scored_voxels(values, brain)
    if not inside.any():
        raise ValueError("the brain mask holds no voxel")
    peaks = inside & (values == values[inside].max())
    reach = truth if tolerance == 0 else ndimage.distance_transform_edt(~truth) <= tolerance
    return bool(reach[peaks].all())


def top_region_hit_rate(relevance_map: np.ndarray, atlas: Atlas, regions: Sequence[str],
                        k: int = 5) -> float:
    """Share of the ``k`` regions with the highest mean relevance that are among ``regions``,
    out of ``min(k, len(regions))``."""
    if not regions:
        raise ValueError("no true region to compare the top regions with")
    atlas.region_mask(list(regions))  # unknown names are an error that suggests close ones
    top = top_regions(np.asarray(relevance_map, dtype=np.float64), atlas, k)
    return len(set(top) & set(regions)) / min(k, len(set(regions)))


def atrophied_regions(truth_path: Path, truth: np.ndarray | None = None,
                      atlas: Atlas | None = None) -> list[str]:
    """The truly affected regions of a ground-truth map.

    The synthetic generator names them in ``generator.json`` next to ``ground_truth.nii.gz``;
    without that file, the atlas regions whose mean ground truth is at least 0.5 (``truth`` and
    ``atlas`` on one grid are then needed).
    """
    record = Path(truth_path).parent / "generator.json"
    if record.is_file():
        regions = json.loads(record.read_text()).get("regions")
        if regions:
            return list(regions)
    if truth is None or atlas is None:
        raise ValueError(f"{truth_path}: no generator.json next to it naming the true regions")
    means = region_means(np.asarray(truth, dtype=np.float64), atlas)
    return list(means.index[means.to_numpy() >= 0.5])


def seen_at_layer(values: np.ndarray, layer_shape: Sequence[int]) -> np.ndarray:
    """``values`` as a layer of ``layer_shape`` would see and a class activation map would draw
    them: averaged over each cell of the layer's grid (adaptive average pooling), then upsampled
    back to ``values``' grid (linear interpolation, ``align_corners=False``, as
    :func:`voxplain.explain.cam.to_input_grid`); float32, ``values``' shape (2D or 3D)."""
    import torch
    import torch.nn.functional as F

    from voxplain.explain.cam import to_input_grid

    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    spatial = tuple(tensor.shape[2:])
    if len(layer_shape) != len(spatial) or len(spatial) not in (2, 3):
        raise ValueError(f"layer grid {tuple(layer_shape)} and map {spatial} differ in "
                         "dimensions (2D or 3D, one each)")
    pool = F.adaptive_avg_pool3d if len(spatial) == 3 else F.adaptive_avg_pool2d
    coarse = pool(tensor, tuple(int(n) for n in layer_shape))
    return to_input_grid(coarse, spatial, normalise=False)[0, 0].numpy()


def resolution_ceiling(truth: np.ndarray, layer_shape: Sequence[int],
                       brain: np.ndarray | None = None, fraction: float = 0.5) -> float:
    """Localisation AUC of the ground truth itself seen at a layer's resolution
    (:func:`seen_at_layer`), scored against the true region of ``truth``.

    A CAM-family map is drawn on the layer's grid and upsampled the same way; this map is what
    such a map would be if the layer saw exactly the truth, so a CAM's AUC well above it is
    unlikely and a CAM's AUC near it is as good as its layer allows (an approximate ceiling,
    not a bound: another pattern on the coarse grid can rank voxels differently). At the
    input's own resolution it is 1 (a truth with a true region and voxels outside it).
    """
    return localisation_auc(seen_at_layer(truth, layer_shape), true_region(truth, fraction),
                            brain)


def share_outside(relevance_map: np.ndarray, inside: np.ndarray) -> float:
    """Share of a non-negative map's mass that lies outside the boolean ``inside`` (e.g. the
    brain); NaN for a map with no mass."""
    return 1.0 - relevance_mass_inside(relevance_map, inside)


def brain_outside_at_layer(brain: np.ndarray, layer_shape: Sequence[int]) -> float:
    """Share of the brain mask's own mass outside the brain once seen at a layer's resolution
    (:func:`seen_at_layer`): how much relevance even a map uniform over the brain and nowhere
    else would put outside it, drawn on that layer's grid. The part of a CAM's relevance
    outside the brain that its layer's resolution explains; 0 at the input's own grid."""
    return share_outside(seen_at_layer(brain, layer_shape), brain)


def localisation_scores(attribution: np.ndarray, truth: np.ndarray, *, signed: bool,
                        brain: np.ndarray | None = None, fraction: float = 0.5,
                        tolerance: float = 0.0, atlas: Atlas | None = None,
                        regions: Sequence[str] | None = None, k: int = 5) -> dict[str, float]:
    """Every score of one map against one ground truth (see the module docstring).

    Args:
        attribution: the map, ``(*spatial)``.
        truth: ground-truth map on the same grid (its true region: :func:`true_region` with
            ``fraction`` of its maximum).
        signed: the method's sign convention (``Explainer.signed``).
        brain: boolean mask of the scored voxels (default: all).
        atlas, regions: AAL2 on the grid and the truly affected regions, for ``top{k}_hit``
            (NaN without them).

    Returns:
        ``auc``, ``mass_inside``, ``chance_mass``, ``pointing_game`` (0 or 1), ``top{k}_hit``.
    """
    values = relevance(attribution, signed)
    positive = true_region(truth, fraction)
    mapped = np.isfinite(values)
    if not mapped.all():  # voxels without a value are not scored
        brain = mapped if brain is None else np.asarray(brain, dtype=bool) & mapped
        values = np.where(mapped, values, 0.0)
    top = (top_region_hit_rate(values, atlas, regions, k) if atlas is not None and regions
           else float("nan"))
    return {"auc": localisation_auc(values, positive, brain),
            "mass_inside": relevance_mass_inside(values, positive, brain),
            "chance_mass": chance_mass(positive, brain),
            "pointing_game": float(pointing_game(values, positive, brain, tolerance)),
            f"top{k}_hit": top}


def truth_on_grid(truth_path: Path, grid: Grid, factor: int) -> np.ndarray:
    """The ground truth on the maps' ``grid``: as it is, or downsampled by the run's ``factor``.

    Raises:
        ValueError: the ground truth lies on another grid (the message gives both).
    """
    truth_path = Path(truth_path)
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: ground-truth map not found")
    if truth_path.suffix == ".npy":  # lesion masks: an array without a grid, matched by shape
        truth, affine = np.load(truth_path).astype(np.float32), None
    else:  # NIfTI: a volume, or a 2D truth stored as one slice (H, W, 1) like the 2D maps
        image, affine = read_image(truth_path)
        truth = image[0]
    same = tuple(truth.shape) == tuple(grid.shape)
    if same and (affine is None or np.allclose(affine, grid.affine, atol=1e-4)):
        return truth
    coarse = downsampled_shape(truth.shape, factor) == tuple(grid.shape)
    if factor > 1 and coarse and (affine is None or np.allclose(
            downsample_affine(affine, factor, truth.ndim), grid.affine, atol=1e-4)):
        return downsample(truth, factor)
    raise ValueError(f"{truth_path}: ground truth of shape {truth.shape} is on another grid than "
                     f"the maps ({tuple(grid.shape)}, images downsampled by {factor}); "
                     "give the ground truth of the run's cohort")


#: The scores of a session map (the region hit rate needs a group truth's list of regions).
SESSION_SCORES = ("auc", "mass_inside", "chance_mass", "pointing_game")


def session_localisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each score over the session maps of every explanation and diagnosis; ``maps``
    counts them, ``scored`` those whose truth is not empty (the others have no scores)."""
    table = table.assign(layer=table.layer.astype(object).fillna(""),  # TSV: "" reads as NaN
                         scored=table.truth_voxels > 0)
    grouped = table.groupby(["key", "method", "layer", "diagnosis"], sort=False)
    summary = grouped[list(SESSION_SCORES)].mean().reset_index()
    summary.insert(4, "maps", grouped.size().to_numpy())
    summary.insert(5, "scored", grouped.scored.sum().to_numpy())
    return summary


def localisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each score over the fold/runs of every explanation (one row per method key)."""
    scores = [column for column in table.columns
              if column in ("auc", "mass_inside", "chance_mass", "pointing_game",
                            "auc_at_layer_resolution")
              or (column.startswith("top") and column.endswith("_hit"))]
    grouped = table.groupby(["key", "method", "layer"], sort=False)
    summary = grouped[scores].mean().reset_index()
    summary.insert(3, "models", grouped.size().to_numpy())
    return summary
