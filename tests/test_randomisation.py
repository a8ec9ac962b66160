"""Both randomisation sanity checks (Adebayo et al. 2018) as a run-folder step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_cohort
from voxplain.config import RandomisationConfig, TrainConfig
from voxplain.evaluate.sanity import randomisable_layers
from voxplain.io import read_tsv
from voxplain.models.serialization import load_model
from voxplain.steps.context import load_context
from voxplain.steps.randomisation import (DATA_RUN, compare_maps, permuted_cohort,
                                          run_randomisation, ssim)
from voxplain.steps.train import run_train


def test_labels_are_permuted_between_subjects_keeping_each_subjects_sessions_together():
    table = pd.DataFrame({"participant_id": [f"sub-{i // 2}" for i in range(20)],
                          "session_id": ["ses-M00", "ses-M12"] * 10,
                          "diagnosis": ["AD"] * 8 + ["CN"] * 12})
    permuted = permuted_cohort(table, seed=3)
    per_subject = permuted.groupby("participant_id").diagnosis.nunique()
    assert (per_subject == 1).all()
    assert (permuted.diagnosis == "AD").sum() == 8  # 4 AD subjects before and after
    assert not permuted.diagnosis.equals(table.diagnosis)
    assert permuted.equals(permuted_cohort(table, seed=3))
    assert not permuted.diagnosis.equals(permuted_cohort(table, seed=4).diagnosis)


def test_ssim_of_a_map_with_itself_or_a_scaled_copy_is_one_and_lower_with_another():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 12, 12, 12))
    assert ssim(maps, maps) == pytest.approx(1.0)
    assert ssim(maps, 3 * maps) == pytest.approx(1.0)  # each map scaled by its own maximum
    assert ssim(maps, rng.random((2, 12, 12, 12))) < 0.2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("randomisation")
    tsv = write_cohort(folder / "cohort", subjects=16, sessions=1)
    run_train(TrainConfig(cohort=tsv, run=folder / "run", n_folds=2, epochs=4, batch_size=4,
                          learning_rate=3e-3, device="cpu",
                          model={"name": "cnn", "channels": [4, 8, 8]}))
    return folder / "run"


def test_maps_of_a_model_compared_with_its_own_maps_fail_the_rule(trained_run):
    context = load_context(trained_run, "cpu")
    model, description = load_model(trained_run / "models/fold-0/run-0")
    rows = context.split_rows(0, "validation").iloc[:2]
    x = torch.from_numpy(context.images_of(rows))
    targets = [description["classes"].index(d) for d in rows.diagnosis]
    scores = compare_maps(model, model, "saliency", x, targets, context)
    assert scores["spearman_abs"] == pytest.approx(1.0)
    assert scores["ssim"] == pytest.approx(1.0)


@pytest.mark.slow
def test_both_randomisation_tests_write_their_tables_and_verdicts(trained_run):
    summary = run_randomisation(RandomisationConfig(
        run=trained_run, methods=["saliency", "grad_cam"], sessions=2, device="cpu"))
    out = trained_run / "evaluation" / "randomisation"
    model, _ = load_model(trained_run / "models/fold-0/run-0")
    layers = randomisable_layers(model)
    for method in ("saliency", "grad_cam"):
        cascade = read_tsv(out / f"model_{method}.tsv")
        assert cascade[cascade.fold == 0].layer.tolist() == layers  # top down, one per layer
        data = read_tsv(out / f"data_{method}.tsv")
        assert data.fold.tolist() == [0, 1]
    assert set(summary.test) == {"model", "data"}
    assert len(summary) == 2 * 2 * 2  # tests x methods x folds
    assert (summary.passes == (summary.spearman_abs < 0.5)).all()
    assert summary[summary.test == "data"].ssim.between(-1, 1).all()
    # the models trained on permuted labels: a run folder of their own, on the permuted cohort
    permuted = read_tsv(trained_run / DATA_RUN / "permuted_cohort.tsv")
    original = read_tsv(trained_run / "cohort.tsv")
    assert sorted(permuted.diagnosis) == sorted(original.diagnosis)
    assert not permuted.diagnosis.equals(original.diagnosis)
    for fold in (0, 1):
        assert (trained_run / DATA_RUN / f"models/fold-{fold}/run-0/model.safetensors").is_file()
    again = run_randomisation(RandomisationConfig(  # resumed: nothing trained again
        run=trained_run, methods=["saliency"], sessions=2, device="cpu", folds=[0]))
    np.testing.assert_allclose(
        again.spearman_abs.to_numpy(),
        summary[(summary.method == "saliency") & (summary.fold == 0)].spearman_abs.to_numpy())


def test_the_report_names_a_method_that_fails_a_randomisation_test(tmp_path):
    from voxplain.config import ReportConfig
    from voxplain.io import write_tsv
    from voxplain.report.sanity import randomisation_section
    from voxplain.report.sections import ReportContext
    from voxplain.run import RunFolder

    run = RunFolder(tmp_path / "run")
    context = ReportContext(run, ReportConfig(run=run.root), tmp_path / "figures")
    assert not randomisation_section(context).applies  # the step has not run
    folder = run.evaluation_dir / "randomisation"
    write_tsv(folder / "summary.tsv", pd.DataFrame({
        "test": ["model", "model", "data"], "method": ["edges", "edges", "grad_cam"],
        "fold": [0, 1, 0], "run": [0, 0, 0], "spearman_abs": [0.9, 0.3, 0.1],
        "ssim": [np.nan, np.nan, 0.2], "roi_cosine": [np.nan, np.nan, 0.5],
        "n_sessions": [2, 2, 2], "passes": [False, True, True]}))
    write_tsv(folder / "model_edges.tsv", pd.DataFrame({
        "fold": [0, 0], "run": [0, 0], "layer": ["fc", "conv"], "randomised": [1, 2],
        "spearman_abs": [0.95, 0.9]}))
    section = randomisation_section(context)
    warnings = [block.content for block in section.blocks if block.kind == "warning"]
    assert len(warnings) == 1 and "edges fails the model-randomisation test in 1 of 2" in \
        warnings[0]
    assert [block.kind for block in section.blocks].count("figure") == 1
