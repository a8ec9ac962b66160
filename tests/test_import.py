"""``voxplain import``: run folders around models voxplain did not train (a ClinicaDL MAPS, a
MONAI network), which the explain and mask steps take unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cohort
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import (ClinicaDLImportConfig, ExplainStepConfig, GroupMaskStepConfig,
                             ModelConfig, MonaiImportConfig)
from voxplain.data.cohort import CohortError
from voxplain.explain.layers import choose_cam_layer
from voxplain.explain.methods import METHODS
from voxplain.models.clinicadl import Conv4FC3, Conv5FC3, PadMaxPool
from voxplain.models.registry import build_model
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder, RunFolderError
from voxplain.steps.explain import run_explain
from voxplain.steps.imports import run_import_clinicadl, run_import_monai
from voxplain.steps.masks import run_group_masks
from voxplain.steps.pipeline import run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (20, 24, 20)
MONAI_SHAPE = (32, 36, 32)  # DenseNet halves the grid 5 times: 32 voxels per axis at least
TINY_DENSENET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4,
                 "growth_rate": 4, "block_config": [1, 1, 1, 1]}


def clinicadl_weights(seed: int, shape=SHAPE, network=Conv5FC3) -> dict[str, torch.Tensor]:
    """A ClinicaDL-named state dict with random weights and batch-norm statistics (as a
    trained model has: not the identity)."""
    torch.manual_seed(seed)
    model = network(shape)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def write_maps(root: Path, cohort: Path, splits: int = 2, architecture: str = "Conv5_FC3",
               **parameters) -> Path:
    """A ClinicaDL MAPS folder of the documented layout: maps.json, the split TSVs
    (subjects in ``splits`` groups) and each split's best-loss and best-balanced_accuracy
    checkpoints, saved with torch.save as ClinicaDL does."""
    table = pd.read_csv(cohort, sep="\t", dtype=str)
    subjects = sorted(table.participant_id.unique())
    (root / "maps.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "maps.json").write_text(json.dumps({
        "architecture": architecture, "multi_network": False, "mode": "image",
        "network_task": "classification", "label": "diagnosis", "dropout": 0.5,
        "selection_metrics": ["loss", "balanced_accuracy"], **parameters}))
    for split in range(splits):
        # every other pair of subjects: each validation set holds both diagnoses
        held_out = [s for i, s in enumerate(subjects) if (i // 2) % splits == split]
        folder = root / "groups" / "train" / f"split-{split}"
        folder.mkdir(parents=True)
        columns = ["participant_id", "session_id", "diagnosis", "age"]
        table[~table.participant_id.isin(held_out)][columns].to_csv(folder / "train.tsv",
                                                                   sep="\t", index=False)
        table[table.participant_id.isin(held_out)][columns].to_csv(folder / "validation.tsv",
                                                                  sep="\t", index=False)
        for metric, seed in (("loss", split), ("balanced_accuracy", 100 + split)):
            best = root / f"split-{split}" / f"best-{metric}"
            best.mkdir(parents=True)
            torch.save({"model": clinicadl_weights(seed), "epoch": 3 + split,
                        "name": "model.pth.tar"}, best / "model.pth.tar")
    return root


@pytest.fixture(scope="module")
def maps_run(tmp_path_factory):
    """A MAPS of two splits over a tiny cohort, imported with its best-loss models."""
    folder = tmp_path_factory.mktemp("clinicadl")
    cohort = write_cohort(folder / "cohort", subjects=8, shape=SHAPE)
    maps = write_maps(folder / "maps", cohort)
    summary = run_import_clinicadl(ClinicaDLImportConfig(maps=maps, cohort=cohort,
                                                         run=folder / "run", device="cpu"))
    return folder, summary


def test_pad_max_pool_pads_at_the_start_of_each_axis_as_clinicadl():
    x = torch.rand(2, 3, 5, 6, 7)
    # ClinicaDL's PadMaxPool3d: ConstantPad3d before each odd axis, then MaxPool3d(2, 2)
    reference = nn.MaxPool3d(2, 2)(nn.ConstantPad3d((1, 0, 0, 0, 1, 0), 0.0)(x))
    torch.testing.assert_close(PadMaxPool(2, 2)(x), reference)
    assert not torch.equal(PadMaxPool(2, 2)(x), nn.MaxPool3d(2, 2, ceil_mode=True)(x))
    image = torch.rand(1, 1, 5, 4)
    torch.testing.assert_close(PadMaxPool(2, 2, spatial_dims=2)(image),
                               nn.MaxPool2d(2, 2)(nn.ConstantPad2d((0, 0, 1, 0), 0.0)(image)))


def test_clinicadl_networks_have_clinicadl_s_parameter_names_and_widths():
    state = Conv5FC3((21, 25, 19)).state_dict()
    blocks = [f"convolutions.{4 * i}.{p}" for i in range(5) for p in ("weight", "bias")]
    norms = [f"convolutions.{4 * i + 1}.{p}" for i in range(5) for p in
             ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    linear = [f"fc.{i}.{p}" for i in (2, 4, 6) for p in ("weight", "bias")]
    assert set(state) == set(blocks + norms + linear)
    assert [state[f"convolutions.{4 * i}.weight"].shape[0] for i in range(5)] == [8, 16, 32, 64, 128]
    # 21x25x19 -> 1x1x1 after five pools of 2 (rounding up): 128 features
    assert state["fc.2.weight"].shape == (1300, 128)
    assert state["fc.4.weight"].shape == (50, 1300) and state["fc.6.weight"].shape == (2, 50)
    model = Conv5FC3((40, 70, 33)).eval()
    assert model.fc[2].in_features == model.convolutions(torch.zeros(1, 1, 40, 70, 33)).numel()
    small = Conv4FC3((21, 25, 19)).state_dict()
    assert small["fc.2.weight"].shape == (50, 128) and small["fc.6.weight"].shape == (2, 40)


def test_default_cam_layer_of_imported_architectures_is_an_activated_block_output():
    conv5 = Conv5FC3((24, 28, 24)).eval()
    # block 3's ReLU (6x7x6); block 4's would be 3x4x3, fewer than 4 voxels along an axis
    assert choose_cam_layer(conv5, (24, 28, 24), 1).name == "convolutions.10"
    assert choose_cam_layer(conv5, (24, 28, 24), 1, min_size=1).name == "convolutions.18"
    densenet = build_model(ModelConfig(name="monai", network="DenseNet121",
                                       arguments=TINY_DENSENET)).eval()
    # the activated output of the final norm of `features` (MONAI applies its ReLU first thing
    # in class_layers), when every layer is allowed
    assert choose_cam_layer(densenet, MONAI_SHAPE, 1, min_size=1).name == "class_layers.relu"
    choice = choose_cam_layer(densenet, MONAI_SHAPE, 1)
    assert choice.name == "features.transition2.relu" and choice.shape == (4, 4, 4)


def test_clinicadl_import_writes_a_run_folder_of_every_split(maps_run):
    folder, summary = maps_run
    run = RunFolder(folder / "run")
    assert [(f, r) for f, r, _ in run.model_dirs()] == [(0, 0), (1, 0)]
    assert list(summary.fold) == [0, 1] and list(summary.best_epoch) == [3, 4]
    model, description = load_model(run.model_dir(0, 0))
    assert isinstance(model, Conv5FC3) and description["classes"] == ["AD", "CN"]  # sorted
    assert description["imported"]["selection_metric"] == "loss"
    assert description["input"]["resampled"] is False
    maps_split = pd.read_csv(folder / "maps/groups/train/split-1/validation.tsv", sep="\t")
    assert list(run.read_split(1, "validation").session_id) == list(maps_split.session_id)
    assert run.train_config().model.name == "clinicadl_conv5_fc3"


def test_clinicadl_import_maps_equal_those_of_the_weights_loaded_directly(maps_run):
    folder, _ = maps_run
    direct = Conv5FC3(SHAPE)
    direct.load_state_dict(clinicadl_weights(seed=0))
    direct.eval()
    run = RunFolder(folder / "run")
    rows = run.read_split(0, "validation")
    cohort = pd.read_csv(folder / "cohort/cohort.tsv", sep="\t").merge(
        rows[["participant_id", "session_id"]])
    x = torch.from_numpy(np.stack([nib.load(folder / "cohort" / p).get_fdata(dtype=np.float32)
                                   for p in cohort.path])[:, None])
    targets = [["AD", "CN"].index(d) for d in cohort.diagnosis]
    for method in ("grad_cam", "saliency"):
        index = run_explain(ExplainStepConfig(run=run.root, folds=[0], device="cpu",
                                              explain={"method": method}))
        expected = METHODS[method](direct).explain(x, targets)[:, 0].numpy()
        for row, values in zip(index.itertuples(), expected):
            written = nib.load(run.explanation_dir(method, 0, 0) / row.path).get_fdata()
            np.testing.assert_allclose(written, values, rtol=1e-4,
                                       atol=1e-5 * np.abs(values).max())


def test_grad_cam_of_the_imported_run_reads_the_rule_s_layer(maps_run):
    folder, _ = maps_run
    index = pd.read_csv(folder / "run/explanations/grad_cam/fold-0/run-0/index.tsv", sep="\t")
    assert set(index.layer) == {choose_cam_layer(Conv5FC3(SHAPE).eval(), SHAPE, 1).name}


def test_selection_metric_picks_the_best_balanced_accuracy_checkpoint(maps_run, tmp_path):
    folder, _ = maps_run
    run_import_clinicadl(ClinicaDLImportConfig(
        maps=folder / "maps", cohort=folder / "cohort/cohort.tsv", run=tmp_path / "run",
        selection_metric="balanced_accuracy", folds=[1], device="cpu"))
    model, _ = load_model(tmp_path / "run/models/fold-1/run-0")
    torch.testing.assert_close(model.state_dict()["fc.6.weight"],
                               clinicadl_weights(seed=101)["fc.6.weight"])
    assert not (tmp_path / "run/models/fold-0").exists()


class _Exploit:
    """Pickling this object makes unpickling run ``Path.touch(target)``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_checkpoint_that_needs_unpickling_is_refused_and_never_run(maps_run, tmp_path):
    folder, _ = maps_run
    cohort = folder / "cohort/cohort.tsv"
    maps = write_maps(tmp_path / "maps", cohort, splits=1)
    marker = tmp_path / "pwned"
    checkpoint = maps / "split-0/best-loss/model.pth.tar"
    torch.save({"model": clinicadl_weights(0), "epoch": 1, "payload": _Exploit(marker)},
               checkpoint)
    with pytest.raises(ValueError, match=r"model\.pth\.tar: refused to load.*unpickling"):
        run_import_clinicadl(ClinicaDLImportConfig(maps=maps, cohort=cohort,
                                                   run=tmp_path / "run", device="cpu"))
    assert not marker.exists()


