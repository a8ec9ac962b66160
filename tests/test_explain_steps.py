"""``voxplain explain`` on a run folder: files, index, group maps and their sign, resume, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from conftest import AFFINE, SHAPE, write_cohort
from nilearn.image import load_img
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import ExplainStepConfig, LesionCohortConfig, TrainConfig, read_toml, to_toml
from voxplain.data.grid import Grid
from voxplain.data.lesions import generate_lesion_cohort
from voxplain.data.template import brain_mask
from voxplain.evaluate.localisation import session_localisation_summary
from voxplain.steps.localisation import evaluate_localisation, evaluate_session_localisation
from voxplain.explain.api import Explainer
from voxplain.explain.methods import METHODS
from voxplain.steps.explain import run_explain
from voxplain.run import RunFolderError, cohort_label
from voxplain.steps.train import run_train

pytestmark = pytest.mark.slow

#: The centre cube where the fixture's AD volumes are darker (conftest.write_cohort).
CUBE = tuple(slice(s // 2 - 3, s // 2 + 3) for s in SHAPE)


class SignedProbe(Explainer):
    """A known signed map: ``(mean over channels of x) - 0.5``, negated for target 0."""

    name = "test_signed_probe"
    signed = True
    samples: list[int] = []

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        type(self).samples.append(len(x))
        sign = (2.0 * target - 1).view(-1, *[1] * (x.ndim - 1))
        return sign * (x.mean(1, keepdim=True) - 0.5)


class UnsignedProbe(SignedProbe):
    """The same map declared unsigned: group maps average its magnitude."""

    name = "test_unsigned_probe"
    signed = False


class CubeOracle(Explainer):
    """Points exactly at the fixture's darker cube, whatever the input."""

    name = "test_cube_oracle"
    signed = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(len(x), 1, *x.shape[2:])
        maps[(slice(None), slice(None), *CUBE)] = 1.0
        return maps


