"""The HTML report (issue 7): every section from what the run folder holds, absent ones as a note,
and a page that a real browser (headless Chromium) opens offline without an error."""

from __future__ import annotations

import json
import shutil
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import AFFINE, SHAPE, write_cohort
from voxplain.cli import app
from voxplain.config import GroupMaskStepConfig, ReportConfig, TrainConfig
from voxplain.steps.masks import run_group_masks
from voxplain.report import build_report
from voxplain.report.browser import check_page, find_chromium
from voxplain.report.figures import canonical, map_style
from voxplain.report.html import remote_references
from voxplain.report.sections import confidence_interval_block, matrix_of
from voxplain.steps.train import run_train

#: In page order: findings and results first, how the run was made last (issue 15).
SECTIONS = ("findings", "classification", "localisation", "explanations", "masks", "robustness",
            "statistics", "viewer", "cohort", "configuration")

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium/chromedriver not installed (the Makefile's test "
    "target installs the Debian packages chromium and chromium-driver)")


def present(page: str) -> dict[str, bool]:
    """Section key -> whether the section has content (rather than an absent-note)."""
    return {key: value == "yes" for key, value in
            re.findall(r'<section id="([a-z]+)" data-present="(yes|no)"', page)}


def _smooth(rng: np.random.Generator, signed: bool) -> np.ndarray:
    from scipy import ndimage

    values = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5).astype(np.float32)
    return values if signed else np.abs(values)


def _save(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values, AFFINE), path)


