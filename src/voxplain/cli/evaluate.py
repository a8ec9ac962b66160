"""``voxplain evaluate classification|robustness`` and ``voxplain stats``."""

from __future__ import annotations

from pathlib import Path

import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    console,
    option,
    print_table,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import ClassificationEvaluationConfig, RobustnessConfig, StatsConfig

evaluate = typer.Typer(help="Classification metrics and robustness of explanations.",
                       no_args_is_help=True)


@evaluate.command("classification")
def evaluate_classification(
    run: Path = option(ClassificationEvaluationConfig, "run", "--run"),
    subset: str = option(ClassificationEvaluationConfig, "subset", "--subset"),
    n_boot: int = option(ClassificationEvaluationConfig, "n_boot", "--n-boot"),
    seed: int = option(ClassificationEvaluationConfig, "seed", "--seed"),
    level: float = option(ClassificationEvaluationConfig, "level", "--level"),
    positive: str = option(ClassificationEvaluationConfig, "positive", "--positive"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Metrics with bootstrap CIs per fold and over folds -> RUN/evaluation/classification.tsv."""
    from voxplain.evaluate.classification import cross_validation_metrics
    from voxplain.io import write_tsv

    setup_logging()
    settings = build_config(ClassificationEvaluationConfig, "evaluate_classification", config,
                            run=absolute(run), subset=subset, n_boot=n_boot, seed=seed,
                            level=level, positive=positive)
    with reported_errors():
        table = cross_validation_metrics(settings.run, settings.subset, settings.n_boot,
                                         settings.seed, settings.level,
                                         positive=settings.positive)
    path = settings.run / "evaluation" / "classification.tsv"
    write_tsv(path, table)
    means = table[table.scope == "mean"].assign(
        ci=lambda t: [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(t.ci_low, t.ci_high)])
    print_table(f"Classification ({settings.subset}, mean over folds, "
                f"{settings.level:.0%} bootstrap CI)", means,
                ["run", "metric", "value", "ci", "per_fold"])
    console.print(f"written {path}")


@evaluate.command("robustness")
def evaluate_robustness_command(
    run: Path = option(RobustnessConfig, "run", "--run"),
    methods: str = option(RobustnessConfig, "methods", "--methods"),
    other_run: Path = option(RobustnessConfig, "other_run", "--other-run"),
    prob_cnn: bool = option(RobustnessConfig, "prob_cnn", "--prob-cnn"),
    batch_size: int = option(RobustnessConfig, "batch_size", "--batch-size"),
    device: str = option(RobustnessConfig, "device", "--device"),
    include_flagged: bool = option(RobustnessConfig, "include_flagged", "--include-flagged"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Similarity of maps across folds, runs, sessions, hyperparameters and datasets
    -> RUN/evaluation/robustness/ (skips what the run folder does not hold yet)."""
    from voxplain.evaluate.robustness import evaluate_robustness

    setup_logging()
    settings = build_config(RobustnessConfig, "evaluate_robustness", config, run=absolute(run),
                            methods=split_list(methods), other_run=absolute(other_run),
                            prob_cnn=prob_cnn, batch_size=batch_size, device=device,
                            include_flagged=include_flagged)
    with reported_errors():
        summary = evaluate_robustness(settings)
    print_table("Robustness (mean of pairs)", summary,
                ["method", "experiment", "diagnosis", "metric", "mean", "sd", "median",
                 "n_pairs", "n_subjects"])
    console.print(f"written {settings.run / 'evaluation' / 'robustness'}")


def stats(
    run: Path = option(StatsConfig, "run", "--run"),
    method: str = option(StatsConfig, "method", "--method"),
    groups: str = option(StatsConfig, "groups", "--groups"),
    folds: str = option(StatsConfig, "folds", "--folds"),
    percentile: float = option(StatsConfig, "percentile", "--percentile"),
    correction: str = option(StatsConfig, "correction", "--correction"),
    alpha: float = option(StatsConfig, "alpha", "--alpha"),
    equal_var: bool = option(StatsConfig, "equal_var", "--equal-var/--welch"),
    connectivity: int = option(StatsConfig, "connectivity", "--connectivity"),
    unit: str = option(StatsConfig, "unit", "--unit"),
    include_flagged: bool = option(StatsConfig, "include_flagged", "--include-flagged"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Heatmap statistics (paper 2, 2.4): 95th-percentile group test, voxel-wise t-tests,
    clusters -> RUN/stats/METHOD/."""
    from voxplain.evaluate.stats import heatmap_statistics

    setup_logging()
    settings = build_config(StatsConfig, "stats", config, run=absolute(run), method=method,
                            groups=split_list(groups), folds=split_list(folds, int),
                            percentile=percentile, correction=correction, alpha=alpha,
                            equal_var=equal_var, connectivity=connectivity, unit=unit,
                            include_flagged=include_flagged)
    with reported_errors():
        summary = heatmap_statistics(settings)
    out = settings.run / "stats" / settings.method
    test = out / "percentile_test.tsv"
    if test.is_file():
        import pandas as pd

        print_table(f"{settings.percentile:g}th percentile of the normalised maps",
                    pd.read_csv(test, sep="\t"),
                    ["group_a", "mean_a", "sd_a", "group_b", "mean_b", "sd_b", "t", "p"])
    print_table("Voxel-wise t-tests", summary,
                ["test", "tested_voxels", "significant_voxels", "correction", "clusters",
                 "min_p", "top_region"])
    console.print(f"written {out}")
