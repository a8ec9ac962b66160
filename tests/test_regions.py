"""Region-level attributions (Captum FeatureAblation / ShapleyValueSampling over a label map)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxplain.explain.regions import RegionAblation, RegionShapley, block_regions, region_values


def test_block_regions_tile_the_grid_in_c_order():
    expected = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5]])
    assert torch.equal(block_regions((4, 5), 2), expected)
    assert block_regions((3, 3, 3), 2).unique().tolist() == list(range(8))


def linear_model(shape: tuple[int, ...], channels: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * int(torch.tensor(shape).prod()), 2))
    return model.eval()


def test_on_a_linear_model_both_give_each_region_its_own_contribution():
    """f(x) = w.x + b is additive: hiding region r (baseline 0) removes sum_{i in r} w_i x_i, and
    every order of the regions adds exactly that, so ablation and Shapley values are equal to it."""
    shape, channels = (4, 6), 2
    model = linear_model(shape, channels)
    x = torch.rand(3, channels, *shape, generator=torch.Generator().manual_seed(1))
    regions = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 2, 5, 5]] * 2)
    target = [0, 1, 1]
    weights = model[1].weight.detach().reshape(2, channels, *shape)
    for method in (RegionAblation(model, regions=regions),
                   RegionShapley(model, regions=regions, n_samples=3)):
        values = region_values(method.explain(x, target), regions)
        for label in (0, 1, 2, 5):
            inside = regions == label
            expected = torch.stack([(weights[t] * x[i])[:, inside].sum()
                                    for i, t in enumerate(target)])
            torch.testing.assert_close(values[label], expected, rtol=1e-4, atol=1e-5)


def test_shapley_values_of_a_nonlinear_model_sum_to_the_logit_minus_the_baselines():
    shape = (8, 8, 8)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Flatten(),
                          nn.Linear(3 * 64, 2)).eval()
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(3))
    method = RegionShapley(model, block=4, n_samples=4, seed=5)
    values = region_values(method.explain(x, [1, 0]), block_regions(shape, 4))
    total = torch.stack(list(values.values())).sum(0)
    with torch.no_grad():
        logits, empty = model(x), model(torch.zeros_like(x))
    expected = torch.stack([logits[0, 1] - empty[0, 1], logits[1, 0] - empty[0, 0]])
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    # ablation: each region's drop, checked by hand
    ablation = region_values(RegionAblation(model, block=4).explain(x, [1, 0]),
                             block_regions(shape, 4))
    labels = block_regions(shape, 4)
    for label, value in ablation.items():
        hidden = x.clone()
        hidden[:, :, labels == label] = 0
        with torch.no_grad():
            drop = logits[[0, 1], [1, 0]] - model(hidden)[[0, 1], [1, 0]]
        torch.testing.assert_close(value, drop, rtol=1e-4, atol=1e-5)


def test_regions_of_another_shape_are_refused():
    model = linear_model((4, 6), 1)
    with pytest.raises(ValueError, match="regions of shape"):
        RegionAblation(model, regions=torch.zeros(3, 3, dtype=torch.long)).explain(
            torch.rand(1, 1, 4, 6), 0)


@pytest.mark.slow
def test_voxplain_explain_attributes_to_the_aal2_regions_of_an_mni_grid(tmp_path):
    import numpy as np

    from conftest import write_cohort
    from voxplain.config import ExplainStepConfig, TrainConfig
    from voxplain.data.atlas import Atlas
    from voxplain.run.maps import map_grid, read_map
    from voxplain.steps.explain import run_explain
    from voxplain.steps.train import run_train

    tsv = write_cohort(tmp_path / "cohort", subjects=8, sessions=1)
    run = tmp_path / "run"
    run_train(TrainConfig(cohort=tsv, run=run, n_folds=2, epochs=1, batch_size=4, device="cpu",
                          model={"name": "cnn", "channels": [4, 8]}))
    index = run_explain(ExplainStepConfig(run=run, folds=[0], device="cpu",
                                          explain={"method": "region_ablation"}))
    path = run / "explanations/region_ablation/fold-0/run-0" / index.path.iloc[0]
    values = read_map(path)
    labels = Atlas.aal2(map_grid(path)).labels
    assert len(np.unique(labels)) > 10  # the tiny 6 mm grid covers the MNI brain
    for label in np.unique(labels):  # one value per AAL2 region
        assert np.ptp(values[labels == label]) < 1e-5
