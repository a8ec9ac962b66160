"""Classification metrics with bootstrap CIs (paper 1, 3; paper 3, 3.3 and table 1)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn import metrics as sk

from voxplain.config import ClassificationEvaluationConfig
from voxplain.io import read_tsv
from voxplain.steps.classification import run_classification
from voxplain.evaluate.classification import (METRICS, _weighted_metrics, bootstrap_metrics,
                                              bootstrap_replicates, classification_metrics,
                                              cross_validation_metrics, prediction_metrics)


def _binary_case(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    y_score = np.round(rng.random(n) * 0.7 + 0.3 * y_true, 1)  # rounded: tied scores
    y_pred = (y_score > 0.5).astype(int)
    return y_true, y_pred, y_score


def test_binary_metrics_agree_with_scikit_learn():
    y_true, y_pred, y_score = _binary_case()
    m = classification_metrics(y_true, y_pred, y_score)
    assert m["n"] == len(y_true)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert m["f1"] == pytest.approx(sk.f1_score(y_true, y_pred))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y_true, y_pred))
    assert m["specificity"] == pytest.approx(sk.recall_score(y_true, y_pred, pos_label=0))
    assert m["ppv"] == pytest.approx(sk.precision_score(y_true, y_pred))
    assert m["npv"] == pytest.approx(sk.precision_score(y_true, y_pred, pos_label=0))
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y_true, y_pred))
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y_true, y_score))


def test_npv_informedness_markedness_of_a_hand_computed_confusion_matrix():
    # TP = 6, FN = 2, FP = 3, TN = 9
    y_true = np.array([1] * 8 + [0] * 12)
    y_pred = np.array([1] * 6 + [0] * 2 + [1] * 3 + [0] * 9)
    m = classification_metrics(y_true, y_pred)
    assert m["sensitivity"] == pytest.approx(6 / 8)
    assert m["specificity"] == pytest.approx(9 / 12)
    assert m["ppv"] == pytest.approx(6 / 9)
    assert m["npv"] == pytest.approx(9 / 11)
    assert m["informedness"] == pytest.approx(0.5)
    assert m["markedness"] == pytest.approx(16 / 33)
    assert m["f1"] == pytest.approx(12 / 17)
    assert m["mcc"] == pytest.approx(48 / math.sqrt(9 * 8 * 12 * 11))
    assert m["mcc"] == pytest.approx(math.sqrt(m["informedness"] * m["markedness"]))
    assert math.isnan(m["auc"])  # no score given


def test_probabilities_alone_keep_the_trainer_call_working():
    y_true, _, y_score = _binary_case(1)
    probabilities = np.stack([1 - y_score, y_score], axis=1)
    m = classification_metrics(y_true, probabilities)
    predicted = probabilities.argmax(1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, predicted))
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y_true, y_score))


def test_single_class_gives_nan_balanced_accuracy_and_auc():
    m = classification_metrics(np.zeros(5, int), np.array([0, 0, 1, 0, 0]), np.linspace(0, 1, 5))
    assert m["accuracy"] == pytest.approx(0.8)
    assert math.isnan(m["balanced_accuracy"]) and math.isnan(m["auc"])
    assert math.isnan(m["sensitivity"]) and m["specificity"] == pytest.approx(0.8)


def test_multiclass_macro_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 150)
    scores = rng.dirichlet([1, 1, 1], 150)
    scores[np.arange(150), y_true] += 0.4
    scores /= scores.sum(1, keepdims=True)
    y_pred = scores.argmax(1)
    m = classification_metrics(y_true, y_pred, scores)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y_true, y_pred, average="macro"))
    assert m["ppv"] == pytest.approx(sk.precision_score(y_true, y_pred, average="macro"))
    assert m["f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"))
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y_true, y_pred))
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y_true, scores, multi_class="ovr"))


def test_resample_metrics_equal_scikit_learn_with_sample_weights():
    y_true, y_pred, y_score = _binary_case(2, n=60)
    counts = np.random.default_rng(0).integers(0, 4, size=(3, 60)).astype(float)
    values = _weighted_metrics(y_true, y_pred, y_score, 2, counts)
    for b, w in enumerate(counts):
        assert values["auc"][b] == pytest.approx(sk.roc_auc_score(y_true, y_score, sample_weight=w))
        assert values["mcc"][b] == pytest.approx(sk.matthews_corrcoef(y_true, y_pred,
                                                                      sample_weight=w))
        assert values["f1"][b] == pytest.approx(sk.f1_score(y_true, y_pred, sample_weight=w))


def test_bootstrap_is_stratified_by_true_class():
    # Predicting "positive" for everyone: accuracy = prevalence, fixed if classes keep their size.
    y_true = np.array([1] * 30 + [0] * 70)
    replicates = bootstrap_replicates(y_true, np.ones(100, int), None, n_boot=200, seed=1)
    assert np.all(replicates["accuracy"] == pytest.approx(0.3))


def test_bootstrap_percentile_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    # 50 patients (sensitivity 0.9) and 50 controls (specificity 0.7): true accuracy 0.8.
    rng = np.random.default_rng(0)
    y_true = np.array([1] * 50 + [0] * 50)
    covered = {"accuracy": 0, "balanced_accuracy": 0}
    datasets = 200
    for seed in range(datasets):
        correct = rng.random(100) < np.where(y_true == 1, 0.9, 0.7)
        y_pred = np.where(correct, y_true, 1 - y_true)
        table = bootstrap_metrics(y_true, y_pred, None, n_boot=200, seed=seed).set_index("metric")
        for name in covered:
            covered[name] += table.loc[name, "ci_low"] <= 0.8 <= table.loc[name, "ci_high"]
    for name, count in covered.items():
        assert 0.89 <= count / datasets <= 0.99, (name, count)


def test_bootstrap_ci_of_the_auc_covers_the_binormal_auc():
    # scores N(1, 1) for patients, N(0, 1) for controls: AUC = Phi(1 / sqrt(2))
    true_auc = float(norm.cdf(1 / np.sqrt(2)))
    rng = np.random.default_rng(1)
    y_true = np.array([1] * 60 + [0] * 60)
    covered, datasets = 0, 200
    for seed in range(datasets):
        score = rng.normal(y_true.astype(float), 1.0)
        table = bootstrap_metrics(y_true, (score > 0.5).astype(int), score, n_boot=200,
                                  seed=seed).set_index("metric")
        covered += table.loc["auc", "ci_low"] <= true_auc <= table.loc["auc", "ci_high"]
    assert 0.89 <= covered / datasets <= 0.99, covered


def test_bootstrap_reports_resamples_where_a_metric_is_undefined():
    # A single positive prediction: resamples that miss it have no PPV.
    y_true = np.array([1] * 10 + [0] * 10)
    y_pred = np.zeros(20, int)
    y_pred[0] = 1
    table = bootstrap_metrics(y_true, y_pred, n_boot=300, seed=0).set_index("metric")
    assert 0 < table.loc["ppv", "n_valid"] < 300
    assert table.loc["ppv", "ci_low"] == pytest.approx(1.0)  # defined => the one TP
    assert table.loc["accuracy", "n_valid"] == 300
    nothing = bootstrap_metrics(y_true, np.zeros(20, int), n_boot=50).set_index("metric")
    assert nothing.loc["ppv", "n_valid"] == 0 and math.isnan(nothing.loc["ppv", "ci_low"])


def test_bootstrap_is_seeded():
    y_true, y_pred, y_score = _binary_case(4)
    first = bootstrap_metrics(y_true, y_pred, y_score, n_boot=100, seed=7)
    pd.testing.assert_frame_equal(first, bootstrap_metrics(y_true, y_pred, y_score, n_boot=100,
                                                           seed=7))
    assert not first.equals(bootstrap_metrics(y_true, y_pred, y_score, n_boot=100, seed=8))
    assert list(first["metric"]) == list(METRICS)
    assert np.all(first["ci_low"] <= first["value"] + 1e-12)


def _prediction_table(seed: int, n: int = 40) -> pd.DataFrame:
    y_true, _, score = _binary_case(seed, n)
    classes = np.array(["CN", "AD"])
    return pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)],
                         "session_id": "ses-M00", "diagnosis": classes[y_true],
                         "proba_CN": 1 - score, "proba_AD": score,
                         "predicted": classes[(score > 0.5).astype(int)]})


def test_prediction_table_metrics_use_the_proba_column_order_and_the_positive_class():
    table = _prediction_table(5)
    y_true = (table["diagnosis"] == "AD").to_numpy(int)
    y_pred = (table["predicted"] == "AD").to_numpy(int)
    result = prediction_metrics(table, n_boot=50).set_index("metric")
    assert result.loc["sensitivity", "value"] == pytest.approx(sk.recall_score(y_true, y_pred))
    assert result.loc["auc", "value"] == pytest.approx(sk.roc_auc_score(y_true, table.proba_AD))
    flipped = prediction_metrics(table, n_boot=50, positive="CN").set_index("metric")
    assert flipped.loc["sensitivity", "value"] == pytest.approx(result.loc["specificity", "value"])
    with pytest.raises(ValueError, match="'MCI' is not one of the classes"):
        prediction_metrics(table.assign(diagnosis="MCI"), n_boot=10, source="x.tsv")


def test_prediction_metrics_group_by_model(tmp_path: Path):
    table = pd.concat([_prediction_table(6).assign(fold=0, run=0),
                       _prediction_table(7).assign(fold=1, run=0)])
    result = prediction_metrics(table, n_boot=20)
    assert list(result.columns[:3]) == ["fold", "run", "metric"]
    assert len(result) == 2 * len(METRICS)


def test_cross_validation_reports_each_fold_and_their_mean(tmp_path: Path):
    balanced = []
    for fold in range(3):
        folder = tmp_path / "models" / f"fold-{fold}" / "run-0"
        folder.mkdir(parents=True)
        table = _prediction_table(10 + fold)
        table.to_csv(folder / "predictions-validation.tsv", sep="\t", index=False)
        balanced.append(sk.balanced_accuracy_score(table.diagnosis, table.predicted))
    result = run_classification(ClassificationEvaluationConfig(run=tmp_path, n_boot=100))
    assert read_tsv(tmp_path / "evaluation" / "classification.tsv").shape == result.shape
    rows = result[result.metric == "balanced_accuracy"]
    per_fold = rows[rows.scope == "fold"]
    assert list(per_fold["fold"]) == [0, 1, 2]
    assert np.allclose(per_fold["value"], balanced)
    mean = rows[rows.scope == "mean"].iloc[0]
    assert mean["value"] == pytest.approx(np.mean(balanced))
    assert mean["per_fold"] == ", ".join(f"{v:.4g}" for v in balanced)
    assert mean["ci_low"] <= mean["value"] <= mean["ci_high"]
    assert mean["ci_high"] - mean["ci_low"] < (per_fold.ci_high - per_fold.ci_low).mean()
    with pytest.raises(ValueError, match="predictions-test.tsv"):
        run_classification(ClassificationEvaluationConfig(run=tmp_path, subset="test"))
    # the pure function gives the same table from the tables themselves
    tables = {(fold, 0): read_tsv(tmp_path / "models" / f"fold-{fold}" / "run-0" /
                                  "predictions-validation.tsv") for fold in range(3)}
    pd.testing.assert_frame_equal(cross_validation_metrics(tables, n_boot=100), result)


def test_classification_step_lists_the_misclassified_slices_of_slice_models(tmp_path: Path):
    # two folds of a slice model: 3 slices per session, fold 0 gets slices 1-2 of sub-01 wrong
    for fold, wrong in ((0, {("sub-01", 1), ("sub-01", 2)}), (1, set())):
        folder = tmp_path / "models" / f"fold-{fold}" / "run-0"
        folder.mkdir(parents=True)
        rows = []
        for subject, diagnosis in (("sub-01", "AD"), ("sub-02", "CN")):
            for index in range(3):
                other = "CN" if diagnosis == "AD" else "AD"
                predicted = other if (subject, index) in wrong else diagnosis
                rows.append({"participant_id": subject, "session_id": "ses-M00",
                             "diagnosis": diagnosis, "slice": index,
                             "proba_CN": 0.9 if predicted == "CN" else 0.1,
                             "proba_AD": 0.1 if predicted == "CN" else 0.9,
                             "predicted": predicted})
        pd.DataFrame(rows).to_csv(folder / "predictions-validation.tsv", sep="\t", index=False)
    run_classification(ClassificationEvaluationConfig(run=tmp_path, n_boot=10))
    wrong = read_tsv(tmp_path / "evaluation" / "misclassified_slices.tsv")
    assert wrong[["fold", "participant_id", "slice", "predicted"]].values.tolist() == [
        [0, "sub-01", 1, "CN"], [0, "sub-01", 2, "CN"]]
    summary = read_tsv(tmp_path / "evaluation" / "slices.tsv")
    assert len(summary) == 4  # two sessions in each of two folds


def test_chance_p_value_is_the_exact_permutation_tail_of_the_balanced_accuracy():
    """Reference: every one of the C(8, 3) = 56 ways to place the 3 positives among 8 sessions
    (each equally likely under H0), scored with scikit-learn's balanced accuracy."""
    import itertools

    from voxplain.evaluate.classification import chance_p_value

    y_true = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    y_pred = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    observed = sk.balanced_accuracy_score(y_true, y_pred)
    null = []
    for positives in itertools.combinations(range(8), 3):
        labels = np.zeros(8, dtype=int)
        labels[list(positives)] = 1
        null.append(sk.balanced_accuracy_score(labels, y_pred))
    expected = np.mean(np.array(null) >= observed - 1e-12)
    assert chance_p_value(y_true, y_pred, n_resamples=100_000) == pytest.approx(expected)
    # perfect predictions of 16 sessions: p is the Monte Carlo floor 1 / (n + 1), far below 0.05
    perfect = np.repeat([0, 1], 8)
    assert chance_p_value(perfect, perfect, n_resamples=999) == pytest.approx(1e-3)
    assert chance_p_value(perfect, np.ones(16, dtype=int)) == 1.0  # one class predicted


