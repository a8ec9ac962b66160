"""Statistics of a user study (paper 3, 3.4 and 4.2), after de-randomisation with the key.

Unit of analysis: the rater. Every comparison first averages each rater's answers per method
and criterion (N raters -> N values per method), as the paper's ``t(N - 2)`` implies.

- Raw scores (table 2), z-adjusted scores (table 3: every answer z-normalised over all answers
  for the same sample and criterion, population standard deviation; a constant group gives 0)
  and ranks (table 4: methods ranked within each rater, question and criterion, 1 = best score,
  ties share their mean rank): mean over raters with a 95 % CI ``mean +- t(0.975, N-1) SE``.
- Two-tailed t-tests between methods: the Student two-sample statistic of the two sets of
  per-rater means, with **N - 2 degrees of freedom as in the paper** (5.1: "t(N - 2) = t(6)" for
  N = 8 raters). The paired test (``scipy.stats.ttest_rel``, N - 1 degrees of freedom) is
  reported beside it, since every rater scores every method.
- Inter-observer reliability (eq. 7): mean Pearson correlation over all pairs of raters of their
  raw scores of the same (sample, method) images, per criterion.
- Correlations between criteria: Pearson over all answers (one row per rater, sample, method);
  their dendrogram (fig. 8) clusters criteria with distance ``1 - r`` and average linkage.
- Questionnaire A vs B: per method and criterion, the per-rater means of A's raters against B's
  (Student t-test, ``n_A + n_B - 2`` = N - 2 degrees of freedom).
- Order effect: per criterion, each rater's mean z-adjusted score at each displayed position,
  compared across positions by a one-way repeated-measures ANOVA (raters as subjects).
- KMO adequacy (``factor_analyzer.calculate_kmo``) and the general preference factor Phi: first
  principal component of the standardised criteria (scikit-learn PCA), its share of the
  variance, its L1-normalised eigenvector (fig. 9b), and each method's mean Phi (fig. 9a).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from voxplain.config import StudyAnalyseConfig
from voxplain.io import write_json, write_tsv
from voxplain.study.make import StudyFolder
from voxplain.study.serve import ANSWER_COLUMNS, AnswerStore

log = logging.getLogger(__name__)
MEASURES = {"score": "raw_scores", "z": "z_scores", "rank": "ranks"}


def load_answers(folder: StudyFolder, database: Path | None = None,
                 csv_files: list[Path] | None = None) -> pd.DataFrame:
    """Answers of the database plus those of CSV files (imported into the database first, so
    a CSV read twice is counted once)."""
    store = AnswerStore(database or folder.database)
    questionnaire = folder.questionnaire()
    for path in csv_files or []:
        store.import_csv(Path(path), questionnaire)
    answers = store.answers()
    if answers.empty:
        raise ValueError(f"{store.database}: no answers yet")
    return answers


def derandomise(answers: pd.DataFrame, key: pd.DataFrame) -> pd.DataFrame:
    """Add method, sample, diagnosis and displayed position to each answer (by image id)."""
    merged = answers[ANSWER_COLUMNS].merge(key, on=["question", "image"], how="left")
    unknown = merged["method"].isna()
    if unknown.any():
        first = merged[unknown].iloc[0]
        raise ValueError(f"{int(unknown.sum())} answers name images the key does not know, e.g. "
                         f"question {first['question']} image {first['image']}")
    merged["position"] = np.where(merged["variant"] == "A", merged["position_A"],
                                  merged["position_B"]).astype(int)
    merged["score"] = merged["score"].astype(float)
    return merged.drop(columns=["position_A", "position_B"])


def z_normalise(answers: pd.DataFrame) -> pd.Series:
    """Scores z-normalised over all answers for the same sample (question) and criterion."""
    groups = answers.groupby(["question", "criterion"])["score"]
    mean = groups.transform("mean")
    spread = groups.transform(lambda s: s.std(ddof=0))
    return ((answers["score"] - mean) / spread.where(spread > 0)).fillna(0.0)


def question_ranks(answers: pd.DataFrame) -> pd.Series:
    """Rank of each method within its rater, question and criterion (1 = best; ties averaged)."""
    return answers.groupby(["rater", "question", "criterion"])["score"].rank(
        ascending=False, method="average")


def rater_means(answers: pd.DataFrame, value: str, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Each rater's mean ``value`` per method and criterion (and the ``by`` columns)."""
    return answers.groupby(["rater", *by, "method", "criterion"], as_index=False)[value].mean()


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its t-based confidence interval (N - 1 degrees of freedom)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, values.size - 1) * stats.sem(values)
    return mean, mean - half, mean + half


