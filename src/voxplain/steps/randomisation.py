"""``voxplain evaluate randomisation``: both sanity checks of Adebayo et al. (NeurIPS 2018) on a
run folder, for every method asked, fold by fold.

- **model randomisation** (section 3.1, cascading): the layers of a copy of each fold's model
  are re-initialised from the top down, and after each one the maps of the same sessions are
  compared with the trained model's (:func:`voxplain.evaluate.sanity.model_randomisation_test`);
- **data randomisation** (section 3.2): the same architecture is trained again with the same
  settings on the cohort with its diagnoses permuted between subjects (seeded; every session of a
  subject keeps one label), in the run folder ``RUN/randomisation/data/`` (a run folder of its
  own, resumable like any training); each fold's maps of the same sessions, for the same classes,
  are compared with the trained model's.

The sessions are each fold's first ``sessions`` validation sessions (cohort order), explained
for their true class. The cascade compares maps by the Spearman rank correlation of their
absolute values after each layer (its own table). The data test compares them per session by
that rank correlation (over the brain for 3D MNI images), the structural similarity (SSIM,
torchmetrics, of the absolute maps each scaled to [0, 1]) and, for 3D maps on an MNI grid, the
ROI cosine (AAL2 region means of the absolute maps); the table gives the mean over sessions.

**Pass rule** (both tests): the mean rank correlation of the fully randomised model's maps (the
last layer of the cascade; the model trained on permuted labels) with the trained model's
maps is below :data:`~voxplain.evaluate.sanity.RANDOMISATION_THRESHOLD` (0.5: at most a quarter
of the rank variance shared). A method that fails explains the input (its edges, its
intensities), not what the model learned.

Writes ``RUN/evaluation/randomisation/``: ``model_METHOD.tsv`` (one row per fold/run and layer
randomised, top down), ``data_METHOD.tsv`` (one row per fold/run) and ``summary.tsv`` (one row
per test, method and fold/run: the final rank correlation, SSIM, ROI cosine and ``passes``).
Records its settings as ``[evaluate_randomisation]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from voxplain.config import RandomisationConfig
from voxplain.data.atlas import Atlas
from voxplain.data.template import brain_mask
from voxplain.evaluate.sanity import RANDOMISATION_THRESHOLD, model_randomisation_test
from voxplain.evaluate.similarity import rank_correlation, roi_vectors
from voxplain.explain.methods import explainer
from voxplain.io import read_tsv, write_tsv
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder, RunFolderError
from voxplain.steps.context import RunContext, load_context
from voxplain.steps.train import run_train

log = logging.getLogger("voxplain")

#: Run folder (inside the run's) of the models trained on permuted diagnoses.
DATA_RUN = Path("randomisation") / "data"


def run_randomisation(config: RandomisationConfig,
                      progress: Progress | None = None) -> pd.DataFrame:
    """Both randomisation tests of every method in ``config.methods`` (module docstring);
    returns the summary table.

    Raises:
        RunFolderError: the run has no trained model, or a slice model (maps per slice).
    """
    run = RunFolder(config.run)
    run.train_config()
    run.refuse_slice_models("[evaluate_randomisation]")
    run.record_config("evaluate_randomisation", config, replace=True)
    context = load_context(run, config.device, progress)
    out = run.evaluation_dir / "randomisation"
    permuted = _permuted_run(run, config, progress) if config.data else None
    summary, model_tables, data_tables = [], {}, {}
    for fold, run_index, fitted in context.models(config.folds):
        rows = context.split_rows(fold, "validation").iloc[:config.sessions]
        x = torch.from_numpy(context.images_of(rows)).to(context.device)
        targets = [fitted.classes.index(d) for d in rows.diagnosis]
        other = None
        if permuted is not None:
            other = _permuted_model(permuted, fold, run_index, fitted.classes, context.device)
        for method in config.methods:
            table = model_randomisation_test(fitted.model, method, x, targets, seed=config.seed,
                                             **config.options.get(method, {}))
            table.insert(0, "fold", fold)
            table.insert(1, "run", run_index)
            model_tables.setdefault(method, []).append(table)
            last = table.iloc[-1]
            summary.append({"test": "model", "method": method, "fold": fold, "run": run_index,
                            "spearman_abs": last.spearman_abs, "ssim": np.nan,
                            "roi_cosine": np.nan, "n_sessions": len(rows),
                            "passes": bool(last.spearman_abs < RANDOMISATION_THRESHOLD)})
            if other is not None:
                scores = compare_maps(fitted.model, other, method, x, targets, context,
                                      **config.options.get(method, {}))
                data_tables.setdefault(method, []).append(
                    {"fold": fold, "run": run_index, **scores})
                summary.append({"test": "data", "method": method, "fold": fold,
                                "run": run_index, **scores, "n_sessions": len(rows),
                                "passes": bool(scores["spearman_abs"] < RANDOMISATION_THRESHOLD)})
            log.info("randomisation %s fold %d run %d: %s", method, fold, run_index, ", ".join(
                f"{row['test']} rho {row['spearman_abs']:.2f}" for row in summary
                if row["method"] == method and row["fold"] == fold and row["run"] == run_index))
    for method, tables in model_tables.items():
        write_tsv(out / f"model_{method}.tsv", pd.concat(tables, ignore_index=True))
    for method, records in data_tables.items():
        write_tsv(out / f"data_{method}.tsv", pd.DataFrame(records))
    table = pd.DataFrame(summary)
    write_tsv(out / "summary.tsv", table)
    return table


def permuted_cohort(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``table`` with the diagnoses permuted between subjects (each subject's sessions share
    one label; the number of subjects per diagnosis is kept), seeded."""
    subjects = table.groupby("participant_id", sort=True)["diagnosis"].first()
    labels = subjects.to_numpy()[np.random.default_rng(seed).permutation(len(subjects))]
    permuted = dict(zip(subjects.index, labels))
    return table.assign(diagnosis=table.participant_id.map(permuted))


