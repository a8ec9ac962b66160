"""Adebayo et al. 2018, cascading model-parameter randomisation: model-dependent methods change,
a model-independent edge detector does not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from voxplain.explain.api import Explainer
from voxplain.explain.gradients import SaliencyExplainer
from voxplain.explain.lrp import EpsilonLRP
from voxplain.evaluate.sanity import (
    RANDOMISATION_THRESHOLD,
    model_randomisation_test,
    passes_model_randomisation,
    randomisable_layers,
    rank_correlation,
)
from voxplain.models.networks import CNN


class EdgeDetector(Explainer):
    """A 'method' that ignores the model: the magnitude of the input's finite differences."""

    name = "edge_detector_test_only"
    signed = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        edges = torch.zeros_like(x[:, :1])
        for axis in range(2, x.ndim):
            edges += torch.diff(x, dim=axis, append=x.narrow(axis, -1, 1)).abs().sum(1, keepdim=True)
        return edges


def trained_ish_model() -> CNN:
    """A tiny 3D CNN fitted for a few steps to a bright-corner task, so that its weights are not
    those of an initialisation."""
    torch.manual_seed(0)
    model = CNN((8, 8, 8), channels=[4, 8], dropout=0.0)
    x, y = inputs(32, seed=3), torch.arange(32) % 2
    x[y == 1, :, :4, :4, :4] += 1.0
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> CNN:
    return trained_ish_model()


def test_layers_are_randomised_from_the_top_down(model):
    assert randomisable_layers(model) == ["classifier.1", "features.1.0.0", "features.0.0.0"]
    table = model_randomisation_test(model, SaliencyExplainer, inputs(2), [0, 1])
    assert list(table["layer"]) == ["classifier.1", "features.1.0.0", "features.0.0.0"]
    assert list(table["randomised"]) == [1, 2, 3]
    assert table["spearman_signed"].isna().all()  # saliency is unsigned


@pytest.mark.parametrize("method", [SaliencyExplainer, "grad_cam"])
def test_randomising_the_model_changes_the_maps_of_model_dependent_methods(model, method):
    table = model_randomisation_test(model, method, inputs(3), [0, 1, 1], seed=0)
    assert table["spearman_abs"].iloc[-1] < RANDOMISATION_THRESHOLD
    assert passes_model_randomisation(table)


def test_signed_methods_also_report_signed_correlations(model):
    table = model_randomisation_test(model, EpsilonLRP, inputs(1), 1)
    assert table["spearman_signed"].notna().all()
    assert (table["spearman_signed"] < table["spearman_abs"]).all()


def test_a_model_independent_method_fails(model):
    table = model_randomisation_test(model, EdgeDetector, inputs(3), 0)
    np.testing.assert_allclose(table["spearman_abs"], 1.0)
    assert not passes_model_randomisation(table)


def test_the_model_is_not_modified(model):
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    model_randomisation_test(model, SaliencyExplainer, inputs(2), 1)
    assert model.training
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_randomisation_is_seeded(model):
    x = inputs(2)
    first = model_randomisation_test(model, SaliencyExplainer, x, 0, seed=3)
    pd.testing.assert_frame_equal(model_randomisation_test(model, SaliencyExplainer, x, 0, seed=3),
                                  first)
    other = model_randomisation_test(model, SaliencyExplainer, x, 0, seed=4)
    assert not np.allclose(other["spearman_abs"], first["spearman_abs"])


def test_options_reach_the_method(model):
    with pytest.raises(ValueError, match="epsilon must be positive"):
        model_randomisation_test(model, EpsilonLRP, inputs(1), 0, epsilon=-1.0)
    with pytest.raises(ValueError, match="method must be a method name or an Explainer subclass"):
        model_randomisation_test(model, 42, inputs(1), 0)


def test_rank_correlation_hand_computed_cases():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a ** 3) == pytest.approx(1.0)  # monotone transform keeps ranks
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): d^2 = 4, rho = 1 - 6*4 / (4*15) = 0.6
    assert rank_correlation(a, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    assert rank_correlation(a, np.zeros(4)) == 0.0
    assert rank_correlation(np.ones(4), np.zeros(4)) == 1.0


def test_verdict_uses_the_fully_randomised_model():
    table = pd.DataFrame({"layer": ["b", "a"], "randomised": [1, 2],
                          "spearman_abs": [0.9, 0.2], "spearman_signed": [np.nan, np.nan]})
    assert passes_model_randomisation(table)
    assert not passes_model_randomisation(table, threshold=0.1)
    with pytest.raises(ValueError, match="empty"):
        passes_model_randomisation(table.iloc[:0])
