"""``voxplain evaluate classification|robustness`` and ``voxplain stats``."""

from __future__ import annotations

import typer

from voxplain.cli.common import (EXECUTOR_FIELDS, EXECUTOR_FLAGS, config_command, console,
                                 print_table, progress_bar, reported_errors)
from voxplain.config import (
    ClassificationEvaluationConfig,
    FaithfulnessStepConfig,
    LocalisationStepConfig,
    RandomisationConfig,
    RobustnessConfig,
    StatsConfig,
)

evaluate = typer.Typer(help="Classification metrics, localisation and robustness of "
                       "explanations.",
                       no_args_is_help=True)


@evaluate.command("classification")
@config_command(ClassificationEvaluationConfig, "evaluate_classification",
                ["run", "subset", "cohort", "n_boot", "seed", "level", "positive"])
def evaluate_classification(settings: ClassificationEvaluationConfig) -> None:
    """Metrics with bootstrap CIs per fold and over folds -> RUN/evaluation/classification.tsv
    (slice models: also the misclassified slices of every session, slices.tsv); with --cohort,
    of the predictions on that cohort -> RUN/evaluation/cohort-LABEL/classification.tsv."""
    from voxplain.run import COHORT_PREFIX, cohort_label
    from voxplain.steps.classification import run_classification

    with reported_errors():
        table = run_classification(settings)
    path = settings.run / "evaluation" / "classification.tsv"
    if settings.cohort is not None:
        path = (settings.run / "evaluation" / f"{COHORT_PREFIX}{cohort_label(settings.cohort)}"
                / "classification.tsv")
    means = table[table.scope == "mean"].assign(
        ci=lambda t: [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(t.ci_low, t.ci_high)])
    print_table(f"Classification ({settings.cohort or settings.subset}, mean over folds, "
                f"{settings.level:.0%} bootstrap CI)", means,
                ["run", "metric", "value", "ci", "per_fold"])
    console.print(f"written {path}")


@evaluate.command("localisation")
@config_command(LocalisationStepConfig, "evaluate_localisation",
                ["run", "against", "session_truth", "methods", "diagnosis", "truth_fraction",
                 "tolerance", "top_k", "baselines", "seed"],
                flags={"baselines": "--baselines/--no-baselines"})
def evaluate_localisation_command(settings: LocalisationStepConfig) -> None:
    """Explanations scored against a known truth: the patient-class group maps against
    --against FILE (-> RUN/evaluation/localisation.tsv), every session map against its own
    truth named by --session-truth COLUMN of the cohort (-> localisation_sessions.tsv)."""
    from voxplain.evaluate.localisation import (
        localisation_summary,
        session_localisation_summary,
    )
    from voxplain.steps.localisation import run_localisation

    with reported_errors():
        tables = run_localisation(settings)
    if "group" in tables:
        table, k = tables["group"], settings.top_k
        summary = localisation_summary(table)
        # short headers: the table must stay readable in an 80-column log
        headers = {"key": "explanation", "auc": "AUC", "mass_inside": "mass in",
                   "chance_mass": "chance", "pointing_game": "pointing",
                   f"top{k}_hit": f"top{k} hit"}
        print_table(f"Localisation of the {table.diagnosis.iloc[0]} group maps against "
                    f"{settings.against.name}, mean over {summary.models.max()} model(s) "
                    "(layer: see localisation.tsv)",
                    summary.rename(columns=headers), list(headers.values()))
        console.print(f"per fold/run: {settings.run / 'evaluation' / 'localisation.tsv'}",
                      highlight=False)
    if "sessions" in tables:
        summary = session_localisation_summary(tables["sessions"])
        headers = {"key": "explanation", "diagnosis": "diagnosis", "maps": "maps",
                   "scored": "with truth", "auc": "AUC", "mass_inside": "mass in",
                   "chance_mass": "chance", "pointing_game": "pointing"}
        print_table(f"Localisation of every session map against its own truth "
                    f"({settings.session_truth}), mean per diagnosis",
                    summary.rename(columns=headers), list(headers.values()))
        console.print(f"per map: {settings.run / 'evaluation' / 'localisation_sessions.tsv'}",
                      highlight=False)


