"""The standing validity benchmark (issue 22, item 5): explanations against a known truth, on
generated cohorts that differ in where the disease atrophies, on which grid, how hard the task
is and whether sites differ.

For each cohort: generate it, train the default CNN (2 folds), explain with every registered
method that applies to it (``cam`` needs a global-average-pooling network and ``cyce`` trained
generators: both are reported as not run, with the reason), make the group masks, and score
everything with the run-folder steps a user runs:

- localisation of the AD group maps against ``ground_truth.nii.gz`` (AUC, relevance mass inside
  the truth and its chance level, pointing game) and of every AD session map against its own
  atrophy (AUC), beside the baselines (random, input, edge filter, t-map, linear weights and
  pattern; ``voxplain evaluate localisation``);
- deletion and insertion areas (``voxplain evaluate faithfulness``, each fold's first
  :data:`SESSIONS` AD validation sessions);
- model and data randomisation (``voxplain evaluate randomisation``, the same sessions; rank
  correlation of the fully randomised / permuted-label model's maps with the trained one's,
  passes below 0.5).

    python benchmarks/validity.py [--out /tmp/voxplain-validity] [--cohorts a,b,c] [--device cpu]

Prints one table per cohort and a combined TSV (``OUT/validity.tsv``); the figures are in
benchmarks/README.md (24 minutes from empty folders on 2 CPU cores). Training, explanations
and masks resume: a second call reuses what the first wrote (the evaluations are redone);
``--tables`` only prints the tables of the runs already made.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.config import (AtrophyCohortConfig, ExplainStepConfig, FaithfulnessStepConfig,
                             GroupMaskStepConfig, LocalisationStepConfig, RandomisationConfig,
                             TrainConfig)
from voxplain.data.atlas import Atlas
from voxplain.data.template import brain_mask
from voxplain.evaluate.baselines import is_baseline
from voxplain.evaluate.localisation import atrophied_regions, localisation_scores, truth_on_grid
from voxplain.explain.methods import METHODS
from voxplain.io import read_tsv
from voxplain.run import RunFolder
from voxplain.run.maps import read_map_on_grid
from voxplain.steps.explain import run_explain
from voxplain.steps.faithfulness import run_faithfulness
from voxplain.steps.generate import run_generate_atrophy
from voxplain.steps.localisation import run_localisation
from voxplain.steps.masks import run_group_masks
from voxplain.steps.randomisation import run_randomisation
from voxplain.steps.train import run_train

#: Cheaper settings of the sampling methods (their defaults: 50 samples / steps, 25 orders):
#: region_shapley over the 120 AAL2 regions costs n_samples x 120 forward passes per session
#: (one order: each region's contribution in one random order, unbiased but noisy).
OPTIONS = {"smoothgrad": {"n_samples": 16}, "integrated_gradients": {"n_steps": 16},
           "gradient_shap": {"n_samples": 16}, "region_shapley": {"n_samples": 1}}
#: Validation sessions of each fold in the randomisation tests and the faithfulness curves.
SESSIONS = 3
#: The randomisation tests build the region methods without the atlas (cubes of ``block``
#: voxels: 640 of 4 voxels at 6 mm), so they get 8-voxel cubes (80) and one Shapley order.
RANDOMISATION_OPTIONS = {**OPTIONS, "region_ablation": {"block": 8},
                         "region_shapley": {"n_samples": 1, "block": 8}}
#: Methods not run, and why.
NOT_RUN = {"cam": "needs a global-average-pooling network (the default cnn has none)",
           "cyce": "needs generators trained against each model (benchmarks/cyce.py)"}


@dataclass(frozen=True)
class Cohort:
    """A generated cohort of the benchmark and what makes it differ from the others."""

    name: str
    what: str
    generator: dict = field(default_factory=dict)


COHORTS = {
    "medial_temporal": Cohort(
        "medial_temporal", "bilateral medial temporal, 6 mm grid, moderate",
        {"regions": ["Hippocampus_L", "Hippocampus_R", "ParaHippocampal_L",
                     "ParaHippocampal_R", "Amygdala_L", "Amygdala_R"],
         "downsample": 4, "severity": (0.1, 0.5), "heterogeneity": 0.5, "ageing": 0.03,
         "seed": 11}),
    "asymmetric_cortical": Cohort(
        "asymmetric_cortical", "left lateral temporo-parietal cortex, 5 mm grid, hard",
        {"regions": ["Temporal_Mid_L", "Temporal_Inf_L", "Parietal_Inf_L", "Angular_L",
                     "SupraMarginal_L"],
         "voxel_size": 5.0, "severity": (0.05, 0.35), "heterogeneity": 0.7, "ageing": 0.03,
         "seed": 12}),
    "diffuse_sites": Cohort(
        "diffuse_sites", "diffuse bilateral cortex, 7 mm grid, mild, 3 sites with effects",
        {"regions": ["Frontal_Sup_2_L", "Frontal_Sup_2_R", "Frontal_Mid_2_L", "Frontal_Mid_2_R",
                     "Parietal_Sup_L", "Parietal_Sup_R", "Temporal_Sup_L", "Temporal_Sup_R",
                     "Precuneus_L", "Precuneus_R", "Cingulate_Post_L", "Cingulate_Post_R"],
         "voxel_size": 7.0, "severity": (0.1, 0.3), "heterogeneity": 0.3, "sites": 3,
         "site_effects": 1.0, "seed": 13}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/voxplain-validity"))
    parser.add_argument("--cohorts", default=",".join(COHORTS))
    parser.add_argument("--subjects", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tables", action="store_true",
                        help="only print the tables of the runs already made")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()
    tables = []
    for name in arguments.cohorts.split(","):
        began = time.perf_counter()
        table = (cohort_table(name, arguments.out / name) if arguments.tables else
                 benchmark_cohort(COHORTS[name], arguments.out / name, arguments.subjects,
                                  arguments.epochs, arguments.device))
        tables.append(table)
        print(f"\n## {name}: {COHORTS[name].what} ({time.perf_counter() - began:.0f} s)")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    combined = pd.concat(tables, ignore_index=True)
    combined.to_csv(arguments.out / "validity.tsv", sep="\t", index=False)
    print("\nnot run: " + "; ".join(f"{m}: {why}" for m, why in NOT_RUN.items()))
    print(f"total {time.perf_counter() - start:.0f} s; {arguments.out / 'validity.tsv'}")


def benchmark_cohort(cohort: Cohort, root: Path, subjects: int, epochs: int,
                     device: str) -> pd.DataFrame:
    """Every step on one cohort; the per-method table (module docstring)."""
    times = {}
    clock = time.perf_counter()
    tsv = run_generate_atrophy(AtrophyCohortConfig(out=root / "cohort", subjects=subjects,
                                                   sessions=1, **cohort.generator))
    run = root / "run"
    run_train(TrainConfig(cohort=tsv, out=run, n_folds=2, epochs=epochs, batch_size=8,
                          learning_rate=3e-4, select_by="loss", device=device))
    times["generate+train"] = time.perf_counter() - clock
    methods = [method for method in METHODS if method not in NOT_RUN]
    clock = time.perf_counter()
    for method in methods:
        run_explain(ExplainStepConfig(run=run, device=device, explain={
            "method": method, "options": OPTIONS.get(method, {})}))
    times["explain"] = time.perf_counter() - clock
    clock = time.perf_counter()
    run_group_masks(GroupMaskStepConfig(run=run, device=device, mask={"max_epochs": 50}))
    times["masks"] = time.perf_counter() - clock
    clock = time.perf_counter()
    run_localisation(LocalisationStepConfig(
        run=run, against=root / "cohort" / "ground_truth.nii.gz", session_truth="atrophy_path"))
    run_faithfulness(FaithfulnessStepConfig(run=run, device=device, sessions=SESSIONS,
                                            step=0.1))
    times["localisation+faithfulness"] = time.perf_counter() - clock
    clock = time.perf_counter()
    run_randomisation(RandomisationConfig(run=run, device=device, methods=methods,
                                          sessions=SESSIONS, options=RANDOMISATION_OPTIONS))
    times["randomisation"] = time.perf_counter() - clock
    print(f"{cohort.name}: " + ", ".join(f"{step} {seconds:.0f} s"
                                         for step, seconds in times.items()))
    return cohort_table(cohort.name, root)


def mask_localisation(run: Path, truth_path: Path) -> pd.DataFrame:
    """The group masks scored as the localisation step scores a group map: the relevance
    ``1 - mask`` (what the mask hides) against the ground truth, one row per fold/run."""
    folder = RunFolder(run)
    rows = []
    for fold, run_index, _ in folder.model_dirs():
        path = folder.mask_dir("group", fold, run_index) / "mask.nii.gz"
        if not path.is_file():
            continue
        mask, grid = read_map_on_grid(path)
        truth = truth_on_grid(truth_path, grid, folder.train_config().downsample)
        atlas = Atlas.aal2(grid)
        scores = localisation_scores(1 - mask, truth, signed=False, brain=brain_mask(grid),
                                     atlas=atlas,
                                     regions=atrophied_regions(truth_path, truth, atlas))
        rows.append({"method": "group_mask", "fold": fold, "run": run_index, **scores})
    return pd.DataFrame(rows)


def cohort_table(name: str, root: Path) -> pd.DataFrame:
    """One row per method, mask and baseline of the cohort's run: the means over folds of every
    score, read from the run folder."""
    run = root / "run"
    evaluation = run / "evaluation"
    localisation = {"group": pd.concat([read_tsv(evaluation / "localisation.tsv"),
                                        mask_localisation(run, root / "cohort"
                                                          / "ground_truth.nii.gz")]),
                    "sessions": read_tsv(evaluation / "localisation_sessions.tsv")}
    faithfulness = read_tsv(evaluation / "faithfulness" / "summary.tsv")
    randomisation = read_tsv(evaluation / "randomisation" / "summary.tsv")
    group = localisation["group"].groupby("method", sort=False)
    table = group[["auc", "mass_inside", "chance_mass", "pointing_game"]].mean()
    sessions = localisation["sessions"]
    sessions = sessions[sessions.diagnosis == "AD"]
    table["session_auc"] = sessions.groupby("method")["auc"].mean()
    faithful = faithfulness.set_index("method")[["deletion_auc", "insertion_auc"]]
    table = table.join(faithful, how="outer")
    for test in ("model", "data"):
        rho = randomisation[randomisation.test == test].groupby("method")["spearman_abs"].mean()
        table[f"{test}_randomisation_rho"] = rho
    edge = table.loc["baseline:edge", "auc"] if "baseline:edge" in table.index else np.nan
    table["beats_edge"] = [bool(auc > edge) if not is_baseline(method) else np.nan
                           for method, auc in table.auc.items()]
    accuracy = [read_tsv(path).query("subset == 'validation'").balanced_accuracy.iloc[0]
                for path in sorted((run / "models").glob("fold-*/run-*/metrics.tsv"))]
    table.insert(0, "cohort", name)
    table.insert(1, "balanced_accuracy", np.mean(accuracy) if accuracy else np.nan)
    return table.reset_index(names="method")


if __name__ == "__main__":
    main()
