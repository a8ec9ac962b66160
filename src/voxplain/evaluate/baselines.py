"""Null and classical baselines of a localisation score: maps that no explanation method made.

A localisation AUC of 0.8 means little on its own: on synthetic images with a known truth
(XAI-TRIS: Clark, Wilming and Haufe, Machine Learning 2024), popular methods were often no
better than a random map or an edge filter of the input. So every localisation table
(:mod:`voxplain.steps.localisation`) scores, beside the methods and with the same scoring
function, these maps (method name, map, what is scored):

- ``baseline:random``: i.i.d. uniform values on [0, 1) per voxel, seeded (:func:`random_map`);
  scored as is;
- ``baseline:input``: the image itself (:func:`input_map`); scored on ``max(image, 0)``, the
  image for grey-matter maps;
- ``baseline:edge``: the image's gradient magnitude, Sobel per axis, per mm (:func:`edge_map`);
  scored as is;
- ``baseline:t_map``: voxel-wise Welch t of the patient sessions vs the other sessions of a
  fold's training set (:func:`welch_t_map`); scored on ``|t|``;
- ``baseline:linear_weights``: the weights ``w`` of an L2 logistic regression on the
  standardised brain voxels of that training set (:func:`linear_maps`); scored on ``|w|``;
- ``baseline:linear_pattern``: its activation pattern ``a = Cov(z) w`` (Haufe et al. 2014,
  :func:`activation_pattern`); scored on ``|a|``.

"Scored" is the relevance convention of :func:`voxplain.evaluate.localisation.relevance`: the
last three are signed maps (:data:`SIGNED`), scored on their magnitude as gradients are, since
the truth says *where*, not in which direction (the synthetic atrophy makes ``t < 0`` there).

The first three need only a session's image (:data:`SESSION_BASELINES`); the last three are
fitted to a fold's *training* sessions (:data:`TRAINING_BASELINES`), the data its classifier
learnt from, so they are what a classical analysis of that training set points at. Images with
several channels are averaged over the channels first (one value per voxel, like the maps of
the methods). :func:`compare_with_baseline` tells which explanations of a table an edge filter (or
another baseline) matches, as the report does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from voxplain.evaluate.stats import two_sample_ttest

__all__ = ["BASELINE_PREFIX", "SESSION_BASELINES", "TRAINING_BASELINES", "SIGNED",
           "baseline_method", "is_baseline", "random_map", "input_map", "edge_map",
           "welch_t_map", "activation_pattern", "linear_maps", "training_maps", "compare_with_baseline"]

#: Method names of the baselines in the localisation tables: ``baseline:NAME``.
BASELINE_PREFIX = "baseline:"
#: Baselines computed from one session's image.
SESSION_BASELINES = ("random", "input", "edge")
#: Baselines fitted to a fold's training sessions (one map per fold/run).
TRAINING_BASELINES = ("t_map", "linear_weights", "linear_pattern")
#: The sign convention of each baseline (``Explainer.signed``: scored on ``|map|``).
SIGNED = {"random": False, "input": False, "edge": False,
          "t_map": True, "linear_weights": True, "linear_pattern": True}
#: Inverse L2 penalty of the linear baseline (scikit-learn's default).
LINEAR_C = 1.0


def baseline_method(name: str) -> str:
    """The method name of baseline ``name`` in a localisation table (``baseline:edge``)."""
    if name not in SIGNED:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(SIGNED)}")
    return BASELINE_PREFIX + name


def is_baseline(method: str) -> bool:
    """Whether a localisation table's ``method`` is a baseline rather than an explanation."""
    return str(method).startswith(BASELINE_PREFIX)