def method_table(answers: pd.DataFrame, value: str, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Tables 2-4: mean over raters of ``value`` per method and criterion with a 95 % CI."""
    rows = []
    for keys, group in rater_means(answers, value, by).groupby([*by, "method", "criterion"]):
        mean, low, high = mean_ci(group[value].to_numpy())
        rows.append({**dict(zip([*by, "method", "criterion"], keys)), "mean": mean,
                     "ci_low": low, "ci_high": high, "n_raters": len(group)})
    return pd.DataFrame(rows)


def method_t_tests(answers: pd.DataFrame, value: str) -> pd.DataFrame:
    """Two-tailed t-tests between every pair of methods per criterion (see module docstring)."""
    means = rater_means(answers, value).pivot_table(index=["criterion", "rater"],
                                                    columns="method", values=value)
    rows = []
    for criterion, table in means.groupby(level="criterion"):
        for first, second in itertools.combinations(table.columns, 2):
            pair = table[[first, second]].dropna()
            n = len(pair)
            student = stats.ttest_ind(pair[first], pair[second])
            paired = stats.ttest_rel(pair[first], pair[second])
            df = n - 2
            rows.append({"criterion": criterion, "method_1": first, "method_2": second,
                         "mean_1": pair[first].mean(), "mean_2": pair[second].mean(),
                         "t": student.statistic, "df": df,
                         "p": 2 * stats.t.sf(abs(student.statistic), df) if df > 0 else np.nan,
                         "t_paired": paired.statistic, "df_paired": n - 1,
                         "p_paired": paired.pvalue, "n_raters": n})
    return pd.DataFrame(rows)


def inter_observer_reliability(answers: pd.DataFrame) -> pd.DataFrame:
    """Eq. 7: mean pairwise Pearson correlation between raters, per criterion."""
    rows = []
    for criterion, group in answers.groupby("criterion"):
        wide = group.pivot_table(index=["question", "method"], columns="rater", values="score")
        r = wide.corr(method="pearson").to_numpy()
        pairs = r[np.triu_indices_from(r, k=1)]
        rows.append({"criterion": criterion, "rho": float(np.nanmean(pairs)) if pairs.size
                     else np.nan, "n_raters": wide.shape[1], "n_pairs": int(pairs.size)})
    return pd.DataFrame(rows)


def criteria_matrix(answers: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """One row per (rater, question, method), one column per criterion; incomplete rows out."""
    return answers.pivot_table(index=["rater", "question", "method"], columns="criterion",
                               values=value).dropna()


def variant_differences(answers: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Questionnaire A vs B per method and criterion: Student t-test of per-rater means."""
    means = rater_means(answers, value, by=("variant",))
    rows = []
    for (method, criterion), group in means.groupby(["method", "criterion"]):
        a = group.loc[group["variant"] == "A", value].to_numpy()
        b = group.loc[group["variant"] == "B", value].to_numpy()
        test = stats.ttest_ind(a, b) if min(a.size, b.size) >= 2 else None
        rows.append({"method": method, "criterion": criterion, "mean_A": a.mean() if a.size
                     else np.nan, "mean_B": b.mean() if b.size else np.nan,
                     "n_A": a.size, "n_B": b.size, "t": test.statistic if test else np.nan,
                     "df": a.size + b.size - 2, "p": test.pvalue if test else np.nan})
    return pd.DataFrame(rows)


def repeated_measures_anova(table: np.ndarray) -> tuple[float, int, int, float]:
    """One-way repeated-measures ANOVA of ``table`` ``(subjects, conditions)``.

    ``F = MS_condition / MS_error`` with the subject x condition residual as error, i.e.
    ``(k - 1)`` and ``(n - 1)(k - 1)`` degrees of freedom; returns ``(F, df1, df2, p)``.
    """
    n, k = table.shape
    grand = table.mean()
    condition = table.mean(axis=0) - grand
    residual = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0) + grand
    df1, df2 = k - 1, (n - 1) * (k - 1)
    f = (n * (condition ** 2).sum() / df1) / ((residual ** 2).sum() / df2)
    return float(f), df1, df2, float(stats.f.sf(f, df1, df2))


def order_effect(answers: pd.DataFrame) -> pd.DataFrame:
    """Per criterion: mean z-adjusted score at each displayed position, and a repeated-measures
    ANOVA of the raters' position means (rater = subject, position = condition), so that the
    raters' own levels do not hide a position effect."""
    rows = []
    for criterion, group in answers.groupby("criterion"):
        table = group.pivot_table(index="rater", columns="position", values="z").dropna()
        f, df1, df2, p = (repeated_measures_anova(table.to_numpy()) if table.shape[0] > 1
                          and table.shape[1] > 1 else (np.nan, 0, 0, np.nan))
        rows.append({"criterion": criterion,
                     **{f"mean_position_{p}": value for p, value in table.mean().items()},
                     "F": f, "df_position": df1, "df_error": df2, "p": p})
    return pd.DataFrame(rows)


