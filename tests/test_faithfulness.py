"""Deletion and insertion curves (faithfulness of attribution maps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from voxplain.evaluate.faithfulness import (area_under_curve, deletion_curve,
                                            faithfulness_curves, insertion_curve)


class LinearModel(nn.Module):
    """logits = (0, w . x + b): p(class 1) = sigmoid(w . x + b)."""

    def __init__(self, weights: np.ndarray, bias: float) -> None:
        super().__init__()
        self.w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        self.b = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = x.double().flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _closed_form(x, w, b, order_by, fractions, mode, baseline=0.0):
    """p(class 1) after deleting / inserting the top voxels of ``order_by`` (numpy, by hand)."""
    contribution, removed = (w * x).ravel(), (w * baseline).ravel()
    order = np.argsort(-order_by.ravel(), kind="stable")
    out = []
    for fraction in fractions:
        n = int(round(fraction * x.size))
        top = np.zeros(x.size, bool)
        top[order[:n]] = True
        if mode == "deletion":
            logit = contribution[~top].sum() + removed[top].sum() + b
        else:
            logit = contribution[top].sum() + removed[~top].sum() + b
        out.append(_sigmoid(logit))
    return np.array(out)


@pytest.mark.parametrize("shape", [(6, 5, 4), (8, 10)])
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curve_of_a_linear_model_matches_the_closed_form(shape, mode):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape) * 0.3
    images = rng.random((3, 1, *shape))
    model = LinearModel(w, 0.2)
    attributions = images * w  # gradient x input of the class-1 logit
    curves = faithfulness_curves(model, images, attributions, 1, mode, step=0.1, max_batch=7)
    assert curves.fractions == pytest.approx(np.round(np.arange(11) * 0.1 * images[0].size)
                                             / images[0].size)
    for i in range(3):
        expected = _closed_form(images[i, 0], w, 0.2, attributions[i, 0], curves.fractions, mode)
        np.testing.assert_allclose(curves.probabilities[i], expected, rtol=1e-5)
    if mode == "deletion":  # removing the most positive contributions first lowers p
        assert curves.probabilities[:, -1].max() < curves.probabilities[:, 0].min()


def test_contribution_order_deletes_faster_than_random_orders():
    # For a linear model with baseline 0, removing the largest contributions w x first gives the
    # lowest logit after every step, hence the lowest deletion area of all orderings.
    rng = np.random.default_rng(5)
    shape = (6, 6, 6)
    w = rng.normal(size=shape)
    image = rng.random((1, 1, *shape))
    model = LinearModel(w, 0.0)
    best = deletion_curve(model, image, image * w, 1, step=0.1).auc[0]
    random_orders = rng.normal(size=(20, 1, *shape))
    others = deletion_curve(model, np.repeat(image, 20, 0), random_orders, 1, step=0.1,
                            max_batch=64).auc
    assert np.all(best < others)


def test_baseline_value_brain_mask_and_per_sample_targets():
    rng = np.random.default_rng(1)
    shape = (5, 6, 4)
    w = rng.normal(size=shape)
    images = rng.random((2, 1, *shape))
    brain = rng.random(shape) > 0.3
    model = LinearModel(w, -0.1)
    attributions = rng.normal(size=(2, *shape))
    curves = deletion_curve(model, images, attributions, np.array([1, 0]), step=0.25,
                            baseline=0.5, brain=brain, absolute=True)
    inside = int(brain.sum())
    assert curves.fractions == pytest.approx(np.round(np.arange(5) * 0.25 * inside) / inside)
    for i, target in enumerate([1, 0]):
        order = np.where(brain, np.abs(attributions[i]), -np.inf)
        x = images[i, 0]
        expected = []
        for fraction in curves.fractions:
            n = int(round(fraction * inside))
            top = np.zeros(x.size, bool)
            top[np.argsort(-order.ravel(), kind="stable")[:n]] = True
            kept = np.where(top.reshape(shape), 0.5, x)  # outside the brain never changes
            expected.append(_sigmoid((w * kept).sum() - 0.1))
        expected = np.array(expected)
        np.testing.assert_allclose(curves.probabilities[i],
                                   expected if target == 1 else 1 - expected, rtol=1e-5)


def test_batching_and_a_baseline_image_do_not_change_the_curves():
    rng = np.random.default_rng(2)
    shape = (8, 8)
    model = LinearModel(rng.normal(size=(2, *shape)), 0.0)
    images = rng.random((4, 2, *shape))  # two channels change together
    attributions = rng.normal(size=(4, 1, *shape))
    blurred = torch.as_tensor(images).mean(dim=(2, 3), keepdim=True).expand_as(
        torch.as_tensor(images))
    one = insertion_curve(model, images, attributions, 1, baseline=blurred, max_batch=1)
    many = insertion_curve(model, images, attributions, 1,
                           baseline=lambda x: x.mean(dim=(2, 3), keepdim=True).expand_as(x),
                           max_batch=50)
    np.testing.assert_allclose(one.probabilities, many.probabilities, rtol=1e-6)
    # at fraction 1 every voxel is restored: the plain probability
    plain = torch.softmax(model(torch.as_tensor(images)), 1)[:, 1].numpy()
    np.testing.assert_allclose(one.probabilities[:, -1], plain, rtol=1e-6)


def test_area_under_curve_is_the_trapezoid_rule():
    fractions = np.array([0.0, 0.25, 0.5, 1.0])
    values = np.array([[1.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2]])
    # (1 + .5)/2 * .25 + .5 * .25 + (.5 + 0)/2 * .5 = .1875 + .125 + .125
    assert area_under_curve(fractions, values) == pytest.approx([0.4375, 0.2])
    np.testing.assert_allclose(area_under_curve(fractions, values),
                               np.trapezoid(values, fractions, axis=1))


def test_bad_inputs_are_rejected_with_a_message():
    model = LinearModel(np.ones((4, 4)), 0.0)
    images = np.ones((2, 1, 4, 4))
    with pytest.raises(ValueError, match="do not match images"):
        deletion_curve(model, images, np.ones((2, 1, 4, 5)), 1)
    with pytest.raises(ValueError, match="step"):
        deletion_curve(model, images, np.ones((2, 4, 4)), 1, step=0)
    with pytest.raises(ValueError, match="brain mask"):
        deletion_curve(model, images, np.ones((2, 4, 4)), 1, brain=np.ones((3, 3), bool))
