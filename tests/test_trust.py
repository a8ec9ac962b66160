"""The checks the report opens with (voxplain.report.trust): each rule on a run folder written
by hand, so every verdict is known in advance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from voxplain.config import ReportConfig
from voxplain.report.html import build_report
from voxplain.report.trust import run_findings
from voxplain.run import RunFolder


def _tsv(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def _model(run: Path, fold: int, balanced_accuracy: float, at_chance: bool) -> None:
    folder = run / "models" / f"fold-{fold}" / "run-0"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    _tsv(folder / "metrics.tsv", {"fold": [fold], "run": [0], "subset": ["validation"],
                                  "balanced_accuracy": [balanced_accuracy],
                                  "chance_p": [0.6 if at_chance else 0.001],
                                  "at_chance": [at_chance]})


def _explanation(run: Path, key: str, layer: str, shape: str, coarse: bool) -> None:
    _tsv(run / "explanations" / key / "fold-0" / "run-0" / "index.tsv", {
        "participant_id": ["sub-01", "sub-02"], "session_id": ["ses-M00"] * 2,
        "diagnosis": ["AD", "CN"], "method": [key] * 2, "layer": [layer] * 2,
        "layer_shape": [shape] * 2, "layer_coarse": [coarse] * 2,
        "path": ["sub-01_ses-M00.nii.gz", "sub-02_ses-M00.nii.gz"]})


def _group_map(run: Path, key: str, inside_brain: bool) -> None:
    """A group map on the conftest grid (6 mm, MNI space) with its mass inside or outside the
    MNI brain mask."""
    import nibabel as nib
    import numpy as np

    from conftest import AFFINE, SHAPE
    from voxplain.data.grid import Grid
    from voxplain.data.template import brain_mask

    brain = brain_mask(Grid(SHAPE, AFFINE))
    values = (brain if inside_brain else ~brain).astype(np.float32)
    folder = run / "explanations" / key / "fold-0" / "run-0"
    nib.save(nib.Nifti1Image(values, AFFINE), folder / "group_AD.nii.gz")
    (run / "explanations" / key / "explanation.json").write_text(json.dumps({"signed": False}))


def _group_mask(run: Path, fold: int, fraction: float, flags: list[str]) -> None:
    folder = run / "masks" / "group" / f"fold-{fold}" / "run-0"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "fold": fold, "run": 0, "diagnosis": "AD", "masked_fraction": fraction,
        "probability_before": 0.9, "probability_after": 0.01, "flagged": bool(flags),
        "flag_reasons": flags}))


def checked_run(tmp_path: Path) -> Path:
    """Fold 1's classifier at chance; grad_cam coarse, near chance, outside the brain and
    identical across subjects; hires_cam fine; group mask of fold 1 flagged."""
    run = tmp_path / "run"
    _model(run, 0, 0.9, at_chance=False)
    _model(run, 1, 0.5, at_chance=True)
    _explanation(run, "grad_cam", "features.4.0.2", "1x2x1", coarse=True)
    _explanation(run, "hires_cam", "features.3.0.2", "4x5x4", coarse=False)
    _group_map(run, "grad_cam", inside_brain=False)
    _group_map(run, "hires_cam", inside_brain=True)
    _tsv(run / "evaluation" / "localisation.tsv", {
        "key": ["grad_cam", "grad_cam", "hires_cam", "hires_cam"], "diagnosis": ["AD"] * 4,
        "auc": [0.55, 0.51, 0.9, 0.92], "mass_inside": [0.25, 0.23, 0.6, 0.7],
        "chance_mass": [0.29] * 4, "pointing_game": [0.0, 0.0, 1.0, 1.0]})
    _tsv(run / "evaluation" / "robustness" / "summary.tsv", {
        "method": ["grad_cam", "hires_cam"], "experiment": ["inter-subject"] * 2,
        "diagnosis": ["AD"] * 2, "metric": ["rank_correlation"] * 2, "mean": [0.98, 0.6]})
    _group_mask(run, 0, 0.01, [])
    _group_mask(run, 1, 0.5, ["masks 0.50 of the image, the run's group masks a median of 0.01"])
    return run


def test_each_rule_gives_its_verdict(tmp_path):
    findings = run_findings(RunFolder(checked_run(tmp_path)))
    warnings = {(f.about, text) for f in findings if f.verdict == "warning"
                for text in [f.text]}
    abouts = [f.about for f in findings if f.verdict == "warning"]
    assert "classifier fold 1 run 0" in abouts
    assert "group mask fold 1 run 0" in abouts
    grad_cam = [text for about, text in warnings if about == "grad_cam"]
    assert any("near chance" in text and "AUC 0.53" in text for text in grad_cam)
    assert any("coarser than the minimum" in text and "1x2x1" in text for text in grad_cam)
    assert any("nearly identical" in text and "0.98" in text for text in grad_cam)
    assert any("100% of the group maps' relevance lies outside the brain" in text
               for text in grad_cam)
    assert any(f.about == "hires_cam" and "0% of the group maps' relevance lies outside" in f.text
               for f in findings)
    # beside it, the brain mask itself seen at the layer's grid: more of it outside at the
    # coarser layer, less than a uniform map's share at either
    resolution = {f.about: f.text for f in findings if "the brain itself seen at" in f.text}
    shares = {key: int(re.search(r"seen at the layer's [0-9x]+ grid: (\d+)%", text).group(1))
              for key, text in resolution.items()}
    uniform = {key: int(re.search(r"a uniform map: (\d+)%", text).group(1))
               for key, text in resolution.items()}
    assert "1x2x1 grid" in resolution["grad_cam"] and "4x5x4 grid" in resolution["hires_cam"]
    assert 0 < shares["hires_cam"] < shares["grad_cam"] < uniform["grad_cam"]
    assert not any(f.about == "hires_cam" and f.verdict == "warning" for f in findings)
    assert any(f.about == "hires_cam" and "AUC 0.91" in f.text for f in findings)
    # warnings first
    verdicts = [f.verdict for f in findings]
    assert verdicts == sorted(verdicts, key=lambda v: v != "warning")


def test_the_report_opens_with_the_findings_and_warns_beside_the_method(tmp_path):
    run = checked_run(tmp_path)
    page = build_report(ReportConfig(run=run, max_viewers=0)).read_text()
    sections = page.split("<section id=")
    assert sections[1].startswith('"findings"')
    assert "6 warning(s)" in sections[1]
    explanations = next(s for s in sections if s.startswith('"explanations"'))
    grad_cam = explanations.split("<h3>grad_cam</h3>")[1].split("<h3>")[0]
    assert grad_cam.count('class="warning"') == 4
    hires = explanations.split("<h3>hires_cam</h3>")[1].split("<h3>")[0]
    assert 'class="warning"' not in hires


def test_2d_group_maps_get_no_outside_the_brain_finding(tmp_path):
    """A 2D map (one NIfTI slice, 0.7 mm pixels) shows no brain: the MNI brain mask says
    nothing about it, whatever its third axis of one voxel."""
    import nibabel as nib
    import numpy as np

    run = tmp_path / "run"
    _explanation(run, "saliency", "", "", coarse=False)
    folder = run / "explanations" / "saliency" / "fold-0" / "run-0"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), np.diag([0.7, 0.7, 1.0, 1.0])),
             folder / "group_AD.nii.gz")
    (run / "explanations" / "saliency" / "explanation.json").write_text(json.dumps(
        {"signed": False}))
    findings = run_findings(RunFolder(run))
    assert not any("outside the brain" in f.text for f in findings)


def test_the_report_says_when_maps_are_drawn_from_a_class_s_mean_image(tmp_path):
    run = checked_run(tmp_path)
    (run / "explanations" / "hires_cam" / "explanation.json").write_text(json.dumps(
        {"signed": False, "baseline_class": "CN"}))
    page = build_report(ReportConfig(run=run, max_viewers=0)).read_text()
    explanations = page.split('<section id="explanations"')[1].split("<section id=")[0]
    hires = explanations.split("<h3>hires_cam</h3>")[1].split("<h3>")[0]
    grad_cam = explanations.split("<h3>grad_cam</h3>")[1].split("<h3>")[0]
    assert "the mean training image of CN of each fold" in hires
    assert "mean training image" not in grad_cam