@evaluate.command("robustness")
@config_command(RobustnessConfig, "evaluate_robustness",
                ["run", "methods", "other_run", "prob_cnn", "batch_size", "device",
                 "include_flagged", *EXECUTOR_FIELDS], flags=EXECUTOR_FLAGS)
def evaluate_robustness_command(settings: RobustnessConfig) -> None:
    """Similarity of maps across folds, runs, sessions, hyperparameters and datasets
    -> RUN/evaluation/robustness/ (skips what the run folder does not hold yet)."""
    from voxplain.steps.robustness import run_robustness

    with reported_errors(), progress_bar() as bar:
        summary = run_robustness(settings, progress=bar)
    print_table("Robustness (mean of pairs)", summary,
                ["method", "experiment", "diagnosis", "metric", "mean", "sd", "median",
                 "n_pairs", "n_subjects"])
    console.print(f"written {settings.run / 'evaluation' / 'robustness'}")


@evaluate.command("randomisation")
@config_command(RandomisationConfig, "evaluate_randomisation",
                ["run", "methods", "folds", "sessions", "data", "seed", "device"],
                flags={"data": "--data/--no-data"})
def evaluate_randomisation_command(settings: RandomisationConfig) -> None:
    """Model and data randomisation sanity checks (Adebayo et al. 2018) of each method, fold by
    fold -> RUN/evaluation/randomisation/ (the data test trains every fold again on permuted
    diagnoses in RUN/randomisation/data)."""
    from voxplain.steps.randomisation import run_randomisation

    with reported_errors(), progress_bar() as bar:
        summary = run_randomisation(settings, progress=bar)
    print_table("Randomisation tests (rank correlation with the trained model's maps; passes "
                "below 0.5)", summary,
                ["test", "method", "fold", "run", "spearman_abs", "ssim", "roi_cosine", "passes"])
    console.print(f"written {settings.run / 'evaluation' / 'randomisation'}")


@evaluate.command("faithfulness")
@config_command(FaithfulnessStepConfig, "evaluate_faithfulness",
                ["run", "methods", "folds", "diagnosis", "sessions", "step", "perturbation",
                 "constant", "blur_mm", "baselines", "masks", "batch_size", "seed", "device"],
                flags={"baselines": "--baselines/--no-baselines", "masks": "--masks/--no-masks"})
def evaluate_faithfulness_command(settings: FaithfulnessStepConfig) -> None:
    """Deletion and insertion curves (Petsiuk et al. 2018) of every explanation, mask and
    baseline on the same validation sessions -> RUN/evaluation/faithfulness/ (a faithful map:
    low deletion area, high insertion area; compare with baseline:random)."""
    from voxplain.steps.faithfulness import run_faithfulness

    with reported_errors(), progress_bar() as bar:
        summary = run_faithfulness(settings, progress=bar)
    print_table("Faithfulness (mean areas under the curves; deletion: lower is better, "
                "insertion: higher)", summary,
                ["key", "deletion_auc", "insertion_auc", "n_sessions", "deletion_beats_random",
                 "insertion_beats_random"])
    console.print(f"written {settings.run / 'evaluation' / 'faithfulness'}")


@config_command(StatsConfig, "stats",
                ["run", "method", "groups", "folds", "percentile", "correction", "alpha",
                 "equal_var", "connectivity", "unit", "include_flagged", "permutations",
                 "covariates", "tfce", "cluster_threshold", "paired_sessions", "seed"],
                flags={"equal_var": "--equal-var/--welch", "tfce": "--tfce/--no-tfce"})
def stats(settings: StatsConfig) -> None:
    """Heatmap statistics (paper 2, 2.4): 95th-percentile group test, voxel-wise t-tests,
    clusters, permutation FWE tests (--permutations) -> RUN/stats/METHOD/."""
    from voxplain.steps.stats import run_stats

    with reported_errors():
        summary = run_stats(settings)
    out = settings.run / "stats" / settings.method
    test = out / "percentile_test.tsv"
    if test.is_file():
        from voxplain.io import read_tsv

        print_table(f"{settings.percentile:g}th percentile of the normalised maps",
                    read_tsv(test),
                    ["group_a", "mean_a", "sd_a", "group_b", "mean_b", "sd_b", "t", "p"])
    print_table("Voxel-wise t-tests", summary,
                ["test", "tested_voxels", "significant_voxels", "correction", "clusters",
                 "min_p", "top_region"])
    console.print(f"written {out}")
