"""The input an imported network declares (issue 20): crop or pad to its size, intensity
normalisation and a single logit, applied inside the model by every step, so that every map lands
on the cohort's grid. Checked against numpy, scipy and a network run by hand."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cohort
from safetensors.torch import save_file
from scipy import stats

from voxplain.config import (ExplainStepConfig, GroupMaskStepConfig, ModelConfig,
                             MonaiImportConfig)
from voxplain.explain.methods import METHODS, explainer
from voxplain.models.declared_input import (DeclaredInput, Preprocessing, crop_or_pad,
                                            declared_input, normalise)
from voxplain.models.registry import build_model
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder
from voxplain.steps.explain import run_explain
from voxplain.steps.imports import run_import_monai
from voxplain.steps.masks import run_group_masks

pytestmark = pytest.mark.usefixtures("one_thread")

#: The cohort's grid, smaller than the network's frame on two axes, larger on one.
GRID = (30, 34, 34)
#: The network's input size (DenseNet halves its grid 5 times: 32 voxels per axis at least).
SIZE = (32, 36, 32)
TINY_SIGMOID_DENSENET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                         "init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


def by_hand(image: np.ndarray) -> np.ndarray:
    """``image`` ``GRID`` put on ``SIZE`` with numpy (zeros before/after as documented: 1/1 on
    the first axis, 1/1 on the second, the third cropped by 1 at the start and 1 at the end),
    then z-scored with scipy."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))[:, :, 1:33]
    return stats.zscore(padded, axis=None)


def test_crop_or_pad_centres_as_numpy_pads_and_slices_and_is_undone_by_its_inverse():
    x = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(1, 1, 5, 4, 3)
    expected = np.pad(x.numpy()[0, 0], ((1, 1), (0, 0), (0, 0)))[:, 1:3, :]  # 5->7, 4->2
    np.testing.assert_array_equal(crop_or_pad(x, (7, 2, 3))[0, 0].numpy(), expected)
    odd = np.pad(x.numpy()[0, 0], ((0, 0), (1, 2), (0, 0)))  # 4 -> 7: one before, two after
    np.testing.assert_array_equal(crop_or_pad(x, (5, 7, 3))[0, 0].numpy(), odd)
    assert torch.equal(crop_or_pad(crop_or_pad(x, (8, 9, 6)), (5, 4, 3)), x)
    with pytest.raises(ValueError, match="2 axes"):
        crop_or_pad(x, (5, 4))


def test_normalisations_agree_with_scipy_and_by_hand_per_image_and_channel():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(3.0, 2.0, (2, 3, 4, 5, 6)).astype(np.float64))
    zscored = normalise(x, "zscore").numpy()
    minmaxed = normalise(x, "minmax").numpy()
    for n in range(2):
        for c in range(3):
            volume = x[n, c].numpy()
            np.testing.assert_allclose(zscored[n, c], stats.zscore(volume, axis=None), rtol=1e-10)
            np.testing.assert_allclose(minmaxed[n, c], (volume - volume.min())
                                       / (volume.max() - volume.min()), rtol=1e-10)
    assert torch.equal(normalise(x, "none"), x)
    assert torch.isfinite(normalise(torch.ones(1, 1, 3, 3, 3), "zscore")).all()  # constant
    with pytest.raises(ValueError, match="unknown normalisation 'robust'"):
        Preprocessing("robust")


def test_a_single_logit_becomes_two_logits_whose_softmax_is_the_sigmoid():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 1))
    model = DeclaredInput(network, Preprocessing(single_logit=True))
    x = torch.randn(5, 1, 2, 2, 2)
    probabilities = torch.softmax(model(x), dim=1)
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(network(x))[:, 0])
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))
    assert declared_input(network, Preprocessing()) is network  # nothing declared: as it is


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory):
    """A tiny sigmoid DenseNet121 (one output) on SIZE, imported for a cohort on GRID with
    normalisation zscore and input size SIZE."""
    folder = tmp_path_factory.mktemp("declared")
    cohort = write_cohort(folder / "cohort", subjects=8, sessions=1, shape=GRID)
    torch.manual_seed(0)
    network = build_model(ModelConfig(name="monai", network="DenseNet121",
                                      arguments=TINY_SIGMOID_DENSENET)).eval()
    for index in range(2):
        save_file(network.state_dict(), str(folder / f"fold-{index}.safetensors"))
    run_import_monai(MonaiImportConfig(
        network="DenseNet121", arguments=TINY_SIGMOID_DENSENET, normalisation="zscore",
        input_size=list(SIZE), weights=[folder / f"fold-{i}.safetensors" for i in range(2)],
        cohort=cohort, run=folder / "run", device="cpu"))
    return RunFolder(folder / "run"), network, cohort


