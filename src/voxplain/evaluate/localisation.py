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

On a run folder, :func:`evaluate_localisation` scores the group map of the patient class of every
explanation method and fold/run (``voxplain explain --evaluate-against ground_truth.nii.gz``)
and writes ``evaluation/localisation.tsv``. The ground truth must lie on the cohort's grid; when
the run was trained on downsampled images, it is downsampled the same way
(:func:`voxplain.data.grid.downsample`, block average) before it is binarised. Brain voxels are
those of the MNI GM template's brain mask on that grid (:func:`voxplain.data.template.brain_mask`).

When every session has a ground truth of its own (the lesion masks of
:mod:`voxplain.data.lesions`, column ``mask_path`` of its cohort.tsv: lesions lie at different
places, so a group map means nothing), :func:`evaluate_session_localisation` scores every session
map against its session's truth instead (``voxplain explain --session-truth mask_path``) and
writes ``evaluation/localisation_sessions.tsv``: one row per map, same scores and conventions
(2D maps are scored over the whole image).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, stats

from voxplain.config import LocalisationConfig
from voxplain.data.atlas import Atlas
from voxplain.data.cohort import CONTROL_LABELS
from voxplain.data.grid import Grid, downsample, downsample_affine, downsampled_shape
from voxplain.data.template import brain_mask
from voxplain.evaluate.regions import region_means, top_regions
from voxplain.explain.explain_steps import explanation_dir, read_map
from voxplain.io import read_tsv, write_tsv
from voxplain.models.serialization import read_model_json
from voxplain.run import RunFolder

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