def _permuted_run(run: RunFolder, config: RandomisationConfig,
                  progress: Progress | None) -> RunFolder:
    """Train the run's models again on permuted diagnoses in ``RUN/randomisation/data``
    (resumed when interrupted, skipped when done)."""
    folder = RunFolder(run.root / DATA_RUN)
    cohort = folder.root / "permuted_cohort.tsv"
    if not cohort.is_file():
        table = read_tsv(run.cohort_file)
        write_tsv(cohort, permuted_cohort(table, config.seed))
    train = run.train_config().model_copy(update={"cohort": cohort, "run": folder.root,
                                                  "test": None})
    run_train(train, progress)
    return folder


def _permuted_model(folder: RunFolder, fold: int, run_index: int, classes: list[str],
                    device: torch.device) -> nn.Module:
    model_dir = folder.model_dir(fold, run_index)
    if not (model_dir / "model.safetensors").is_file():
        raise RunFolderError(f"{model_dir}: the model trained on permuted labels is missing")
    model, description = load_model(model_dir, device)
    if description["classes"] != classes:
        raise RunFolderError(f"{model_dir}: classes {description['classes']} differ from the "
                             f"run's {classes}")
    return model.requires_grad_(False)


def compare_maps(model: nn.Module, other: nn.Module, method: str, x: torch.Tensor,
                 targets: list[int], context: RunContext, **options: object) -> dict[str, float]:
    """Mean over sessions of the similarity of ``method``'s maps (built with ``options``) of two
    models on ``x``: ``spearman_abs``, ``ssim`` and (3D MNI maps) ``roi_cosine``."""
    first = explainer(method, model, **options).explain(x, targets).detach().cpu().numpy()
    second = explainer(method, other, **options).explain(x, targets).detach().cpu().numpy()
    first, second = np.abs(first).sum(1), np.abs(second).sum(1)  # (N, *spatial)
    three_d = first.ndim == 4
    brain = brain_mask(context.grid) if three_d else None
    inside = brain if brain is not None and brain.any() else None
    rho = [rank_correlation(a, b, inside) for a, b in zip(first, second)]
    scores = {"spearman_abs": float(np.mean(rho)), "ssim": ssim(first, second)}
    scores["roi_cosine"] = float("nan")
    if three_d and inside is not None:
        atlas = Atlas.aal2(context.grid)
        a, b = (roi_vectors(maps, atlas, "attribution") for maps in (first, second))
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        valid = norms > 0  # a map without relevance in any region has no direction
        if valid.any():
            scores["roi_cosine"] = float(np.mean((a * b).sum(1)[valid] / norms[valid]))
    return scores


def ssim(first: np.ndarray, second: np.ndarray) -> float:
    """Mean SSIM (torchmetrics) of pairs of maps ``(N, *spatial)``, each scaled to [0, 1] by its
    own maximum (a map of zeros stays 0)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def scaled(maps: np.ndarray) -> torch.Tensor:
        peak = maps.reshape(len(maps), -1).max(1).reshape(-1, *[1] * (maps.ndim - 1))
        values = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
        return torch.from_numpy(values.astype(np.float32))[:, None]

    a, b = scaled(first), scaled(second)
    size = min(11, *[n if n % 2 else n - 1 for n in a.shape[2:]])
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=size))


__all__ = ["DATA_RUN", "compare_maps", "permuted_cohort", "run_randomisation", "ssim"]
