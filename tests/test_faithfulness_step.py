"""The faithfulness step (``voxplain evaluate faithfulness``): every explanation, mask and
baseline scored by deletion and insertion on the same sessions, against a model whose answer is
known by hand (its AD logit reads only the darker cube of the fixture's AD volumes)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHAPE, write_cohort
from torch import nn

import voxplain.steps.faithfulness as faithfulness_step
from voxplain.config import ExplainStepConfig, FaithfulnessStepConfig, TrainConfig
from voxplain.data.grid import Grid
from voxplain.data.template import brain_mask
from voxplain.explain.api import Explainer
from voxplain.explain.methods import METHODS
from voxplain.io import read_tsv
from voxplain.config import ReportConfig
from voxplain.report.html import build_report
from voxplain.steps.context import FoldModel, RunContext
from voxplain.steps.explain import run_explain
from voxplain.steps.faithfulness import run_faithfulness
from voxplain.steps.train import run_train

#: The centre cube where the fixture's AD volumes are darker (conftest.write_cohort).
CUBE = tuple(slice(s // 2 - 3, s // 2 + 3) for s in SHAPE)
#: AD logit = GAIN * (THRESHOLD - mean of the cube): dark cube -> AD.
GAIN, THRESHOLD = 20.0, 0.35


class CubeReader(nn.Module):
    """Two logits (CN, AD): ``[0, GAIN (THRESHOLD - mean of the cube's voxels in the brain)]``
    (the voxels the step may delete)."""

    def __init__(self, read: np.ndarray) -> None:
        super().__init__()
        self.read = torch.from_numpy(read)
        self.gain = nn.Parameter(torch.tensor(GAIN), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cube = x[:, 0][:, self.read].mean(1)
        return torch.stack([torch.zeros_like(cube), self.gain * (THRESHOLD - cube)], dim=1)


def cube_in_brain(run) -> np.ndarray:
    """The cube's voxels inside the brain mask of the run's grid."""
    grid = json.loads((run / "grid.json").read_text())
    read = np.zeros(SHAPE, dtype=bool)
    read[CUBE] = True
    return read & brain_mask(Grid(tuple(grid["shape"]), np.array(grid["affine"])))


class CubeProbe(Explainer):
    """Points exactly at the cube, whatever the input."""

    name = "test_faithfulness_cube"
    signed = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(len(x), 1, *x.shape[2:])
        maps[(slice(None), slice(None), *CUBE)] = 1.0
        return maps


class AwayProbe(CubeProbe):
    """Points everywhere but the cube."""

    name = "test_faithfulness_away"

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - super().attribute(x, target)


@pytest.fixture()
def cube_run(tmp_path, monkeypatch):
    """A 2-fold run of 16 subjects whose models are replaced by :class:`CubeReader`, explained
    by both probes."""
    tsv = write_cohort(tmp_path / "cohort", subjects=16, sessions=1)
    run = tmp_path / "run"
    run_train(TrainConfig(cohort=tsv, out=run, folds=2, epochs=1, batch_size=4, device="cpu",
                          model={"name": "cnn", "channels": [2, 4, 4]}))
    read = cube_in_brain(run)
    assert read.sum() > 100, "most of the fixture's cube lies inside the brain"
    monkeypatch.setattr(RunContext, "model", lambda self, fold, run_index: FoldModel(
        CubeReader(read), ["CN", "AD"]))
    for probe in (CubeProbe, AwayProbe):
        monkeypatch.setitem(METHODS, probe.name, probe)
        run_explain(ExplainStepConfig(run=run, device="cpu", explain={"method": probe.name}))
    return run


@pytest.mark.slow
def test_a_map_of_what_the_model_reads_deletes_faster_and_inserts_faster_than_random(cube_run):
    summary = run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu", masks=False))
    by = summary.set_index("key")
    cube, away, random = (by.loc["test_faithfulness_cube"], by.loc["test_faithfulness_away"],
                          by.loc["baseline:random"])
    assert cube.deletion_auc < random.deletion_auc < away.deletion_auc
    assert cube.insertion_auc > random.insertion_auc > away.insertion_auc
    assert [str(cube[c]) for c in ("deletion_beats_random", "insertion_beats_random",
                                   "beats_random")] == ["True"] * 3
    assert [str(away[c]) for c in ("deletion_beats_random", "insertion_beats_random",
                                   "beats_random")] == ["False"] * 3
    sessions = read_tsv(cube_run / "evaluation/faithfulness/sessions.tsv")
    # the same sessions for every ranking: each fold's first 8 AD validation sessions
    per_key = sessions.groupby("key").apply(lambda rows: tuple(sorted(
        zip(rows.fold, rows.participant_id))), include_groups=False)
    assert per_key.nunique() == 1 and (sessions.diagnosis == "AD").all()
    assert set(sessions.key) == {"test_faithfulness_cube", "test_faithfulness_away",
                                 "baseline:random", "baseline:input", "baseline:edge",
                                 "baseline:t_map", "baseline:linear_weights",
                                 "baseline:linear_pattern"}


@pytest.mark.slow
def test_deletion_curve_of_the_cube_probe_is_computed_by_hand(cube_run):
    """Step 0.5: the first point is the image's own p(AD); the second deletes the half of the
    brain ranked first, the cube among it (set to 1): p(AD) = sigmoid(GAIN (THRESHOLD - 1))
    whatever the image; the last deletes the whole brain, the same."""
    read = cube_in_brain(cube_run)
    run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu", step=0.5,
                                            methods=["test_faithfulness_cube"]))
    sessions = read_tsv(cube_run / "evaluation/faithfulness/sessions.tsv")
    curves = read_tsv(cube_run / "evaluation/faithfulness/curves.tsv")
    deleted = 1 / (1 + np.exp(-GAIN * (THRESHOLD - 1.0)))
    cohort = read_tsv(cube_run / "cohort.tsv")
    base = cube_run.parent / "cohort"
    first = sessions.iloc[0]
    image = nib.load(base / cohort.set_index("participant_id").loc[first.participant_id, "path"])
    own = 1 / (1 + np.exp(-GAIN * (THRESHOLD - float(np.asarray(image.dataobj)[read].mean()))))
    brain = brain_mask(Grid(SHAPE, np.asarray(image.affine)))
    half = np.round(0.5 * brain.sum()) / brain.sum()  # n_1 = round(step V) voxels deleted
    expected = (own + deleted) / 2 * half + deleted * (1 - half)  # trapezoids over 0, n_1, 1
    assert first.deletion_auc == pytest.approx(expected, rel=1e-4)
    deletion = curves[(curves.key == "test_faithfulness_cube") & (curves["mode"] == "deletion")]
    assert deletion.fraction.tolist() == [0.0, 0.5, 1.0]
    assert deletion.probability.iloc[1] == pytest.approx(deleted, abs=1e-6)  # 6 decimals kept


@pytest.mark.slow
def test_a_finished_fold_is_reused_and_a_new_map_or_other_settings_recompute_it(cube_run,
                                                                                 monkeypatch):
    run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu",
                                            methods=["test_faithfulness_cube"]))
    calls = []
    original = faithfulness_step._fold_scores
    monkeypatch.setattr(faithfulness_step, "_fold_scores",
                        lambda *args, **kw: calls.append(args[2]) or original(*args, **kw))
    run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu",
                                            methods=["test_faithfulness_cube"]))
    assert calls == []
    # another ranking asked for: the folds' files did not consider it
    run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu",
                                            methods=["test_faithfulness_cube",
                                                     "test_faithfulness_away"]))
    assert calls == [0, 1]
    calls.clear()
    summary = run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu", step=0.25,
                                                      methods=["test_faithfulness_cube"]))
    assert calls == [0, 1] and list(summary.key) == ["test_faithfulness_cube"]
    curves = read_tsv(cube_run / "evaluation/faithfulness/curves.tsv")
    assert len(curves) == 2 * 5  # deletion and insertion, 5 points at step 0.25


@pytest.mark.slow
def test_report_names_the_maps_no_better_than_random_and_plots_the_curves(cube_run):
    run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu"))
    html = build_report(ReportConfig(run=cube_run)).read_text()
    assert 'id="faithfulness"' in html
    warning = html[html.index("No better than a random ranking"):][:300]
    assert "test_faithfulness_away" in warning and "test_faithfulness_cube" not in warning
    assert "faithfulness_curves" in html
    findings = html[html.index('id="findings"'):html.index('id="classification"')]
    assert "no more faithful to the model than a random ranking" in findings


def test_nothing_to_score_is_an_error_naming_the_run(cube_run):
    with pytest.raises(ValueError, match="nothing to score"):
        run_faithfulness(FaithfulnessStepConfig(run=cube_run, device="cpu", baselines=False,
                                                methods=["grad_cam"]))


def test_a_map_more_faithful_than_the_t_map_is_said_to_describe_the_model(tmp_path):
    """The demo's case: Grad-CAM localises the truth worse than the t-map but deleting by it
    lowers the model's output faster; the finding says so. A map less faithful than the
    t-map, or no better than random, gets no such sentence."""
    from voxplain.io import write_tsv
    from voxplain.report.trust import method_findings
    from voxplain.run import RunFolder

    run = RunFolder(tmp_path)
    rows = [("grad_cam", 0.60, 0.76, True), ("integrated_gradients", 0.70, 0.73, True),
            ("saliency", 0.80, 0.70, False), ("baseline:random", 0.79, 0.81, None),
            ("baseline:t_map", 0.68, 0.81, None)]
    write_tsv(run.evaluation_file("faithfulness/summary.tsv"), pd.DataFrame(
        [{"key": key, "method": key, "deletion_auc": deletion, "insertion_auc": insertion,
          "n_sessions": 20, "deletion_beats_random": beats, "insertion_beats_random": False}
         for key, deletion, insertion, beats in rows]))

    def text(key):
        return " ".join(finding.text for finding in method_findings(run, key))

    assert "faster than deleting by the data's voxel-wise t-map (0.68)" in text("grad_cam")
    assert "t-map" not in text("integrated_gradients")  # 0.70: less faithful than the t-map
    assert "t-map" not in text("saliency") and "no more faithful" in text("saliency")