def _within(values: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
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
    inside = _within(relevance_map, brain)
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
    inside = _within(values, brain)
    total = values[inside].sum()
    if total <= 0:
        return float("nan")
    return float(values[inside & np.asarray(truth, dtype=bool)].sum() / total)


def chance_mass(truth: np.ndarray, brain: np.ndarray | None = None) -> float:
    """Relevance mass inside ``truth`` of a uniform map: the share of scored voxels in it."""
    inside = _within(truth, brain)
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
    inside = _within(values, brain)
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
    top = (top_region_hit_rate(values, atlas, regions, k) if atlas is not None and regions
           else float("nan"))
    return {"auc": localisation_auc(values, positive, brain),
            "mass_inside": relevance_mass_inside(values, positive, brain),
            "chance_mass": chance_mass(positive, brain),
            "pointing_game": float(pointing_game(values, positive, brain, tolerance)),
            f"top{k}_hit": top}


def patient_class(classes: Sequence[str], diagnosis: str | None = None) -> str:
    """The class whose group map is scored: ``diagnosis`` if given, else the only class that is
    not a control label (CN, HC, ...)."""
    if diagnosis is not None:
        if diagnosis not in classes:
            raise ValueError(f"diagnosis {diagnosis!r} is not a class of the model {list(classes)}")
        return diagnosis
    patients = [name for name in classes if name not in CONTROL_LABELS]
    if len(patients) != 1:
        raise ValueError(f"cannot tell the patient class among {list(classes)}: name it "
                         "(diagnosis=...)")
    return patients[0]


def truth_on_grid(truth_path: Path, grid: Grid, factor: int) -> np.ndarray:
    """The ground truth on the maps' ``grid``: as it is, or downsampled by the run's ``factor``.

    Raises:
        ValueError: the ground truth lies on another grid (the message gives both).
    """
    truth_path = Path(truth_path)
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: ground-truth map not found")
    if truth_path.suffix == ".npy":
        truth, affine = np.load(truth_path).astype(np.float32), None
    else:
        image = nib.load(truth_path)
        truth, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
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


def evaluate_localisation(run: Path, truth_path: Path, methods: Sequence[str] | None = None,
                          diagnosis: str | None = None,
                          config: LocalisationConfig | None = None) -> pd.DataFrame:
    """Score the patient-class group map of every explanation in ``run`` against ``truth_path``.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        truth_path: ground-truth map of the cohort (e.g. ``ground_truth.nii.gz``).
        methods: only these method names (default: every explanation found).
        diagnosis: the class whose group map is scored (default: the non-control class).
        config: truth fraction, pointing-game tolerance, k of the region hit rate.

    Returns:
        One row per explanation and fold/run (method, layer, fold, run, diagnosis, n_sessions,
        auc, mass_inside, chance_mass, pointing_game, top{k}_hit, key); also written to
        ``RUN/evaluation/localisation.tsv``.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows = []
    for key, record in _explanations(folder, methods):
        for fold, run_index, model_dir in folder.model_dirs():
            patient = patient_class(read_model_json(model_dir)["classes"], diagnosis)
            row = _score_group_map(explanation_dir(folder, key, fold, run_index), patient,
                                   record, truth_path, train.downsample, config)
            if row is not None:
                rows.append({"key": key, "fold": fold, "run": run_index, **row})
    if not rows:
        raise ValueError(f"{folder.root}: no group map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    columns = ["method", "layer", "fold", "run", "diagnosis", "n_sessions", "auc", "mass_inside",
               "chance_mass", "pointing_game", f"top{config.top_k}_hit", "key"]
    table = pd.DataFrame(rows)[columns]
    write_tsv(folder.root / "evaluation" / "localisation.tsv", table)
    return table


def _explanations(folder: RunFolder, methods: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    """``(key, explanation.json)`` of every explanation in the run (of ``methods`` only)."""
    for record_file in sorted((folder.root / "explanations").glob("*/explanation.json")):
        record = json.loads(record_file.read_text())
        if methods is None or record["method"] in methods:
            yield record_file.parent.name, record


def _score_group_map(folder: Path, patient: str, record: dict, truth_path: Path, factor: int,
                     config: LocalisationConfig) -> dict | None:
    """Scores of ``folder``'s ``group_<patient>`` map (None when the fold/run has none)."""
    found = [path for path in (folder / f"group_{patient}.nii.gz", folder / f"group_{patient}.npy")
             if path.is_file()]
    if not found or not (folder / "index.tsv").is_file():
        return None
    values, grid = _map_on_grid(found[0])
    truth = truth_on_grid(truth_path, grid, factor)
    three_d = values.ndim == 3
    atlas = Atlas.aal2(grid) if three_d else None
    regions = atrophied_regions(truth_path, truth, atlas) if three_d else None
    index = read_tsv(folder / "index.tsv")
    kept = index[index.diagnosis == patient]
    if record.get("group", "correct") == "correct":
        kept = kept[kept.correct.astype(bool)]
    scores = localisation_scores(
        values, truth, signed=record["signed"], brain=brain_mask(grid) if three_d else None,
        fraction=config.truth_fraction, tolerance=config.tolerance, atlas=atlas,
        regions=regions, k=config.top_k)
    layer = str(index.layer.iloc[0]) if "layer" in index and index.layer.notna().any() else ""
    return {"method": record["method"], "layer": layer, "diagnosis": patient,
            "n_sessions": len(kept), **scores}


#: The scores of a session map (the region hit rate needs a group truth's list of regions).
SESSION_SCORES = ("auc", "mass_inside", "chance_mass", "pointing_game")


def _map_on_grid(path: Path) -> tuple[np.ndarray, Grid]:
    """A saved map and its grid (NPY maps: the identity affine)."""
    values = read_map(path)
    affine = nib.load(path).affine if path.name.endswith(".nii.gz") else np.eye(4)
    return values, Grid(values.shape, affine)


def evaluate_session_localisation(run: Path, column: str, methods: Sequence[str] | None = None,
                                  config: LocalisationConfig | None = None) -> pd.DataFrame:
    """Score every session map in ``run`` against that session's own ground truth.

    Args:
        run: run folder with ``explanations/KEY/...`` written by ``voxplain explain``.
        column: the column of the explained cohort's TSV that names each session's truth file
            (NPY or NIfTI on the image grid, e.g. ``mask_path`` of a lesion cohort); a relative
            path is relative to the folder of the cohort TSV given to ``voxplain train`` (or to
            ``voxplain explain --cohort``).
        methods: only these method names (default: every explanation found).
        config: truth fraction and pointing-game tolerance.

    Returns:
        One row per map (key, method, layer, fold, run, participant_id, session_id, diagnosis,
        target, correct, truth_voxels, auc, mass_inside, chance_mass, pointing_game; the scores
        are NaN where the truth is empty, e.g. a control's zero atrophy); also written to
        ``RUN/evaluation/localisation_sessions.tsv``.

    Raises:
        ValueError: no explained cohort has the column (explanations of a cohort without it
            are skipped, with a log message), a session has no truth file named, or no session
            map was found.
        FileNotFoundError: a named truth file is missing.
    """
    config = config or LocalisationConfig()
    folder = RunFolder(Path(run))
    train = folder.train_config()
    rows, without = [], {}
    for key, record in _explanations(folder, methods):
        source = Path(record["cohort"]) if record.get("cohort") else folder.cohort_file
        table = read_tsv(source)
        if column not in table.columns:
            without[source] = list(table.columns)
            log.info("%s: not scored, its cohort %s has no column %r", key, source, column)
            continue
        base = Path(record.get("cohort") or train.cohort).parent
        truths = _session_truths(source, table, column, base)
        for fold, run_index, _ in folder.model_dirs():
            maps = explanation_dir(folder, key, fold, run_index)
            if not (maps / "index.tsv").is_file():
                continue
            index = read_tsv(maps / "index.tsv")
            layer = (str(index.layer.iloc[0]) if "layer" in index and index.layer.notna().any()
                     else "")
            for session in index.itertuples():
                values, grid = _map_on_grid(maps / session.path)
                truth = truth_on_grid(truths[(session.participant_id, session.session_id)], grid,
                                      train.downsample)
                brain = brain_mask(grid) if values.ndim == 3 else None
                voxels = int(true_region(truth, config.truth_fraction)[_within(truth, brain)]
                             .sum())
                scores = dict.fromkeys(SESSION_SCORES, float("nan"))
                if voxels:  # a session without truth (a control's zero atrophy) has no score
                    scores = localisation_scores(
                        values, truth, signed=record["signed"], brain=brain,
                        fraction=config.truth_fraction, tolerance=config.tolerance)
                    scores.pop(f"top{config.top_k}_hit")
                rows.append({"key": key, "method": record["method"], "layer": layer,
                             "fold": fold, "run": run_index,
                             "participant_id": session.participant_id,
                             "session_id": session.session_id, "diagnosis": session.diagnosis,
                             "target": session.target, "correct": bool(session.correct),
                             "truth_voxels": voxels, **scores})
    if not rows and without:
        raise ValueError("; ".join(f"{source}: no column {column!r} naming each session's ground "
                                   f"truth; columns are {columns}"
                                   for source, columns in without.items()))
    if not rows:
        raise ValueError(f"{folder.root}: no session map to score"
                         f"{' for ' + ', '.join(methods) if methods else ''}; "
                         "run `voxplain explain` first")
    scored = pd.DataFrame(rows)
    write_tsv(folder.root / "evaluation" / "localisation_sessions.tsv", scored)
    return scored


def _session_truths(source: Path, table: pd.DataFrame, column: str,
                    base: Path) -> dict[tuple[str, str], Path]:
    """``(participant, session) -> truth file`` from ``column`` of the cohort ``table`` read from
    ``source``; relative paths are relative to ``base``."""
    truths = {}
    for participant, session, value in zip(table.participant_id, table.session_id, table[column]):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: {participant} {session}: no ground truth in {column!r}")
        path = Path(value)
        truths[(participant, session)] = path if path.is_absolute() else base / path
    return truths


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
              if column in ("auc", "mass_inside", "chance_mass", "pointing_game")
              or (column.startswith("top") and column.endswith("_hit"))]
    grouped = table.groupby(["key", "method", "layer"], sort=False)
    summary = grouped[scores].mean().reset_index()
    summary.insert(3, "models", grouped.size().to_numpy())
    return summary
