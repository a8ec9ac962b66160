"""``voxplain import program`` (torch.export programs, loaded without unpickling) and
``voxplain.import_model`` / model ``python`` (a factory of the user's own code)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cohort
from torch import nn
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import ExplainStepConfig, GroupMaskStepConfig, ModelConfig
from voxplain.explain.methods import METHODS
from voxplain.models.folding import fold_batch_norm
from voxplain.models.programs import ProgramError, export_program, is_program, load_program
from voxplain.models.registry import build_model
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder
from voxplain.steps.explain import run_explain
from voxplain.steps.imports import import_model
from voxplain.steps.masks import run_group_masks
from voxplain.steps.pipeline import run_pipeline

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SHAPE = (12, 14, 12)
CNN = ModelConfig(name="cnn", input_shape=list(SHAPE))


def trained_looking_cnn(seed: int) -> nn.Module:
    """voxplain's own ``cnn`` with random weights and batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    model = build_model(CNN)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def cohort_images(folder: Path) -> tuple[pd.DataFrame, torch.Tensor]:
    table = pd.read_csv(folder / "cohort.tsv", sep="\t")
    x = np.stack([nib.load(folder / p).get_fdata(dtype=np.float32) for p in table.path])
    return table, torch.from_numpy(x[:, None])


@pytest.fixture(scope="module")
def program_run(tmp_path_factory):
    """Two folds of voxplain's tiny ``cnn`` exported with torch.export, imported from the
    command line."""
    folder = tmp_path_factory.mktemp("program")
    cohort = write_cohort(folder / "cohort", subjects=8, sessions=1, shape=SHAPE)
    originals = [trained_looking_cnn(seed) for seed in (0, 1)]
    example = torch.rand(2, 1, *SHAPE)
    programs = [export_program(model, example, folder / f"fold-{i}.pt2")
                for i, model in enumerate(originals)]
    result = CliRunner().invoke(app, [
        "import", "program", "--program", ",".join(map(str, programs)), "--cohort", str(cohort),
        "--out", str(folder / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return folder, originals


def test_an_imported_program_predicts_as_the_original_network(program_run):
    folder, originals = program_run
    run = RunFolder(folder / "run")
    assert [f for f, _, _ in run.model_dirs()] == [0, 1]
    assert (run.model_dir(0, 0) / "model.pt2").is_file()
    _, x = cohort_images(folder / "cohort")
    for fold, original in enumerate(originals):
        model, description = load_model(run.model_dir(fold, 0))
        assert is_program(model) and description["model"]["name"] == "program"
        torch.testing.assert_close(model(x), original(x))
    assert run.train_config().model.name == "program"


def test_saliency_integrated_gradients_and_grad_cam_of_a_program_equal_the_original_s(
        program_run):
    folder, originals = program_run
    run = RunFolder(folder / "run")
    table, x = cohort_images(folder / "cohort")
    for method in ("saliency", "grad_cam"):
        index = run_explain(ExplainStepConfig(run=run.root, folds=[0], device="cpu",
                                              explain={"method": method}))
        where = [int(np.flatnonzero(table.participant_id == p)[0]) for p in index.participant_id]
        classes = load_model(run.model_dir(0, 0))[1]["classes"]
        targets = [classes.index(target) for target in index.target]
        expected = METHODS[method](originals[0]).explain(x[where], targets)
        for row, values in zip(index.itertuples(), expected[:, 0].numpy()):
            written = nib.load(run.explanation_dir(method, 0, 0) / row.path).get_fdata()
            np.testing.assert_allclose(written, values, rtol=1e-4,
                                       atol=1e-5 * np.abs(values).max())
    layers = pd.read_csv(run.explanation_dir("grad_cam", 0, 0) / "index.tsv", sep="\t").layer
    assert set(layers) == {"features.1.0.2"}  # the rule's layer, as on the original network
    program, _ = load_model(run.model_dir(0, 0))
    options = {"n_steps": 8}
    torch.testing.assert_close(
        METHODS["integrated_gradients"](program, **options).explain(x[:2], 1),
        METHODS["integrated_gradients"](originals[0], **options).explain(x[:2], 1))


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "occlusion", "grad_cam_pp",
                                    "hires_cam", "layer_cam"])
def test_other_gradient_and_layer_methods_of_a_program_equal_the_original_s(program_run, method):
    folder, originals = program_run
    program, _ = load_model(RunFolder(folder / "run").model_dir(0, 0))
    _, x = cohort_images(folder / "cohort")
    torch.testing.assert_close(METHODS[method](program).explain(x[:2], 1),
                               METHODS[method](originals[0]).explain(x[:2], 1))


def test_masks_run_on_a_program_and_its_copy_computes_the_same(program_run):
    folder, originals = program_run
    run = RunFolder(folder / "run")
    program, _ = load_model(run.model_dir(0, 0))
    copied = fold_batch_norm(program)  # what masks run: a copy, for a program nothing folded
    _, x = cohort_images(folder / "cohort")
    assert copied is not program and is_program(copied)
    torch.testing.assert_close(copied(x), originals[0](x))
    summary = run_group_masks(GroupMaskStepConfig(run=run.root, folds=[0], device="cpu",
                                                  mask={"max_epochs": 2}))
    assert list(summary.fold) == [0]


def test_replaying_a_program_run_s_config_toml_keeps_its_models(program_run):
    folder, _ = program_run
    run = RunFolder(folder / "run")
    weights = (run.model_dir(0, 0) / "model.safetensors").read_bytes()
    steps = [step.label for step, _ in run_pipeline(run.config_file)]
    assert steps[:2] == ["[import_program]", "[train]"]
    assert (run.model_dir(0, 0) / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("method, needs", [
    ("lrp", "LRP rule"), ("deep_taylor", "LRP rule"), ("cam", "linear layer"),
    ("deeplift_shap", "activations")])
def test_methods_that_need_module_types_name_what_a_program_lacks(program_run, method, needs):
    folder, _ = program_run
    program, _ = load_model(RunFolder(folder / "run").model_dir(0, 0))
    with pytest.raises(ValueError, match=rf"^{method} needs .*{needs}.*exported program"):
        METHODS[method](program)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _rewrite(source: Path, target: Path, change) -> Path:
    """A copy of the archive ``source`` with ``change(name, data) -> data | None`` applied."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def test_torchscript_and_archives_that_would_be_unpickled_are_refused_unread(program_run,
                                                                             tmp_path):
    folder, originals = program_run
    marker = tmp_path / "pwned"
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(originals[0], torch.rand(1, 1, *SHAPE)), scripted)
    with pytest.raises(ProgramError, match="TorchScript file.*refused"):
        load_program(scripted)
    pickled = tmp_path / "pickled.pt2"
    torch.save(_Exploit(marker), pickled)
    with pytest.raises(ProgramError, match="refused|not a torch.export"):
        load_program(pickled)

    source = folder / "fold-0.pt2"

    def use_pickle(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["use_pickle"] = True
            return json.dumps(config)
        return data

    with pytest.raises(ProgramError, match="stored as a pickle"):
        load_program(_rewrite(source, tmp_path / "use_pickle.pt2", use_pickle))

    def sympy_eval(name, data):
        if name.endswith("models/model.json"):
            return data.replace(b"Symbol('s",
                                b"__import__('pathlib').Path('" + str(marker).encode() +
                                b"').touch() or Symbol('s")
        return data

    with pytest.raises(ProgramError, match="not plain arithmetic"):
        load_program(_rewrite(source, tmp_path / "sympy.pt2", sympy_eval))

    exploit = tmp_path / "exploit.pt"
    torch.save(_Exploit(marker), exploit)

    def sample_inputs(name, data):  # torch would retry these with weights_only=False
        return exploit.read_bytes() if name.endswith("sample_inputs/model.pt") else data

    with pytest.raises(ProgramError, match="not a loadable torch.export program"):
        load_program(_rewrite(source, tmp_path / "inputs.pt2", sample_inputs))

    extra = _rewrite(source, tmp_path / "aoti.pt2", lambda name, data: data)
    with zipfile.ZipFile(extra, "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ProgramError, match="aotinductor.*not part of a plain exported program"):
        load_program(extra)
    assert not marker.exists()


def test_a_program_exported_for_one_batch_size_is_refused_at_import(program_run, tmp_path):
    folder, originals = program_run
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(originals[0], (torch.rand(1, 1, *SHAPE),)), fixed)
    result = CliRunner().invoke(app, [
        "import", "program", "--program", f"{fixed},{fixed}", "--cohort",
        str(folder / "cohort/cohort.tsv"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code != 0 and "dynamic batch size" in result.output


NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width=4, n_classes=2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool3d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                  nn.Linear(width, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def tiny(width=4):
    return TinyNet(width=width)
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A module of the user's own networks, ``voxplain_test_nets``, on sys.path."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code/voxplain_test_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(__import__("sys").modules, "voxplain_test_nets", raising=False)
    import voxplain_test_nets

    return voxplain_test_nets


def test_import_model_records_a_factory_that_later_steps_import(user_code, program_run,
                                                                tmp_path):
    folder, _ = program_run
    torch.manual_seed(3)
    modules = [user_code.tiny(width=6).eval() for _ in range(2)]
    summary = import_model(modules, cohort=folder / "cohort/cohort.tsv", out=tmp_path / "run",
                           factory="voxplain_test_nets:tiny", arguments={"width": 6},
                           device="cpu")
    assert list(summary.fold) == [0, 1]
    run = RunFolder(tmp_path / "run")
    model, description = load_model(run.model_dir(1, 0))
    assert description["model"]["factory"] == "voxplain_test_nets:tiny"
    assert description["model"]["arguments"] == {"width": 6}
    _, x = cohort_images(folder / "cohort")
    torch.testing.assert_close(model(x), modules[1](x))
    assert "import_python" in run.config_file.read_text()
    index = run_explain(ExplainStepConfig(run=run.root, folds=[0], device="cpu",
                                          explain={"method": "grad_cam"}))
    assert set(index.layer) == {"features.1"}  # the user's nn.ReLU, found by the layer rule


def test_import_python_from_the_command_line(user_code, program_run, tmp_path):
    folder, _ = program_run
    torch.manual_seed(5)
    modules = [user_code.tiny(width=5).eval() for _ in range(2)]
    weights = []
    for index, module in enumerate(modules):
        weights.append(tmp_path / f"fold-{index}.pt")
        torch.save({"state_dict": module.state_dict(), "epoch": 9}, weights[-1])
    result = CliRunner().invoke(app, [
        "import", "python", "--factory", "voxplain_test_nets:tiny", "--args", '{"width": 5}',
        "--weights", ",".join(map(str, weights)), "--cohort", str(folder / "cohort/cohort.tsv"),
        "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model, description = load_model(tmp_path / "run/models/fold-1/run-0")
    assert description["best_epoch"] == 9
    _, x = cohort_images(folder / "cohort")
    torch.testing.assert_close(model(x), modules[1](x))


def test_import_model_takes_the_class_as_factory_or_exports_a_program(user_code, program_run,
                                                                     tmp_path):
    folder, _ = program_run
    cohort = folder / "cohort/cohort.tsv"
    torch.manual_seed(4)
    modules = [user_code.TinyNet().eval() for _ in range(2)]
    import_model(modules, cohort=cohort, out=tmp_path / "python", device="cpu")
    _, description = load_model(tmp_path / "python/models/fold-0/run-0")
    assert description["model"]["factory"] == "voxplain_test_nets:TinyNet"
    import_model(modules, cohort=cohort, out=tmp_path / "program", export=True, device="cpu")
    program, description = load_model(tmp_path / "program/models/fold-1/run-0")
    assert is_program(program) and description["model"]["name"] == "program"
    _, x = cohort_images(folder / "cohort")
    torch.testing.assert_close(program(x), modules[1](x))

    class Local(nn.Module):
        def forward(self, x):
            return x.mean((2, 3, 4)).repeat(1, 2)

    with pytest.raises(ValueError, match="could not import it.*export=True"):
        import_model([Local(), Local()], cohort=cohort, out=tmp_path / "local", device="cpu")


def test_python_models_in_a_model_config_are_imported_by_name(user_code):
    model = build_model(ModelConfig(name="python", factory="voxplain_test_nets:tiny",
                                    arguments={"width": 3}))
    assert model.features[0].out_channels == 3
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        build_model(ModelConfig(name="python", factory="no_such_module:f"))
    with pytest.raises(ValueError, match="package.module:function"):
        ModelConfig(name="python", factory="not a factory")
    with pytest.raises(ValueError, match="read from its file"):
        build_model(ModelConfig(name="program"))