def random_map(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The null map: i.i.d. uniform values on [0, 1) per voxel, ``shape``, float64."""
    return rng.uniform(size=shape)


def input_map(image: np.ndarray) -> np.ndarray:
    """The image itself, ``(C, *spatial)`` averaged over channels to ``(*spatial)``, float64."""
    return np.asarray(image, dtype=np.float64).mean(axis=0)


def edge_map(values: np.ndarray, voxel_size: tuple[float, ...] | None = None) -> np.ndarray:
    """Gradient magnitude of ``values`` ``(*spatial)``, 2D or 3D: the Sobel filter per axis.

    ``|g| = sqrt(sum_a (S_a v / (2 * 4^(d-1) * h_a))^2)``, where ``S_a`` is
    :func:`scipy.ndimage.sobel` along axis ``a`` (central difference ``[-1, 0, 1]`` along it,
    smoothing ``[1, 2, 1]`` along each of the other ``d - 1`` axes, edges repeated) and ``h_a``
    the voxel size (mm; default 1). The division makes it a derivative: a ramp rising by ``g``
    per mm has ``|g| = g`` away from the borders, a step of height 1 between two voxels
    ``1 / (2 h)`` on both sides of it.
    """
    values = np.asarray(values, dtype=np.float64)
    spacing = voxel_size or (1.0,) * values.ndim
    if len(spacing) != values.ndim:
        raise ValueError(f"voxel size {tuple(spacing)} does not match a {values.ndim}D image")
    scale = 2.0 * 4.0 ** (values.ndim - 1)
    squares = sum((ndimage.sobel(values, axis=axis, mode="nearest") / (scale * h)) ** 2
                  for axis, h in enumerate(spacing))
    return np.sqrt(squares)


def welch_t_map(patients: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """Voxel-wise Welch t statistic of two groups of maps ``(n_p, *spatial)``, ``(n_c, *spatial)``.

    ``t = (mean_p - mean_c) / sqrt(s_p^2 / n_p + s_c^2 / n_c)`` with the unbiased variances
    (:func:`voxplain.evaluate.stats.two_sample_ttest`, as ``scipy.stats.ttest_ind(equal_var=
    False)``); negative where patients have less (grey matter). A voxel with no variance in
    either group carries no evidence: 0 (the t-test leaves it NaN or infinite).
    """
    test = two_sample_ttest(np.asarray(patients, dtype=np.float64),
                            np.asarray(controls, dtype=np.float64), equal_var=False)
    return np.where(np.isfinite(test.t), test.t, 0.0)


def activation_pattern(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Activation pattern of a linear model (Haufe et al. 2014, eq. 6 with one output):
    ``a = Cov(X) w``, the covariance of every feature with the model's output ``w^T x``.

    Computed as ``X_c^T (X_c w) / (n - 1)`` (``X_c``: features centred over the ``n``
    samples) without forming the ``(V, V)`` covariance. Args: ``features`` ``(n, V)``,
    ``weights`` ``(V,)``; returns ``(V,)``.
    """
    features = np.asarray(features, dtype=np.float64)
    centred = features - features.mean(axis=0)
    return centred.T @ (centred @ np.asarray(weights, dtype=np.float64)) / (len(features) - 1)


def linear_maps(images: np.ndarray, patient: np.ndarray, brain: np.ndarray | None,
                seed: int) -> dict[str, np.ndarray]:
    """Weights and activation pattern of an L2 logistic regression, patients vs the rest.

    The features are the ``brain`` voxels (all voxels without a mask) of ``images``
    ``(n, *spatial)``, standardised (zero mean, unit variance over the sessions; a constant
    voxel stays 0); the model (C = :data:`LINEAR_C`, lbfgs, ``random_state=seed``) reads them,
    so its weights ``w`` and its pattern ``Cov(z) w`` (:func:`activation_pattern`) are those of
    that standardised space. Outside the brain both maps are 0.

    Returns:
        ``linear_weights`` and ``linear_pattern``, ``(*spatial)`` each.
    """
    images = np.asarray(images, dtype=np.float64)
    patient = np.asarray(patient, dtype=bool)
    if patient.all() or not patient.any():
        raise ValueError("a linear baseline needs training sessions of both classes")
    inside = (np.ones(images.shape[1:], dtype=bool) if brain is None
              else np.asarray(brain, dtype=bool))
    features = StandardScaler().fit_transform(images[:, inside])
    model = LogisticRegression(C=LINEAR_C, max_iter=1000, random_state=seed)
    weights = model.fit(features, patient).coef_[0]
    maps = {}
    for name, values in (("linear_weights", weights),
                         ("linear_pattern", activation_pattern(features, weights))):
        maps[name] = np.zeros(inside.shape)
        maps[name][inside] = values
    return maps


def training_maps(images: np.ndarray, patient: np.ndarray, brain: np.ndarray | None,
                  seed: int) -> dict[str, np.ndarray]:
    """The :data:`TRAINING_BASELINES` of a fold: Welch t-map and linear maps of its training
    ``images`` ``(n, C, *spatial)`` (averaged over channels) with ``patient`` ``(n,)`` bool."""
    values = np.asarray(images, dtype=np.float64).mean(axis=1)
    patient = np.asarray(patient, dtype=bool)
    return {"t_map": welch_t_map(values[patient], values[~patient]),
            **linear_maps(values, patient, brain, seed)}


def compare_with_baseline(table: pd.DataFrame, baseline: str = "edge",
                          score: str = "auc") -> pd.DataFrame | None:
    """Every explanation of a localisation table against one baseline, on the same maps.

    Pairs each explanation's rows with the baseline's rows of the same fold/run (and session,
    in a session table) where both have a ``score``, and averages each side over those pairs:
    a method whose group map exists in one fold only is compared with the baseline of that fold.

    Returns:
        One row per explanation (by ``key``; by ``method`` in a table without keys), in table
        order: ``score`` (its mean), ``baseline`` (the baseline's mean on the same maps),
        ``pairs`` and ``beats`` (``score > baseline``); None when the table has no row of that
        baseline.
    """
    if score not in table or "method" not in table:
        return None
    method = table["method"].astype(str)
    chosen = method == baseline_method(baseline)
    if not chosen.any():
        return None
    units = [column for column in ("fold", "run", "participant_id", "session_id")
             if column in table]
    by = "key" if "key" in table else "method"
    reference = table.loc[chosen, [*units, score]].rename(columns={score: "baseline"})
    reference = (reference.groupby(units, as_index=False)["baseline"].mean() if units
                 else reference.assign(baseline=reference["baseline"].mean()).iloc[:1])
    explained = table.loc[~method.map(is_baseline), [by, *units, score]]
    paired = (explained.merge(reference, on=units) if units
              else explained.assign(baseline=float(reference["baseline"].iloc[0])))
    paired = paired[paired[score].notna() & paired["baseline"].notna()]
    grouped = paired.groupby(by, sort=False)
    means = grouped[[score, "baseline"]].mean().assign(pairs=grouped.size())
    return means.assign(beats=means[score] > means["baseline"])