def write_other_steps(run) -> None:
    """Files of the explanation, robustness, statistics, localisation and bootstrap steps, in
    the layout those steps document (their modules are written by other engineers)."""
    rng = np.random.default_rng(0)
    for method, signed, folds in (("saliency", True, (0, 1)), ("grad-cam", False, (0,))):
        root = run / "explanations" / method
        root.mkdir(parents=True)
        (root / "explanation.json").write_text(json.dumps({"method": method, "signed": signed}))
        for fold in folds:
            folder = root / f"fold-{fold}" / "run-0"
            for diagnosis in ("AD", "CN"):
                _save(folder / f"group_{diagnosis}.nii.gz", _smooth(rng, signed))
            _save(folder / "sub-01_ses-M00.nii.gz", _smooth(rng, signed))
            pd.DataFrame({"participant_id": ["sub-01"], "session_id": ["ses-M00"],
                          "diagnosis": ["AD"], "path": ["sub-01_ses-M00.nii.gz"]}).to_csv(
                folder / "index.tsv", sep="\t", index=False)
    robustness = run / "evaluation" / "robustness" / "saliency"
    robustness.mkdir(parents=True)
    labels = ["fold-0_run-0", "fold-1_run-0"]
    pd.DataFrame({"map": labels, labels[0]: [1.0, 0.8], labels[1]: [0.8, 1.0]}).to_csv(
        robustness / "group_AD_roi_cosine.tsv", sep="\t", index=False)
    pd.DataFrame({"kind": ["intra-subject"] * 3 + ["inter-subject"] * 3,
                  "participant_a": ["sub-01", "sub-03", "sub-05", "sub-01", "sub-01", "sub-03"],
                  "roi_cosine": [0.95, 0.93, 0.9, 0.8, 0.75, 0.82]}).to_csv(
        robustness / "session_pairs.tsv", sep="\t", index=False)
    stats = run / "stats" / "saliency"
    t_map = 5 * _smooth(rng, True)
    t_map[:2] = np.nan  # as run_stats writes them: untested voxels (outside the brain) are NaN
    _save(stats / "one-sample_AD_T.nii.gz", t_map)
    _save(stats / "one-sample_AD_p.nii.gz", rng.uniform(size=SHAPE).astype(np.float32))
    pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(6)],
                  "diagnosis": ["AD", "CN"] * 3, "percentile": rng.uniform(size=6)}).to_csv(
        stats / "percentiles.tsv", sep="\t", index=False)
    pd.DataFrame({"test": ["one-sample_AD"], "sign": ["+"], "size": [12], "peak_t": [6.1],
                  "region": ["Hippocampus_L"]}).to_csv(stats / "clusters.tsv", sep="\t",
                                                       index=False)
    pd.DataFrame({"method": ["saliency"], "fold": [0], "auc": [0.91]}).to_csv(
        run / "evaluation" / "localisation.tsv", sep="\t", index=False)
    cyce = run / "cyce" / "fold-0" / "run-0"
    cyce.mkdir(parents=True)
    pd.DataFrame({"domain": ["x", "G-(x)", "G+(x)"], "n": [4] * 3, "mean": [0.5, 0.1, 0.9],
                  "ci_low": [0.4, 0.05, 0.8], "ci_high": [0.6, 0.2, 0.95]}).to_csv(
        cyce / "transfer.tsv", sep="\t", index=False)
    pd.DataFrame({"step": [0, 1, 2], "generator": [3.0, 2.0, 1.5],
                  "discriminator": [0.7, 0.6, 0.6]}).to_csv(cyce / "loss.tsv", sep="\t",
                                                            index=False)
    pd.DataFrame({"fold": [0, 0, 1, 1], "metric": ["balanced_accuracy", "auc"] * 2,
                  "value": [0.8, 0.9, 0.7, 0.85], "ci_low": [0.7, 0.8, 0.6, 0.75],
                  "ci_high": [0.9, 0.95, 0.8, 0.93]}).to_csv(
        run / "evaluation" / "classification.tsv", sep="\t", index=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A trained 2-fold run with group masks, plus files of every later step."""
    folder = tmp_path_factory.mktemp("report")
    tsv = write_cohort(folder / "cohort", subjects=24)
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=6, batch_size=4,
                             learning_rate=3e-3, device="cpu",
                             model={"name": "cnn", "channels": [4, 8, 8]}))
    run_group_masks(GroupMaskStepConfig(run=folder / "run", folds=[0, 1], device="cpu",
                                    mask={"max_epochs": 2, "batch_size": 8}))
    write_other_steps(folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def full_report(full_run):
    return build_report(ReportConfig(run=full_run, max_viewers=3))


@pytest.mark.slow
def test_report_renders_every_section_the_run_folder_holds(full_run, full_report):
    page = full_report.read_text()
    assert present(page) == dict.fromkeys(SECTIONS, True)
    assert list(present(page)) == list(SECTIONS)
    figures = full_run / "report" / "figures"
    vector = ("training_curves", "group_mask_losses", "robustness_saliency-session_pairs",
              "stats_saliency_percentiles", "cyce_losses")
    raster = ("group_mask_ortho", "group_mask_coronal", "group_mask_glass",
              "saliency_group_AD_ortho", "grad-cam_group_CN_glass",
              "robustness_saliency-group_AD_roi_cosine", "stats_saliency_one-sample_AD_T_ortho")
    for name in vector + raster:
        assert (figures / f"{name}.png").stat().st_size > 1000, name
        # SVG copies of vector figures only: a raster's SVG just embeds the same pixels
        assert (figures / f"{name}.svg").is_file() == (name in vector), name
    # classification with CIs from evaluation/classification.tsv, as value [low, high]
    assert "0.800 [0.700, 0.900]" in page
    # top-5 AAL2 regions of each group mask, from summary.json
    for fold in (0, 1):
        summary = json.loads((full_run / f"masks/group/fold-{fold}/run-0/summary.json")
                             .read_text())
        assert all(region in page for region in summary["top_regions"])
    assert "G+(x)" in page  # the CyCE transfer table
    # the p map is listed, not drawn; the T map is drawn
    assert "one-sample_AD_p.nii.gz" in page
    assert not (figures / "stats_saliency_one-sample_AD_p_ortho.png").exists()
    # viewers: limited in number, saved next to the page, nothing fetched from the network
    viewers = sorted((full_run / "report" / "viewers").glob("*.html"))
    assert len(viewers) == 3
    assert page.count("<iframe") == 3
    for viewer in viewers:
        assert remote_references(viewer.read_text()) == []
    assert "more group map(s) without a viewer" in page


@pytest.mark.slow
@needs_chromium
def test_report_opens_offline_in_headless_chromium(full_report, tmp_path):
    screenshot = tmp_path / "report.png"
    check = check_page(full_report, screenshot)
    assert check.console_errors == []
    assert check.requested_urls, "the performance log recorded no request at all"
    assert check.remote_requests == []
    assert check.images and check.broken_images == []
    assert check.frames == 3
    assert screenshot.stat().st_size > 10_000
    assert check.load_ms < 3000


@pytest.mark.slow
@needs_chromium
def test_inline_report_is_one_file_that_opens_offline(full_run, tmp_path):
    page = build_report(ReportConfig(run=full_run, out=tmp_path / "inline", inline=True,
                                     max_viewers=1, formats=["png"]))
    text = page.read_text()
    assert 'src="figures/' not in text and "data:image/png;base64," in text
    assert "srcdoc=" in text
    lone = tmp_path / "alone" / "index.html"  # moved away from figures/ and viewers/
    lone.parent.mkdir()
    lone.write_text(text)
    check = check_page(lone, tmp_path / "inline.png")
    assert check.console_errors == [] and check.remote_requests == []
    assert check.images and check.broken_images == []


def test_an_empty_run_folder_gives_a_note_for_every_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    page = build_report(ReportConfig(run=run)).read_text()
    assert present(page) == dict.fromkeys(SECTIONS, False)
    assert page.count('class="note absent-note"') == len(SECTIONS)
    assert "voxplain train" in page and "voxplain mask group" in page


@pytest.fixture
def run_2d(tmp_path):
    """A 2D run folder with session maps of two methods and session masks, no training."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run2d"
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for subject in range(3):
        np.save(images / f"sub-{subject}.npy", rng.uniform(size=(32, 32)).astype(np.float32))
        rows.append({"participant_id": f"sub-{subject}", "session_id": "ses-M00",
                     "diagnosis": "benign", "path": str(images / f"sub-{subject}.npy")})
    run.mkdir()
    pd.DataFrame(rows).to_csv(run / "cohort.tsv", sep="\t", index=False)
    (run / "config.toml").write_text("[train]\ndownsample = 2\n")
    for method in ("saliency", "grad-cam"):
        folder = run / "explanations" / method / "fold-0" / "run-0"
        folder.mkdir(parents=True)
        for subject in range(3):
            np.save(folder / f"sub-{subject}_ses-M00.npy", rng.standard_normal((16, 16)))
        np.save(folder / "group_benign.npy", rng.standard_normal((16, 16)))
        (folder / "group_benign.png").write_bytes(b"preview")  # the explain step's 2D preview
    masks = run / "masks" / "session" / "fold-0" / "run-0"
    masks.mkdir(parents=True)
    np.save(masks / "sub-0_ses-M00.npy", rng.uniform(size=(16, 16)))
    return run


@pytest.mark.slow
@needs_chromium
def test_2d_explanations_are_shown_as_overlays_and_open_in_chromium(run_2d, tmp_path):
    page = build_report(ReportConfig(run=run_2d))
    text = page.read_text()
    sections = present(text)
    assert sections["cohort"] and sections["explanations"]
    assert not sections["classification"] and not sections["viewer"]
    figures = run_2d / "report" / "figures"
    assert (figures / "explanations_2d.png").stat().st_size > 1000
    assert (figures / "saliency_group_benign_panels.png").is_file()
    check = check_page(page, tmp_path / "report2d.png")
    assert check.console_errors == [] and check.remote_requests == []
    assert check.images and check.broken_images == []


def test_2d_nifti_maps_are_drawn_as_flat_panels_and_overlays_like_earlier_npy_maps(run_2d):
    for path in sorted(run_2d.rglob("*.npy")):  # the maps, as the explain step writes them now
        slice_ = np.load(path).astype(np.float32)[..., np.newaxis]
        nib.save(nib.Nifti1Image(slice_, np.diag([1.4, 1.4, 1.0, 1.0])),
                 path.with_name(path.name.replace(".npy", ".nii.gz")))
        path.unlink()
    build_report(ReportConfig(run=run_2d))
    figures = run_2d / "report" / "figures"
    assert (figures / "explanations_2d.png").stat().st_size > 1000
    assert (figures / "saliency_group_benign_panels.png").is_file()
    assert not list(figures.glob("*_ortho.png")) and not list(figures.glob("*_glass.png"))


def test_session_masks_flagged_as_not_converged_are_listed(run_2d):
    masks = run_2d / "masks" / "session" / "fold-0" / "run-0"
    np.save(masks / "sub-1_ses-M00.npy", np.ones((16, 16)))
    pd.DataFrame({"participant_id": ["sub-0", "sub-1"], "session_id": ["ses-M00"] * 2,
                  "loss": [0.005, 0.026], "iterations": [400, 270], "robust_z": [0.0, 35.0],
                  "flagged": [False, True]}).to_csv(masks / "index.tsv", sep="\t", index=False)
    text = build_report(ReportConfig(run=run_2d)).read_text()
    start = text.index("flagged as not converged")  # the caption, then its table
    listed = text[start:text.index("</table>", start)]
    assert "sub-1" in listed and "sub-0" not in listed


def test_a_second_rendering_removes_figures_the_first_left_and_nothing_else(run_2d):
    """A figure the first rendering wrote and the second does not is removed (the page and its
    folder match); a file the report never wrote is kept (issue 16: report --out DIR deleted
    every file of DIR/figures)."""
    build_report(ReportConfig(run=run_2d))
    figures = run_2d / "report" / "figures"
    first = {path.name for path in figures.iterdir()}
    mine = figures / "old.png"
    mine.write_bytes(b"x")
    shutil.rmtree(run_2d / "explanations" / "grad-cam")  # its figures are no longer drawn
    build_report(ReportConfig(run=run_2d))
    second = {path.name for path in figures.iterdir()}
    assert "grad-cam_group_benign_panels.png" in first - second
    assert mine.read_bytes() == b"x"
    assert (figures / "explanations_2d.png").is_file()


def test_cli_report_prints_the_page_and_refuses_a_missing_folder(tmp_path):
    runner = CliRunner()
    (tmp_path / "run").mkdir()
    result = runner.invoke(app, ["report", "--run", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    missing = runner.invoke(app, ["report", "--run", str(tmp_path / "absent")])
    assert missing.exit_code == 2
    assert "run folder not found" in missing.output


def test_remote_references_finds_network_urls_and_ignores_local_ones():
    html = ('<link rel="icon" href="https://example.org/favicon.ico">'
            '<img src="data:image/png;base64,AAAA"><img src="figures/a.png">'
            '<script src="//cdn.example.org/x.js"></script>'
            '<style>body { background: url("http://example.org/b.png") }</style>'
            '<a href="#cohort">x</a>')
    found = remote_references(html)
    assert len(found) == 3
    assert all("example.org" in item for item in found)


def test_confidence_intervals_are_written_value_low_high_per_fold():
    table = pd.DataFrame({"fold": [0, 1], "metric": ["auc", "auc"], "value": [0.8, 0.75],
                          "ci_low": [0.7, 0.6], "ci_high": [0.9, 0.85]})
    html = confidence_interval_block(table).content
    assert "0.800 [0.700, 0.900]" in html and "0.750 [0.600, 0.850]" in html
    assert html.index("0.800") < html.index("0.750")


def test_matrix_of_accepts_labelled_square_tables_only():
    labelled = pd.DataFrame({"map": ["a", "b"], "a": [1.0, 0.5], "b": [0.5, 1.0]})
    matrix = matrix_of(labelled)
    assert list(matrix.index) == ["a", "b"] and matrix.loc["a", "b"] == 0.5
    assert matrix_of(pd.DataFrame({"kind": ["x", "y", "z"], "value": [1.0, 2.0, 3.0]})) is None
    assert matrix_of(pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})) is not None


def test_signed_maps_get_a_diverging_scale_centred_on_zero():
    style = map_style([np.array([-0.5, 2.0]), np.array([1.0])], "relevance")
    assert (style.vmin, style.vmax, style.cmap) == (-2.0, 2.0, "RdBu_r")
    unsigned = map_style([np.array([0.0, 3.0])], "1 - mask", threshold_fraction=0.0)
    assert (unsigned.vmin, unsigned.vmax, unsigned.threshold) == (0.0, 3.0, 0.0)


def test_canonical_puts_the_right_hemisphere_at_high_x_indices():
    # conftest's affine has a negative x step (radiological storage, like SPM's grid): voxel
    # i = 0 lies at x = +90 mm, i.e. on the right; RAS+ reorientation must move it to the end.
    volume = np.zeros(SHAPE, np.float32)
    volume[0, 5, 5] = 1.0
    oriented, zooms = canonical(volume, AFFINE)
    assert oriented[SHAPE[0] - 1, 5, 5] == 1.0 and oriented[0, 5, 5] == 0.0
    assert zooms == (6.0, 6.0, 6.0)


def test_viewers_go_round_the_methods_before_a_second_map_of_one():
    from voxplain.report.html import viewer_order
    from voxplain.report.sections import ViewerCandidate

    style = map_style([np.ones(2)], "x")
    candidates = [ViewerCandidate(f"{family}-{k}", "", np.zeros(1), np.eye(4), style, family)
                  for family, k in (("mask", 0), ("a", 0), ("a", 1), ("b", 0), ("b", 1))]
    assert [c.name for c in viewer_order(candidates)] == ["mask-0", "a-0", "b-0", "a-1", "b-1"]


def test_the_mean_over_folds_row_of_the_ci_table_reads_all():
    # the layout `voxplain evaluate classification` writes: per-fold rows and a mean row whose
    # fold is blank; columns that vary per metric (n_valid, per_fold) are not row labels
    table = pd.DataFrame({"scope": ["fold", "fold", "mean", "mean"], "fold": [0, 0, None, None],
                          "run": [0, 0, 0, 0], "metric": ["auc", "mcc"] * 2,
                          "value": [0.9, 0.5, 0.85, 0.4], "ci_low": [0.8, 0.3, 0.7, 0.2],
                          "ci_high": [1.0, 0.7, 0.95, 0.6], "n_valid": [1000, 990, 1000, 980],
                          "per_fold": ["", "", "0.9, 0.8", "0.5, 0.3"]})
    html = confidence_interval_block(table).content
    body = html[html.index("<tbody>"):]
    rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)]
    assert rows == [["fold", "0", "0", "0.900 [0.800, 1.000]", "0.500 [0.300, 0.700]"],
                    ["mean", "all", "0", "0.850 [0.700, 0.950]", "0.400 [0.200, 0.600]"]]