def test_a_split_session_missing_from_the_cohort_is_named(maps_run, tmp_path):
    folder, _ = maps_run
    table = pd.read_csv(folder / "cohort/cohort.tsv", sep="\t")
    table["path"] = [str(folder / "cohort" / p) for p in table.path]
    short = tmp_path / "cohort.tsv"
    table[table.participant_id != "sub-03"].to_csv(short, sep="\t", index=False)
    with pytest.raises(CohortError, match="split-0/train.tsv: sub-03 ses-M00 is not in"):
        run_import_clinicadl(ClinicaDLImportConfig(maps=folder / "maps", cohort=short,
                                                   run=tmp_path / "run", device="cpu"))


def test_a_cohort_on_another_grid_is_refused(maps_run, tmp_path):
    folder, _ = maps_run
    other = write_cohort(tmp_path / "cohort", subjects=8, shape=(40, 44, 40))
    with pytest.raises(CohortError, match="takes 128 features; images of shape .* give 1024"):
        run_import_clinicadl(ClinicaDLImportConfig(maps=folder / "maps", cohort=other,
                                                   run=tmp_path / "run", device="cpu"))


@pytest.mark.parametrize("change, message", [
    ({"multi_network": True}, "multi_network"),
    ({"architecture": "resnet18"}, "architecture 'resnet18'"),
    ({"mode": "patch"}, "mode is 'patch'"),
])
def test_a_maps_voxplain_cannot_rebuild_is_refused(maps_run, tmp_path, change, message):
    folder, _ = maps_run
    maps = write_maps(tmp_path / "maps", folder / "cohort/cohort.tsv", splits=1, **change)
    with pytest.raises(ValueError, match=message):
        run_import_clinicadl(ClinicaDLImportConfig(maps=maps, cohort=folder / "cohort/cohort.tsv",
                                                   run=tmp_path / "run", device="cpu"))


