"""Robustness of group masks across datasets (paper 1, 3.2.1; issue 19, item 5).

A run is trained on synthetic cohort A (patients lose grey matter in the medial temporal lobes
and the precunei); its models are then applied to cohort B (the same atrophy, another seed) and
to cohort C (atrophy in the precunei only). Each fold's group mask on A is compared with its
group mask on B and on C: ROI cosine (AAL2) and prob_CNN (each mask applied to the other
dataset's correctly classified patients). The masks of B should agree with A's more than C's.

    python benchmarks/external_cohorts.py [--out /tmp/external] [--epochs 150] [--folds 0,1]

Prints the per-fold table of each comparison; the figures are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from voxplain.config import (AtrophyCohortConfig, GroupMaskStepConfig, PredictConfig,
                             RobustnessConfig, TrainConfig)
from voxplain.io import read_tsv
from voxplain.run import cohort_label
from voxplain.steps.generate import run_generate_atrophy
from voxplain.steps.masks import run_group_masks
from voxplain.steps.predict import run_predict
from voxplain.steps.robustness import run_robustness
from voxplain.steps.train import run_train

MEDIAL_TEMPORAL = ["Hippocampus_L", "Hippocampus_R", "ParaHippocampal_L", "ParaHippocampal_R"]
PRECUNEUS = ["Precuneus_L", "Precuneus_R"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/voxplain-external"))
    parser.add_argument("--epochs", type=int, default=150, help="group-mask epochs at most")
    parser.add_argument("--folds", default="0,1", help="folds whose masks are made")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    root, folds = arguments.out, [int(f) for f in arguments.folds.split(",")]
    start = time.perf_counter()
    cohorts = {}
    for name, regions, seed in (("a", MEDIAL_TEMPORAL + PRECUNEUS, 0),
                                ("b", MEDIAL_TEMPORAL + PRECUNEUS, 1), ("c", PRECUNEUS, 2)):
        cohorts[name] = root / name / "cohort.tsv"
        if not cohorts[name].is_file():
            run_generate_atrophy(AtrophyCohortConfig(
                out=root / name, regions=regions, seed=seed, subjects=40, sessions=1,
                downsample=4, severity=(0.4, 0.6)))
    run = root / "run"
    if not (run / "models").is_dir():
        run_train(TrainConfig(cohort=cohorts["a"], out=run, n_folds=2, epochs=30, batch_size=8,
                              learning_rate=1e-3, device="cpu",
                              model={"name": "cnn", "channels": [4, 8, 16, 16]}))
    print(f"cohorts and training: {time.perf_counter() - start:.0f} s")
    mask = {"max_epochs": arguments.epochs, "patience": 25}
    run_group_masks(GroupMaskStepConfig(run=run, folds=folds, device="cpu", mask=mask))
    for name in "bc":
        run_predict(PredictConfig(run=run, cohort=cohorts[name], device="cpu"))
        run_group_masks(GroupMaskStepConfig(run=run, folds=folds, device="cpu",
                                            cohort=cohorts[name], mask=mask))
    run_robustness(RobustnessConfig(run=run, methods=["mask"], prob_cnn=True,
                                    include_flagged=True, device="cpu"))
    for name, what in (("b", "same atrophy, another seed"), ("c", "precunei only")):
        label = cohort_label(cohorts[name])
        metrics = read_tsv(run / "evaluation" / f"cohort-{label}" / "classification.tsv")
        accuracy = metrics[(metrics.metric == "balanced_accuracy") & (metrics.scope == "fold")]
        table = read_tsv(run / "evaluation/robustness/mask" / f"datasets_cohort-{label}.tsv")
        print(f"\ncohort {name} ({what}); balanced accuracy per fold "
              f"{', '.join(f'{v:.3f}' for v in accuracy.value)}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