def test_imported_predictions_are_the_sigmoid_of_the_network_on_the_declared_input(sigmoid_run):
    run, network, cohort = sigmoid_run
    description = json.loads((run.model_dir(0, 0) / "model.json").read_text())
    assert description["preprocessing"] == {"normalisation": "zscore", "size": list(SIZE),
                                            "single_logit": True}
    predictions = pd.read_csv(run.model_dir(0, 0) / "predictions-validation.tsv", sep="\t")
    table = pd.read_csv(cohort, sep="\t").set_index("participant_id")
    for row in predictions.itertuples():
        image = nib.load(cohort.parent / table.loc[row.participant_id, "path"]).get_fdata()
        x = torch.from_numpy(by_hand(image).astype(np.float32))[None, None]
        with torch.no_grad():
            expected = torch.sigmoid(network(x))[0, 0].item()
        assert row.proba_AD == pytest.approx(expected, abs=1e-5)


def test_saliency_of_the_imported_model_is_the_gradient_through_the_declared_input(sigmoid_run):
    run, network, cohort = sigmoid_run
    model, _ = load_model(run.model_dir(0, 0))
    image = nib.load(cohort.parent / pd.read_csv(cohort, sep="\t").path[0]).get_fdata()
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    saliency = explainer("saliency", model).explain(x, [1])[0, 0]
    # by hand: pad/crop by indexing, z-score with torch ops written here, the AD logit z / 2
    leaf = x.clone().requires_grad_(True)
    framed = torch.nn.functional.pad(leaf, (0, 0, 1, 1, 1, 1))[:, :, :, :, 1:33]
    z = network((framed - framed.mean()) / framed.std(correction=0))[0, 0] / 2
    (gradient,) = torch.autograd.grad(z, leaf)
    assert saliency.shape == GRID
    torch.testing.assert_close(saliency, gradient[0, 0].abs(), rtol=1e-4, atol=1e-8)


def test_every_registered_method_runs_on_the_imported_densenet_or_says_why_not(sigmoid_run):
    run, _, cohort = sigmoid_run
    model, _ = load_model(run.model_dir(0, 0))
    images = [nib.load(cohort.parent / path).get_fdata() for path in
              pd.read_csv(cohort, sep="\t").path[:2]]
    x = torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
    cheap = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"n_steps": 4},
             "gradient_shap": {"n_samples": 2}, "deeplift_shap": {"n_baselines": 2},
             "occlusion": {"window": 16, "stride": 16}, "region_ablation": {"block": 16},
             "region_shapley": {"n_samples": 1, "block": 16}}
    refused = {}
    for name in METHODS:
        if name == "cyce":  # needs generators trained against the model (voxplain cyce train)
            continue
        try:
            maps = explainer(name, model, **cheap.get(name, {})).explain(x, [0, 1])
        except ValueError as error:
            refused[name] = str(error)
            continue
        assert tuple(maps.shape) == (2, 1, *GRID), name
        assert torch.isfinite(maps).all(), name
    # LRP and Deep Taylor have no rule for a per-image normalisation; CAM reads linear(GAP)
    # as the logits, which the single logit's (-z/2, z/2) are not
    assert set(refused) == {"lrp", "deep_taylor", "cam"}, refused
    assert all("zscore intensity normalisation" in refused[name] for name in ("lrp",
                                                                           "deep_taylor"))
    assert "not linear(global average pool(features))" in refused["cam"]


def test_grad_cam_and_a_group_mask_of_the_imported_run_land_on_the_cohort_grid(sigmoid_run):
    run, _, _ = sigmoid_run
    run_explain(ExplainStepConfig(run=run.root, folds=[0], device="cpu",
                                  explain={"method": "grad_cam"}))
    index = pd.read_csv(run.explanation_dir("grad_cam", 0, 0) / "index.tsv", sep="\t")
    assert index.layer.iloc[0].startswith("network.")
    for path in index.path:
        image = nib.load(run.explanation_dir("grad_cam", 0, 0) / path)
        assert image.shape == GRID
        assert np.allclose(image.affine, json.loads(run.grid_file.read_text())["affine"])
    predicted = pd.read_csv(run.model_dir(0, 0) / "predictions-validation.tsv", sep="\t")
    run_group_masks(GroupMaskStepConfig(run=run.root, folds=[0], device="cpu",
                                        diagnosis=predicted.predicted.mode()[0],
                                        mask={"max_epochs": 2, "batch_size": 4}))
    mask = nib.load(run.mask_dir("group", 0, 0) / "mask.nii.gz")
    assert mask.shape[:3] == GRID