def test_masks_section_shows_the_first_pass_beside_the_final_mask_and_every_grid_mask(tmp_path):
    """Quality check step 2's two masks side by side with the removed image named; paper 1's
    figs. 3-4: one panel per grid setting (learning rate included)."""
    from voxplain.report.sections import ReportContext, masks_section
    from voxplain.run import RunFolder

    run = tmp_path / "run"
    rng = np.random.default_rng(2)
    group = run / "masks/group/fold-0/run-0"
    _save(group / "mask.nii.gz", 1 - _smooth(rng, False).clip(0, 1))
    _save(group / "first/mask.nii.gz", 1 - _smooth(rng, False).clip(0, 1))
    (group / "summary.json").write_text(json.dumps({
        "fold": 0, "run": 0, "diagnosis": "AD", "probability_before": 0.9,
        "probability_after": 0.01, "masked_fraction": 0.1, "top_regions": [],
        "removed": ["sub-01_ses-M00"], "flagged": False, "flag_reasons": []}))
    pd.DataFrame({"participant_id": ["sub-01", "sub-03"], "session_id": ["ses-M00"] * 2,
                  "excess": [0.5, 0.0], "robust_z": [40.0, 0.0], "flagged": [True, False],
                  "removed": [True, False]}).to_csv(group / "qc_flags.tsv", sep="\t",
                                                    index=False)
    settings = ("l1-0.0001_l2-0.01_b1-0.1_b2-1", "l1-0.0001_l2-0.1_b1-0.1_b2-1_lr-0.01",
                "l1-0.001_l2-0.01_b1-0.1_b2-1")
    for setting in settings:
        _save(run / "masks/grid" / setting / "fold-0/run-0/mask.nii.gz",
              1 - _smooth(rng, False).clip(0, 1))
    context = ReportContext(RunFolder(run), ReportConfig(run=run), tmp_path / "figures")
    section = masks_section(context)
    texts = [block.content for block in section.blocks if block.kind == "text"]
    assert any("removed sub-01_ses-M00" in text and "first/" in text for text in texts)
    captions = {str(block.content).rsplit("/", 1)[-1]: block.caption for block in section.blocks
                if block.kind == "figure"}
    assert "first pass" in captions["group_mask_qc_step2_fold-0_run-0.png"]
    assert "one panel per setting" in captions["grid_masks.png"]
    assert (tmp_path / "figures/grid_masks.png").stat().st_size > 1000