def test_confusion_matrices_per_model_agree_with_scikit_learn_and_average_by_hand():
    from sklearn.metrics import confusion_matrix

    from voxplain.evaluate.classification import confusion_matrices

    classes = ["CN", "RRMS", "SPMS"]
    rng = np.random.default_rng(0)
    predictions = {}
    for fold in range(2):
        truth = rng.choice(classes, 30)
        scores = rng.dirichlet(np.ones(3), 30)
        predictions[fold, 0] = pd.DataFrame({"diagnosis": truth, **{
            f"proba_{c}": scores[:, i] for i, c in enumerate(classes)}})
    table = confusion_matrices(predictions)
    expected = []
    for fold in range(2):
        frame = predictions[fold, 0]
        predicted = np.array(classes)[frame[[f"proba_{c}" for c in classes]].to_numpy().argmax(1)]
        matrix = confusion_matrix(frame.diagnosis, predicted, labels=classes)
        expected.append(matrix / matrix.sum(1, keepdims=True))
        got = table[(table.scope == "fold") & (table.fold == fold)].pivot(
            index="true", columns="predicted", values="count").loc[classes, classes]
        np.testing.assert_array_equal(got.to_numpy(), matrix)
    mean = table[table.scope == "mean"].pivot(index="true", columns="predicted",
                                              values="fraction").loc[classes, classes]
    np.testing.assert_allclose(mean.to_numpy(), (expected[0] + expected[1]) / 2)
    np.testing.assert_allclose(mean.sum(1), 1.0)