def kmo(matrix: pd.DataFrame) -> tuple[pd.Series, float]:
    """Kaiser-Meyer-Olkin adequacy per criterion and overall (factor_analyzer)."""
    from factor_analyzer.factor_analyzer import calculate_kmo

    per_variable, overall = calculate_kmo(matrix)
    return pd.Series(per_variable, index=matrix.columns), float(overall)


def preference_factor(matrix: pd.DataFrame) -> tuple[pd.Series, pd.Series, float]:
    """General preference factor Phi: first principal component of the standardised criteria.

    Returns:
        ``(phi, loadings, explained)``: Phi of every row of ``matrix`` (sign chosen so that
        higher scores mean higher Phi), the L1-normalised eigenvector, and Phi's share of the
        total variance.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    standardised = StandardScaler().fit_transform(matrix.to_numpy())
    pca = PCA().fit(standardised)
    vector = pca.components_[0]
    sign = 1.0 if vector.sum() >= 0 else -1.0
    vector = sign * vector
    phi = pd.Series(standardised @ vector, index=matrix.index, name="phi")
    loadings = pd.Series(vector / np.abs(vector).sum(), index=matrix.columns, name="loading")
    return phi, loadings, float(pca.explained_variance_ratio_[0])


def analyse(config: StudyAnalyseConfig) -> dict:
    """Every table and figure of the study into ``STUDY/analysis`` (see module docstring);
    returns the summary also written to ``summary.json``."""
    from voxplain.study.figures import (
        comparison_figure,
        criteria_dendrogram,
        preference_figure,
    )

    folder = StudyFolder(config.study)
    out = config.out or folder.analysis_dir
    answers = derandomise(load_answers(folder, config.database, config.answers_csv),
                          folder.key())
    answers["z"] = z_normalise(answers)
    answers["rank"] = question_ranks(answers)
    write_tsv(out / "answers.tsv", answers)
    tests = []
    for value, name in MEASURES.items():
        write_tsv(out / f"{name}.tsv", method_table(answers, value))
        tests.append(method_t_tests(answers, value).assign(measure=value))
    write_tsv(out / "t_tests.tsv", pd.concat(tests, ignore_index=True))
    by_class = method_table(answers, "z", by=("diagnosis",))
    write_tsv(out / "z_scores_by_class.tsv", by_class)
    reliability = inter_observer_reliability(answers)
    write_tsv(out / "reliability.tsv", reliability)
    write_tsv(out / "variants.tsv", variant_differences(answers))
    order = order_effect(answers)
    write_tsv(out / "order_effect.tsv", order)
    comparison_figure(method_table(answers, "z"), by_class, out / "comparison.png")
    summary = {"raters": int(answers["rater"].nunique()), "answers": len(answers),
               "questions": int(answers["question"].nunique()),
               "methods": sorted(answers["method"].unique()),
               "t_test_degrees_of_freedom": "N - 2 (paper 3, 5.1), N = raters",
               "reliability": dict(zip(reliability["criterion"], reliability["rho"])),
               "order_effect_p": dict(zip(order["criterion"], order["p"]))}
    matrix = criteria_matrix(answers)
    if matrix.shape[1] >= 2 and len(matrix) > matrix.shape[1]:
        correlation = matrix.corr(method="pearson")
        write_tsv(out / "criteria_correlation.tsv", correlation.reset_index())
        criteria_dendrogram(correlation, out / "criteria_dendrogram.png")
        per_criterion, overall = kmo(matrix)
        phi, loadings, explained = preference_factor(matrix)
        phi_answers = phi.reset_index()
        write_tsv(out / "preference_factor.tsv", method_table(
            phi_answers.assign(criterion="phi"), "phi"))
        write_tsv(out / "preference_loadings.tsv", pd.DataFrame(
            {"criterion": loadings.index, "loading_l1": loadings.to_numpy(),
             "kmo": per_criterion.reindex(loadings.index).to_numpy()}))
        preference_figure(method_table(phi_answers.assign(criterion="phi"), "phi"), loadings,
                          explained, out / "preference_factor.png")
        summary.update(kmo=overall, phi_explained_variance=explained)
    else:
        log.info("fewer than two criteria (or too few answers): no correlation, KMO or PCA")
    write_json(out / "summary.json", summary)
    log.info("%s: %d answers of %d raters analysed", out, len(answers), summary["raters"])
    return summary