def test_lrp_refuses_a_network_with_modules_it_has_no_rule_for():
    with pytest.raises(ValueError, match=r"no LRP rule for module 'fc.0' \(Flatten\)"):
        METHODS["lrp"](Conv5FC3(SHAPE))


@pytest.fixture(scope="module")
def monai_cohort(tmp_path_factory):
    """A tiny cohort on a grid DenseNet takes, and two folds of tiny DenseNet121 weights: one
    safetensors file, one weights-only checkpoint with the state dict under 'state_dict'."""
    folder = tmp_path_factory.mktemp("monai")
    cohort = write_cohort(folder / "cohort", subjects=8, sessions=1, shape=MONAI_SHAPE)
    config = ModelConfig(name="monai", network="DenseNet121", arguments=TINY_DENSENET)
    torch.manual_seed(0)
    save_file(build_model(config).state_dict(), str(folder / "fold-0.safetensors"))
    torch.save({"state_dict": build_model(config).state_dict(), "epoch": 7}, folder / "fold-1.pt")
    return folder, cohort


def test_monai_densenet_imports_explains_and_masks_from_the_command_line(monai_cohort):
    folder, cohort = monai_cohort
    runner = CliRunner()
    result = runner.invoke(app, [
        "import", "monai", "--network", "DenseNet121", "--args", json.dumps(TINY_DENSENET),
        "--weights", f"{folder / 'fold-0.safetensors'},{folder / 'fold-1.pt'}",
        "--cohort", str(cohort), "--out", str(folder / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = RunFolder(folder / "run")
    assert [f for f, _, _ in run.model_dirs()] == [0, 1]
    _, description = load_model(run.model_dir(1, 0))
    assert description["model"]["network"] == "DenseNet121" and description["best_epoch"] == 7
    result = runner.invoke(app, ["explain", "--run", str(run.root), "--method",
                                 "grad_cam,saliency", "--folds", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    grad_cam = pd.read_csv(run.explanation_dir("grad_cam", 0, 0) / "index.tsv", sep="\t")
    assert set(grad_cam.layer) == {"features.transition2.relu"}
    for method in ("grad_cam", "saliency"):
        for path in pd.read_csv(run.explanation_dir(method, 0, 0) / "index.tsv", sep="\t").path:
            values = nib.load(run.explanation_dir(method, 0, 0) / path).get_fdata()
            assert values.shape == MONAI_SHAPE and np.isfinite(values).all()
    predicted = pd.read_csv(run.model_dir(0, 0) / "predictions-validation.tsv", sep="\t")
    run_group_masks(GroupMaskStepConfig(run=run.root, folds=[0], device="cpu",
                                        diagnosis=predicted.predicted.mode()[0],
                                        mask={"max_epochs": 2, "batch_size": 4}))
    assert (run.mask_dir("group", 0, 0) / "mask.nii.gz").is_file()


def test_monai_splits_come_from_a_folder_and_weights_must_fit(monai_cohort, tmp_path):
    folder, cohort = monai_cohort
    table = pd.read_csv(cohort, sep="\t")
    splits = tmp_path / "splits" / "split-0"
    splits.mkdir(parents=True)
    table[table.participant_id > "sub-01"].to_csv(splits / "train.tsv", sep="\t", index=False)
    table[table.participant_id <= "sub-01"].to_csv(splits / "validation.tsv", sep="\t",
                                                   index=False)
    config = MonaiImportConfig(network="DenseNet121", arguments=TINY_DENSENET,
                               weights=[folder / "fold-0.safetensors"], splits=tmp_path / "splits",
                               cohort=cohort, run=tmp_path / "run", device="cpu")
    run_import_monai(config)
    assert list(RunFolder(tmp_path / "run").read_split(0, "validation").participant_id) == [
        "sub-00", "sub-01"]
    wider = {**TINY_DENSENET, "init_features": 8}
    with pytest.raises(ValueError, match="fold-0.safetensors: the weights do not fit DenseNet121"):
        run_import_monai(config.model_copy(update={"arguments": wider,
                                                   "run": tmp_path / "other"}))


def test_a_single_logit_network_of_three_classes_is_refused(monai_cohort, tmp_path):
    folder, cohort = monai_cohort
    table = pd.read_csv(cohort, sep="\t")
    three = table.assign(diagnosis=["CN", "AD", "MCI", "CN", "AD", "MCI", "CN", "AD"],
                         path=[str(cohort.parent / path) for path in table.path])
    three.to_csv(tmp_path / "three.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"1 output\(s\) but there are 3 classes .*a single "
                                         r"output, a sigmoid, needs two classes"):
        run_import_monai(MonaiImportConfig(
            network="DenseNet121", arguments={**TINY_DENSENET, "out_channels": 1},
            weights=[folder / "fold-0.safetensors"] * 2, cohort=tmp_path / "three.tsv",
            run=tmp_path / "run", device="cpu"))


def test_unknown_monai_networks_and_downloads_are_refused():
    with pytest.raises(ValueError, match="'NoSuchNet' is not a network of monai"):
        build_model(ModelConfig(name="monai", network="NoSuchNet", arguments={}))
    with pytest.raises(ValueError, match="pretrained weights would be downloaded"):
        build_model(ModelConfig(name="monai", network="DenseNet121",
                                arguments={**TINY_DENSENET, "pretrained": True}))
    # EfficientNetBN downloads ImageNet weights by default in 2D: built without them
    model = build_model(ModelConfig(name="monai", network="EfficientNetBN", arguments={
        "model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 1, "num_classes": 2}))
    assert model.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 2)


def test_replaying_the_imported_run_s_config_toml_keeps_its_splits_and_models(maps_run):
    folder, _ = maps_run
    run = RunFolder(folder / "run")
    splits = {fold: run.read_split(fold, "validation") for fold in (0, 1)}
    weights = (run.model_dir(0, 0) / "model.safetensors").read_bytes()
    steps = [step.label for step, _ in run_pipeline(run.config_file)]
    assert steps[:2] == ["[import_clinicadl]", "[train]"]
    for fold, table in splits.items():
        pd.testing.assert_frame_equal(run.read_split(fold, "validation"), table)
    assert (run.model_dir(0, 0) / "model.safetensors").read_bytes() == weights


def test_a_later_cohort_on_another_grid_is_refused_by_the_imported_run(maps_run, tmp_path):
    folder, _ = maps_run
    other = write_cohort(tmp_path / "other", subjects=2, sessions=1, shape=(22, 24, 20))
    with pytest.raises(RunFolderError, match=r"images are \(22, 24, 20\).*take \(20, 24, 20\)"):
        run_explain(ExplainStepConfig(run=folder / "run", folds=[0], device="cpu",
                                      cohort=other, explain={"method": "saliency"}))