@pytest.fixture(scope="module", autouse=True)
def probes():
    """The probe methods above, available by name (as a third-party method is added) while this
    module's tests and fixtures run, removed afterwards."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for method in (SignedProbe, UnsignedProbe, CubeOracle):
            monkeypatch.setitem(METHODS, method.name, method)
        yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    tsv = write_cohort(folder / "cohort", subjects=18)
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=3, batch_size=4,
                             learning_rate=3e-3, device="cpu",
                             model={"name": "cnn", "channels": [4, 8, 8]}))
    return folder / "run"


def step(run, method, **explain):
    folds = explain.pop("folds", [0])
    cohort = explain.pop("cohort", None)
    return ExplainStepConfig(run=run, folds=folds, device="cpu", cohort=cohort,
                             explain={"method": method, **explain})


def test_one_map_per_validation_session_with_the_cohort_affine_and_an_index(trained_run):
    index = run_explain(step(trained_run, "test_signed_probe", batch_size=3))
    folder = trained_run / "explanations/test_signed_probe/fold-0/run-0"
    validation = pd.read_csv(trained_run / "splits/fold-0/validation.tsv", sep="\t")
    assert sorted(index.participant_id) == sorted(validation.participant_id)
    assert list(index.columns[:10]) == ["participant_id", "session_id", "diagnosis", "fold",
                                        "run", "target", "predicted", "predicted_probability",
                                        "target_probability", "correct"]
    assert {"method", "layer", "path"} <= set(index.columns)
    assert (index.target == index.diagnosis).all()  # target "true"
    assert (index.predicted_probability >= 0.5).all()  # binary: the argmax class
    written = pd.read_csv(folder / "index.tsv", sep="\t")
    assert written.participant_id.tolist() == index.participant_id.tolist()
    for row in written.itertuples():
        image = nib.load(folder / row.path)
        np.testing.assert_allclose(image.affine, AFFINE)
        source = nib.load(trained_run.parent / "cohort" / f"{row.participant_id}_"
                                                           f"{row.session_id}.nii.gz")
        sign = 1.0 if row.target == "AD" else -1.0  # classes are [CN, AD]
        np.testing.assert_allclose(image.get_fdata(), sign * (source.get_fdata() - 0.5),
                                   atol=1e-6)


def test_group_map_is_the_signed_mean_for_signed_methods_and_the_mean_magnitude_otherwise(
        trained_run):
    groups = {}
    for method in ("test_signed_probe", "test_unsigned_probe"):
        run_explain(step(trained_run, method, group="all", folds=[1]))
        folder = trained_run / f"explanations/{method}_group-all/fold-1/run-0"
        index = pd.read_csv(folder / "index.tsv", sep="\t")
        for diagnosis in ("AD", "CN"):
            maps = np.stack([nib.load(folder / p).get_fdata()
                             for p in index.path[index.diagnosis == diagnosis]])
            expected = maps.mean(0) if method == "test_signed_probe" else np.abs(maps).mean(0)
            group = nib.load(folder / f"group_{diagnosis}.nii.gz")
            np.testing.assert_allclose(group.get_fdata(), expected, atol=1e-6)
            np.testing.assert_allclose(group.affine, AFFINE)
            groups[method, diagnosis] = group.get_fdata()
    # AD maps are x - 0.5, about 0.2 - 0.5 in the darker cube: the signed mean keeps the sign
    assert groups["test_signed_probe", "AD"][CUBE].mean() < -0.2
    assert groups["test_unsigned_probe", "AD"][CUBE].mean() > 0.2


def test_default_group_map_averages_the_correctly_classified_sessions_only(trained_run):
    run_explain(step(trained_run, "test_unsigned_probe", folds=[2]))
    folder = trained_run / "explanations/test_unsigned_probe/fold-2/run-0"
    index = pd.read_csv(folder / "index.tsv", sep="\t")
    assert (index.correct == (index.predicted == index.diagnosis)).all()
    for diagnosis in ("AD", "CN"):
        kept = index.path[(index.diagnosis == diagnosis) & index.correct]
        path = folder / f"group_{diagnosis}.nii.gz"
        if kept.empty:
            assert not path.exists()
            continue
        expected = np.mean([np.abs(nib.load(folder / p).get_fdata()) for p in kept], axis=0)
        np.testing.assert_allclose(nib.load(path).get_fdata(), expected, atol=1e-6)


def test_resume_explains_only_the_missing_maps(trained_run):
    config = step(trained_run, "test_signed_probe", folds=[0])
    run_explain(config)
    folder = trained_run / "explanations/test_signed_probe/fold-0/run-0"
    maps = sorted(folder.glob("sub-*.nii.gz"))
    SignedProbe.samples.clear()
    run_explain(config)  # finished: index.tsv marks it done
    assert SignedProbe.samples == []
    (folder / "index.tsv").unlink()
    maps[0].unlink()
    kept = {path: path.stat().st_mtime_ns for path in maps[1:]}
    run_explain(config)
    assert SignedProbe.samples == [1]
    assert maps[0].is_file() and (folder / "index.tsv").is_file()
    assert {path: path.stat().st_mtime_ns for path in maps[1:]} == kept


def test_predicted_and_fixed_targets(trained_run):
    index = run_explain(step(trained_run, "test_unsigned_probe", target="predicted",
                             folds=[0], group="all"))
    assert (index.target == index.predicted).all()
    assert np.allclose(index.target_probability, index.predicted_probability)
    index = run_explain(step(trained_run, "test_unsigned_probe", target="CN", folds=[0],
                             cohort=trained_run.parent / "cohort" / "cohort.tsv"))
    assert (index.target == "CN").all() and len(index) == 36  # the whole given cohort
    label = cohort_label(trained_run.parent / "cohort" / "cohort.tsv")
    assert label.startswith("cohort-cohort-")  # folder, name and a hash of the path
    assert (trained_run / f"explanations/test_unsigned_probe_target-CN_cohort-{label}/fold-0/"
                          "run-0/index.tsv").is_file()


def test_a_layer_keys_the_folder_so_two_layers_do_not_overwrite_each_other(trained_run):
    for layer in ("features.1.0.0", "features.2.0.0"):
        index = run_explain(step(trained_run, "grad_cam", layer=layer, folds=[0]))
        assert (index.layer == layer).all()
    for layer in ("features.1.0.0", "features.2.0.0"):
        folder = trained_run / f"explanations/grad_cam_layer-{layer}/fold-0/run-0"
        assert len(list(folder.glob("sub-*.nii.gz"))) == 6


def test_the_layer_read_its_grid_and_coarseness_are_recorded_with_the_maps(trained_run, caplog):
    """The tiny CNN on 20x24x20: block outputs 20x24x20, 10x12x10, 5x6x5. The default rule
    reads the deepest activation keeping 4 voxels per axis; 6 moves it up one block; a layer
    given explicitly below the minimum is recorded as coarse, with a warning."""
    index = run_explain(step(trained_run, "grad_cam"))
    assert set(zip(index.layer, index.layer_shape, index.layer_coarse)) == {
        ("features.2.0.2", "5x6x5", False)}
    written = pd.read_csv(trained_run / "explanations/grad_cam/fold-0/run-0/index.tsv", sep="\t")
    assert set(written.layer_shape) == {"5x6x5"}
    finer = run_explain(step(trained_run, "grad_cam", min_layer_size=6))
    assert set(zip(finer.layer, finer.layer_shape)) == {("features.1.0.2", "10x12x10")}
    assert (trained_run / "explanations/grad_cam_min_layer_size-6/fold-0/run-0").is_dir()
    coarse = run_explain(step(trained_run, "hires_cam", layer="features.2.0.0", min_layer_size=6))
    assert coarse.layer_coarse.all() and set(coarse.layer_shape) == {"5x6x5"}
    assert "coarser than 6 along an axis" in caplog.text
    saliency = run_explain(step(trained_run, "saliency"))  # reads no layer
    assert (saliency.layer.fillna("") == "").all() and not saliency.layer_coarse.any()


def test_unknown_method_lists_the_available_ones(trained_run):
    with pytest.raises(ValueError, match=r"unknown explanation method 'nope'; available: .*"
                                         r"grad_cam.*test_signed_probe"):
        run_explain(step(trained_run, "nope"))
    assert not (trained_run / "explanations/nope").exists()


def test_unknown_layer_lists_the_valid_ones_before_anything_is_written(trained_run):
    with pytest.raises(ValueError, match=r"valid layers: features\.0\.0\.0, features\.1\.0\.0"):
        run_explain(step(trained_run, "grad_cam", layer="features.9"))
    assert not (trained_run / "explanations/grad_cam_layer-features.9").exists()


def test_an_option_the_method_does_not_take_is_an_error(trained_run):
    with pytest.raises(ValueError, match="does not take the options"):
        run_explain(step(trained_run, "test_signed_probe", options={"n_steps": 4}))


def test_a_target_that_is_not_a_class_is_refused(trained_run):
    with pytest.raises(ValueError, match=r"target class 5 is not an index of the classes"):
        run_explain(step(trained_run, "test_signed_probe", target=5))
    with pytest.raises(ValueError, match=r"'MCI' is neither true, predicted, nor a class"):
        run_explain(step(trained_run, "test_signed_probe", target="MCI"))


def test_a_run_folder_without_models_is_refused(tmp_path):
    with pytest.raises(RunFolderError, match="no trained model"):
        run_explain(step(tmp_path, "test_signed_probe"))


def test_cli_explains_several_methods_and_prints_one_localisation_row_per_method(trained_run):
    truth = np.zeros(SHAPE, np.float32)
    truth[CUBE] = 1.0
    truth_path = trained_run.parent / "truth.nii.gz"
    nib.save(nib.Nifti1Image(truth, AFFINE), truth_path)
    result = CliRunner().invoke(app, [
        "explain", "--run", str(trained_run), "--method", "test_cube_oracle,test_unsigned_probe",
        "--folds", "0", "--device", "cpu", "--group", "all"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "localisation", "--run", str(trained_run),
                                      "--against", str(truth_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "test_cube_oracle" in result.output and "Localisation" in result.output
    table = pd.read_csv(trained_run / "evaluation/localisation.tsv", sep="\t")
    oracle = table[table.method == "test_cube_oracle"].iloc[0]
    assert oracle.auc == 1.0 and oracle.pointing_game == 1.0 and oracle.mass_inside == 1.0
    assert {"test_cube_oracle", "test_unsigned_probe"} <= set(table.method)
    assert list(table.columns[:11]) == ["method", "layer", "fold", "run", "diagnosis",
                                        "n_sessions", "auc", "mass_inside", "chance_mass",
                                        "pointing_game", "top5_hit"]
    only = evaluate_localisation(trained_run, truth_path, methods=["test_cube_oracle"])
    assert only.method.unique().tolist() == ["test_cube_oracle"]
    # scoring lives in its own section: the explanations resume (and extend) after it
    recorded = read_toml(trained_run / "config.toml")
    assert recorded["evaluate_localisation"]["against"] == str(truth_path)
    assert not any("against" in values or "session_truth" in values
                   for name, values in recorded.items() if name.startswith("explain_"))
    again = CliRunner().invoke(app, [
        "explain", "--run", str(trained_run), "--method", "test_cube_oracle", "--folds", "0,1",
        "--device", "cpu", "--group", "all"])
    assert again.exit_code == 0, again.output


def test_cli_reports_an_unknown_method_in_one_line(trained_run):
    result = CliRunner().invoke(app, ["explain", "--run", str(trained_run), "--method", "nope"])
    assert result.exit_code == 2 and "available:" in result.output
    result = CliRunner().invoke(app, ["explain", "--run", str(trained_run)])
    assert result.exit_code == 2 and "--method" in result.output


@pytest.fixture(scope="module")
def synthetic_2d_run(tmp_path_factory):
    """A 2D lesion cohort on a synthetic background (no physical spacing: 1 mm pixels), trained."""
    folder = tmp_path_factory.mktemp("run_2d")
    tsv = generate_lesion_cohort(LesionCohortConfig(out=folder / "lesions", subjects=24,
                                                    size=32))
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=2, batch_size=8,
                             device="cpu", model={"name": "cnn", "channels": [4, 8, 8]}))
    return folder / "run", tsv


def nifti_slice(path) -> np.ndarray:
    """A 2D map as nibabel reads it: one slice ``(H, W, 1)``, returned ``(H, W)``."""
    image = nib.load(path)
    assert image.shape[2:] == (1,)
    return np.asarray(image.dataobj)[..., 0]


def test_two_dimensional_run_writes_nifti_maps_png_previews_and_group_maps(synthetic_2d_run):
    run, tsv = synthetic_2d_run
    index = run_explain(step(run, "test_signed_probe", group="all"))
    folder = run / "explanations/test_signed_probe_group-all/fold-0/run-0"
    for row in index.itertuples():
        assert row.path.endswith(".nii.gz")
        values = nifti_slice(folder / row.path)
        assert values.shape == (32, 32)
        assert nib.load(folder / row.path).header.get_zooms() == (1.0, 1.0, 1.0)
        source = np.load(tsv.parent / "images" / f"{row.participant_id}_{row.session_id}.npy")
        sign = 1.0 if row.target == "malignant" else -1.0  # classes are [benign, malignant]
        np.testing.assert_allclose(values, sign * (source[0] - 0.5), atol=1e-6)
        preview = Image.open(folder / row.path.replace(".nii.gz", ".png"))
        assert preview.size == (32, 32)
    for diagnosis in index.diagnosis.unique():
        assert nifti_slice(folder / f"group_{diagnosis}.nii.gz").shape == (32, 32)
        assert (folder / f"group_{diagnosis}.png").is_file()
    assert load_img(str(folder / index.path.iloc[0])).shape == (32, 32, 1)


def test_a_fold_an_earlier_version_left_with_npy_maps_resumes_keeping_them(synthetic_2d_run):
    run, _ = synthetic_2d_run
    folder = run / "explanations/test_unsigned_probe_group-all/fold-0/run-0"
    folder.mkdir(parents=True)
    first = pd.read_csv(run / "splits/fold-0/validation.tsv", sep="\t").iloc[0]
    earlier = folder / f"{first.participant_id}_{first.session_id}.npy"
    np.save(earlier, np.full((32, 32), 7.0, np.float32))  # no probe map is 7 anywhere
    index = run_explain(step(run, "test_unsigned_probe", group="all"))
    assert index.path.tolist() == [
        f"{p}_{s}.npy" if (p, s) == (first.participant_id, first.session_id) else f"{p}_{s}.nii.gz"
        for p, s in zip(index.participant_id, index.session_id)]
    np.testing.assert_array_equal(np.load(earlier), 7.0)
    assert not earlier.with_name(earlier.name.replace(".npy", ".nii.gz")).exists()
    for diagnosis in index.diagnosis.unique():
        maps = [np.load(folder / path) if path.endswith(".npy") else nifti_slice(folder / path)
                for path in index.path[index.diagnosis == diagnosis]]
        np.testing.assert_allclose(nifti_slice(folder / f"group_{diagnosis}.nii.gz"),
                                   np.mean(np.abs(maps), axis=0), atol=1e-6)
    again = run_explain(step(run, "test_unsigned_probe", group="all"))  # finished: read back
    assert again.path.tolist() == index.path.tolist()


def test_a_cohort_diagnosis_outside_the_classes_needs_another_target(trained_run):
    cohort = pd.read_csv(trained_run.parent / "cohort" / "cohort.tsv", sep="\t")
    cohort.loc[0, "diagnosis"] = "MCI"
    tsv = trained_run.parent / "cohort" / "mci.tsv"
    cohort.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"sub-00 ses-M00: diagnosis 'MCI' is not a class of the "
                                         r"model \['CN', 'AD'\]; explain it with --target"):
        run_explain(step(trained_run, "test_signed_probe", cohort=tsv))
    index = run_explain(step(trained_run, "test_signed_probe", cohort=tsv, target="predicted"))
    assert not index.correct[index.diagnosis == "MCI"].any()


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lesion_run")
    tsv = generate_lesion_cohort(LesionCohortConfig(out=folder / "lesions", subjects=24, size=32,
                                                    background="ct"))
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=1, batch_size=8,
                             device="cpu", model={"name": "cnn", "channels": [4, 8, 8]}))
    run_explain(step(folder / "run", "test_signed_probe"))
    return folder / "run", tsv


def test_a_ct_background_s_pixel_spacing_reaches_every_explanation_map_header(lesion_run):
    run, tsv = lesion_run
    cohort = pd.read_csv(tsv, sep="\t")
    package, _, relative = cohort.background_file.iloc[0].partition("/")
    assert set(cohort.background_file) == {f"{package}/{relative}"}
    root = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
    row_mm, col_mm = (float(s) for s in pydicom.dcmread(root / relative).PixelSpacing)
    # the slice's pixels, resampled so that 32 patch pixels span 45 mm
    spacing = (row_mm * cohort.background_step_row.iloc[0],
               col_mm * cohort.background_step_col.iloc[0])
    assert spacing == pytest.approx((45 / 32, 45 / 32))
    folder = run / "explanations/test_signed_probe/fold-0/run-0"
    index = pd.read_csv(folder / "index.tsv", sep="\t")
    maps = sorted(folder.glob("*.nii.gz"))  # the session maps and the group map(s)
    assert {folder / path for path in index.path} < set(maps)
    for path in maps:
        assert nib.load(path).header.get_zooms() == pytest.approx((*spacing, 1.0))
    assert load_img(str(maps[0])).header.get_zooms()[:2] == pytest.approx(spacing)


def test_every_session_map_is_scored_against_its_own_lesion_mask(lesion_run):
    run, tsv = lesion_run
    scored = evaluate_session_localisation(run, "mask_path")
    baselines = ["random", "input", "edge", "t_map", "linear_weights", "linear_pattern"]
    assert scored.method.unique().tolist() == ["test_signed_probe", *(
        f"baseline:{name}" for name in baselines)]  # scored on the same sessions, 2D too
    assert (scored.groupby("method").size() == 8).all()
    table = scored[scored.method == "test_signed_probe"]
    for row in table.itertuples():
        name = f"{row.participant_id}_{row.session_id}.npy"
        relevance = np.abs(np.load(tsv.parent / "images" / name)[0] - 0.5)  # the probe's |map|
        mask = np.load(tsv.parent / "masks" / name).astype(bool)
        assert row.mass_inside == pytest.approx(relevance[mask].sum() / relevance.sum())
        assert row.auc == pytest.approx(roc_auc_score(mask.ravel(), relevance.ravel()))
        assert row.chance_mass == pytest.approx(mask.mean())
        assert row.pointing_game == float(mask[relevance == relevance.max()].all())
    written = pd.read_csv(run / "evaluation/localisation_sessions.tsv", sep="\t")
    assert len(written) == len(scored)


def test_session_truths_of_another_cohort_resolve_from_its_folder_and_errors_name_the_file(
        lesion_run):
    run, tsv = lesion_run
    cohort = pd.read_csv(tsv, sep="\t").iloc[:4]
    other = tsv.parent / "other.tsv"
    cohort.assign(mask_path=["masks/missing.npy", *cohort.mask_path[1:]]).to_csv(
        other, sep="\t", index=False)
    run_explain(step(run, "test_unsigned_probe", cohort=other))
    with pytest.raises(FileNotFoundError, match="masks/missing.npy"):
        evaluate_session_localisation(run, "mask_path", methods=["test_unsigned_probe"])
    with pytest.raises(ValueError, match=r"no column 'lesion_mask'.*columns are"):
        evaluate_session_localisation(run, "lesion_mask")
    (run / f"explanations/test_unsigned_probe_cohort-{cohort_label(other)}").rename(
        run.parent / "other_maps")


def test_cli_scores_session_maps_with_session_truth(lesion_run):
    run, _ = lesion_run
    result = CliRunner().invoke(app, ["evaluate", "localisation", "--run", str(run),
                                      "--session-truth", "mask_path"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Localisation of every session map" in result.output
    assert "test_signed_probe" in result.output and "benign" in result.output
    result = CliRunner().invoke(app, ["evaluate", "localisation", "--run", str(run),
                                      "--session-truth", "nope"])
    assert result.exit_code != 0 and "no column 'nope'" in result.output
    result = CliRunner().invoke(app, ["evaluate", "localisation", "--run", str(run)])
    assert result.exit_code == 2 and "--against FILE" in result.output


def test_scoring_never_refuses_a_later_explanation(lesion_run):
    """Regression (issue 17): `explain --session-truth COLUMN` then `explain` was refused
    ("made with other [explain_...] settings (session_truth ...)"); now the scoring is its own
    step, and a section recorded by the old version (with the scoring keys) still resumes."""
    run, _ = lesion_run
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", "localisation", "--run", str(run),
                               "--session-truth", "mask_path"]).exit_code == 0
    again = runner.invoke(app, ["explain", "--run", str(run), "--method", "test_signed_probe",
                                "--folds", "0", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    sections = read_toml(run / "config.toml")
    old = {**sections["explain_test_signed_probe"], "session_truth": "mask_path",
           "evaluate_against": "/somewhere/truth.nii.gz"}  # as the earlier version wrote it
    (run / "config.toml").write_text(to_toml({**sections, "explain_test_signed_probe": old}))
    resumed = runner.invoke(app, ["explain", "--run", str(run), "--method", "test_signed_probe",
                                  "--folds", "0", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output


def test_session_localisation_reaches_the_summary_and_the_report(lesion_run, tmp_path):
    from voxplain.config import ReportConfig
    from voxplain.report.sections import ReportContext, localisation_section
    from voxplain.report.summary import run_summary
    from voxplain.run import RunFolder

    run, _ = lesion_run
    table = evaluate_session_localisation(run, "mask_path", methods=["test_signed_probe"])
    expected = table.groupby("diagnosis").mass_inside.mean()
    title = "Localisation of session maps against their own truth (mean per diagnosis)"
    summary = run_summary(run)[title].set_index("diagnosis")
    assert summary.maps.to_dict() == table.diagnosis.value_counts().to_dict()
    np.testing.assert_allclose(summary.mass_inside[expected.index], expected)
    section = localisation_section(ReportContext(RunFolder(run), ReportConfig(run=run), tmp_path))
    assert any("own ground truth" in block.caption for block in section.blocks)


def test_3d_session_maps_are_scored_against_each_session_s_own_truth(trained_run):
    folder = trained_run.parent / "cohort"
    cohort = pd.read_csv(folder / "cohort.tsv", sep="\t")
    (folder / "truths").mkdir(exist_ok=True)
    paths = []
    for row in cohort.itertuples():
        truth = np.zeros(SHAPE, np.float32)  # CN: no atrophy, nothing to point at
        if row.diagnosis == "AD":
            truth[CUBE] = 1.0
        paths.append(f"truths/{row.participant_id}_{row.session_id}.nii.gz")
        nib.save(nib.Nifti1Image(truth, AFFINE), folder / paths[-1])
    cohort.assign(truth_path=paths).to_csv(folder / "with_truth.tsv", sep="\t", index=False)
    run_explain(step(trained_run, "test_cube_oracle", cohort=folder / "with_truth.tsv"))
    table = evaluate_session_localisation(trained_run, "truth_path", methods=["test_cube_oracle"])
    # explanations of the run's own cohort (no truth_path column) are skipped
    assert set(table.key) == {f"test_cube_oracle_cohort-{cohort_label(folder / 'with_truth.tsv')}"}
    assert len(table) == len(cohort)
    ad, cn = table[table.diagnosis == "AD"], table[table.diagnosis == "CN"]
    assert (ad.mass_inside == 1).all() and (ad.pointing_game == 1).all() and (ad.auc == 1).all()
    in_brain = brain_mask(Grid(SHAPE, AFFINE))[CUBE].sum()  # scores count brain voxels only
    assert 0 < in_brain and (ad.truth_voxels == in_brain).all()
    assert (cn.truth_voxels == 0).all() and cn[["auc", "mass_inside", "pointing_game"]].isna().all(
        axis=None)
    summary = session_localisation_summary(table).set_index("diagnosis")
    assert summary.scored.to_dict() == {"AD": len(ad), "CN": 0}
    assert summary.maps.to_dict() == {"AD": len(ad), "CN": len(cn)}


def test_baseline_class_makes_integrated_gradients_explain_the_difference_from_that_class(
        trained_run):
    """Integrated gradients is complete: a map sums to F(x) - F(baseline). With
    ``--baseline-class CN`` the baseline is the mean of fold 0's CN training images, computed here
    from the NIfTI files and the split, so the maps sum to the target logit of each session minus
    that of the mean CN image (and not of an empty image)."""
    from voxplain.models.serialization import load_model

    for method, options in (("integrated_gradients", ["--options", "n_steps=64"]),
                            ("saliency,hires_cam", [])):
        result = CliRunner().invoke(app, [
            "explain", "--run", str(trained_run), "--method", method, "--baseline-class", "CN",
            "--folds", "0", "--device", "cpu", *options])
        assert result.exit_code == 0, result.output
    key = "integrated_gradients_n_steps-64_baseline_class-CN"
    record = (trained_run / "explanations" / key / "explanation.json").read_text()
    assert '"baseline_class": "CN"' in record
    # saliency takes no baseline: its key ignores the setting; a CAM takes one
    assert (trained_run / "explanations/saliency/fold-0/run-0/index.tsv").is_file()
    assert not list((trained_run / "explanations").glob("saliency_baseline*"))
    assert (trained_run / "explanations/hires_cam_baseline_class-CN/fold-0/run-0/index.tsv"
            ).is_file()

    def image(path: str) -> np.ndarray:
        return np.asarray(nib.load(trained_run.parent / "cohort" / path).dataobj, np.float32)

    cohort = pd.read_csv(trained_run.parent / "cohort/cohort.tsv", sep="\t")
    train = pd.read_csv(trained_run / "splits/fold-0/train.tsv", sep="\t")[
        ["participant_id", "session_id"]].merge(cohort, on=["participant_id", "session_id"])
    mean_cn = np.mean([image(p) for p in train[train.diagnosis == "CN"].path], axis=0)
    assert 0 < (train.diagnosis == "CN").sum() < len(train)

    model, description = load_model(trained_run / "models/fold-0/run-0", "cpu")
    target = description["classes"].index("AD")

    def logit(volume: np.ndarray) -> float:
        with torch.no_grad():
            return float(model(torch.tensor(volume, dtype=torch.float32)[None, None])[0, target])

    index = pd.read_csv(trained_run / "explanations" / key / "fold-0/run-0/index.tsv", sep="\t")
    rows = index[index.diagnosis == "AD"].merge(cohort[["participant_id", "session_id", "path"]],
                                                on=["participant_id", "session_id"],
                                                suffixes=("", "_image"))
    assert len(rows) >= 2
    assert abs(logit(mean_cn) - logit(np.zeros_like(mean_cn))) > 1e-2  # the baselines differ
    for row in rows.itertuples():
        attribution = np.asarray(nib.load(trained_run / "explanations" / key / "fold-0/run-0" /
                                          row.path).dataobj, dtype=np.float64)
        assert attribution.sum() == pytest.approx(logit(image(row.path_image)) - logit(mean_cn),
                                                  rel=1e-2, abs=2e-3)


def test_a_baseline_class_that_is_not_a_class_is_refused_before_anything_is_written(trained_run):
    with pytest.raises(ValueError, match=r"baseline_class 'MCI' is not a class of the model"):
        run_explain(step(trained_run, "integrated_gradients", baseline_class="MCI"))
    assert not (trained_run / "explanations/integrated_gradients_baseline_class-MCI").exists()
    with pytest.raises(ValueError, match="either as an option or as baseline_class"):
        run_explain(step(trained_run, "integrated_gradients", baseline_class="CN",
                         options={"baseline": 0.5}))


def test_a_cam_from_the_baseline_class_weights_the_difference_from_its_mean_image(trained_run):
    """hires_cam with --baseline-class CN equals HiResCAM given the mean CN training image of the
    fold (computed here from the NIfTI files) as its baseline, and differs from plain HiResCAM."""
    from voxplain.explain.cam import HiResCAM
    from voxplain.models.serialization import load_model

    run_explain(step(trained_run, "hires_cam", baseline_class="CN"))
    cohort = pd.read_csv(trained_run.parent / "cohort/cohort.tsv", sep="\t")
    train = pd.read_csv(trained_run / "splits/fold-0/train.tsv", sep="\t")[
        ["participant_id", "session_id"]].merge(cohort, on=["participant_id", "session_id"])
    images = {row.path: np.asarray(nib.load(trained_run.parent / "cohort" / row.path).dataobj,
                                   np.float32) for row in cohort.itertuples()}
    mean_cn = np.mean([images[p] for p in train[train.diagnosis == "CN"].path], axis=0)
    index = pd.read_csv(trained_run / "explanations/hires_cam_baseline_class-CN/fold-0/run-0/"
                        "index.tsv", sep="\t").merge(cohort[["participant_id", "session_id",
                                                             "path"]],
                                                     on=["participant_id", "session_id"],
                                                     suffixes=("", "_image"))
    model, description = load_model(trained_run / "models/fold-0/run-0", "cpu")
    x = torch.from_numpy(np.stack([images[p] for p in index.path_image]))[:, None]
    targets = [description["classes"].index(t) for t in index.target]
    expected = HiResCAM(model, baseline=torch.from_numpy(mean_cn)[None]).explain(x, targets)
    plain = HiResCAM(model).explain(x, targets)
    written = np.stack([np.asarray(nib.load(trained_run / "explanations/hires_cam_baseline_"
                                            "class-CN/fold-0/run-0" / p).dataobj)
                        for p in index.path])
    np.testing.assert_allclose(written, expected[:, 0].numpy(), atol=1e-5)
    assert not np.allclose(written, plain[:, 0].numpy(), atol=1e-2)

