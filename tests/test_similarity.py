"""Map similarity of paper 1, 2.4: ROI-based cosine, prob_CNN, rank correlation, top regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import spearmanr
from torch import nn

from voxplain.config import MaskConfig
from voxplain.data.atlas import Atlas
from voxplain.data.grid import Grid, downsampled_shape, spm_grid
from voxplain.data.regions import region_means_batch
from voxplain.data.regions import top_regions
from voxplain.evaluate.similarity import (cosine_matrix, prob_cnn, rank_correlation,
                                          rank_correlation_matrix, roi_cosine_similarity, roi_vector, roi_vectors,
                                          symmetric_prob_cnn)


def toy_atlas() -> Atlas:
    """3 x 2 x 2 grid: A = first slab (4 voxels), B = second slab (4), C = 2 voxels of the third."""
    labels = np.zeros((3, 2, 2), dtype=np.int32)
    labels[0], labels[1], labels[2, 0] = 1, 2, 3
    return Atlas(labels, {1: "A", 2: "B", 3: "C"}, Grid((3, 2, 2), np.eye(4)), "toy")


def toy_mask() -> np.ndarray:
    mask = np.zeros((3, 2, 2))  # background voxels (0) must not count
    mask[0] = 1.0
    mask[1] = [[0.0, 0.5], [1.0, 1.0]]
    mask[2, 0] = [0.2, 0.6]
    return mask


def test_roi_vector_of_a_mask_is_the_density_of_one_minus_m_per_region():
    # A: nothing hidden; B: mean(1, 0.5, 0, 0); C: mean(0.8, 0.4)
    assert roi_vector(toy_mask(), toy_atlas()) == pytest.approx([0.0, 0.375, 0.6])


def test_roi_vector_of_an_attribution_is_the_normalised_region_mean():
    values = np.full((3, 2, 2), 10.0)  # background: excluded from the maximum too
    values[0] = [[2, -2], [2, 2]]
    values[1] = [[4, 0], [0, 0]]
    values[2, 0] = [-1, 1]
    atlas = toy_atlas()
    # |a| region means 2, 1, 1; largest |a| over labelled voxels 4
    assert roi_vector(values, atlas, "attribution") == pytest.approx([0.5, 0.25, 0.25])
    assert roi_vector(values, atlas, "attribution", absolute=False,
                      normalise="none") == pytest.approx([1.0, 1.0, 0.0])
    # sum of |a| over labelled voxels: 8 + 4 + 2 = 14
    assert roi_vector(values, atlas, "attribution", normalise="sum") == pytest.approx(
        [2 / 14, 1 / 14, 1 / 14])
    # signed min-max over labelled voxels: min -2, max 4
    assert roi_vector(values, atlas, "attribution", absolute=False,
                      normalise="minmax") == pytest.approx([3 / 6, 3 / 6, 2 / 6])


def test_roi_vectors_reject_masks_outside_0_1_and_maps_off_the_grid():
    atlas = toy_atlas()
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        roi_vector(toy_mask() * 2, atlas)
    with pytest.raises(ValueError, match="toy grid"):
        roi_vectors(np.ones((2, 3, 2, 3)), atlas)


def test_region_means_agree_with_a_loop_over_aal2_regions():
    grid = spm_grid()
    shape = downsampled_shape(grid.shape, 4)
    atlas = Atlas.aal2(Grid(shape, grid.affine @ np.diag([4, 4, 4, 1])))
    maps = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    expected = [[maps[m][atlas.labels == index].mean() if (atlas.labels == index).any()
                 else np.nan for index in sorted(atlas.names)] for m in range(3)]
    np.testing.assert_allclose(region_means_batch(maps, atlas), expected, rtol=1e-6)
    assert roi_vectors(maps, atlas).shape == (3, len(atlas.names)) == (3, 120)


def test_cosine_of_known_vectors():
    vectors = np.array([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 2.0], [0, 0, 0]])
    matrix = cosine_matrix(vectors)
    assert matrix[0, 1] == pytest.approx(1 / math.sqrt(2))
    assert matrix[0, 2] == pytest.approx(0.0) and matrix[1, 1] == pytest.approx(1.0)
    assert np.isnan(matrix[3]).all()  # a mask hiding nothing has no direction
    rows = np.random.default_rng(1).random((6, 120))
    np.testing.assert_allclose(cosine_matrix(rows), 1 - cdist(rows, rows, "cosine"), atol=1e-12)


def test_roi_cosine_similarity_is_one_for_a_scaled_mask_and_zero_for_disjoint_regions():
    atlas = toy_atlas()
    hide_a, hide_c = np.ones((3, 2, 2)), np.ones((3, 2, 2))
    hide_a[0] = 0.2
    hide_c[2] = 0.0
    half = np.ones((3, 2, 2))
    half[0] = 0.6  # same location, half the density
    assert roi_cosine_similarity(hide_a, half, atlas) == pytest.approx(1.0)
    assert roi_cosine_similarity(hide_a, hide_c, atlas) == pytest.approx(0.0)


def test_rank_correlation_is_spearman_over_brain_voxels():
    rng = np.random.default_rng(2)
    a = np.round(rng.random((6, 7, 5)), 1)  # ties
    b = a + rng.normal(0, 0.3, a.shape)
    brain = rng.random(a.shape) > 0.4
    assert rank_correlation(a, b, brain) == pytest.approx(spearmanr(a[brain], b[brain])[0])
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0])
    atlas = toy_atlas()
    x, y = rng.random((3, 2, 2)), rng.random((3, 2, 2))
    inside = atlas.labels > 0
    assert rank_correlation(x, y, atlas) == pytest.approx(spearmanr(x[inside], y[inside])[0])


def test_rank_correlation_matrix_agrees_with_scipy_pairwise():
    rng = np.random.default_rng(4)
    maps = np.round(rng.random((4, 5, 6, 3)), 1)
    maps[3] = 0.5  # constant: no ranking
    brain = rng.random((5, 6, 3)) > 0.3
    matrix = rank_correlation_matrix(maps, brain)
    for i in range(3):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(spearmanr(maps[i][brain], maps[j][brain])[0])
    assert np.isnan(matrix[3]).all()


def test_top_regions_are_the_most_masked_or_most_attributed():
    # one function (voxplain.data.regions.top_regions) ranks region means: what a mask hides is
    # 1 - m, an attribution's magnitude |a|
    atlas = toy_atlas()
    assert top_regions(1 - toy_mask(), atlas, k=2) == ["C", "B"]
    values = np.zeros((3, 2, 2))
    values[0] = -5.0  # largest |a|
    values[1, 0, 0] = 1.0
    assert top_regions(np.abs(values), atlas, k=3) == ["A", "B", "C"]
    assert top_regions(values, atlas, k=1) == ["B"]


class TinyNet(nn.Module):
    def __init__(self, seed: int, dims: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.body = nn.Sequential(conv(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _model(seed: int, images: torch.Tensor) -> nn.Module:
    model = TinyNet(seed, images.ndim - 2)
    model(images[:1])  # materialise the lazy layer
    return model.eval()


def _plain(model: nn.Module, images: torch.Tensor, target) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(images), 1)[torch.arange(len(images)), target].numpy()


@pytest.mark.parametrize("shape", [(8, 8, 8), (12, 12)])
def test_prob_cnn_with_an_all_ones_mask_is_the_plain_probability(shape):
    images = torch.rand(5, 1, *shape)
    model = _model(0, images)
    targets = np.array([0, 1, 1, 0, 1])
    expected = _plain(model, images, torch.as_tensor(targets)).mean()
    assert prob_cnn(model, np.ones(shape), images, targets, batch_size=2) == pytest.approx(
        expected, rel=1e-5)
    # a mask of zeros replaces every voxel by mu = 1 (grey matter restored everywhere)
    ones = _plain(model, torch.ones_like(images), torch.as_tensor(targets)).mean()
    assert prob_cnn(model, np.zeros(shape), images, targets) == pytest.approx(ones, rel=1e-5)


def test_prob_cnn_reads_the_perturbation_of_a_mask_config():
    images = torch.rand(3, 1, 8, 8, 8)
    model = _model(1, images)
    mask = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    m = torch.as_tensor(mask)
    expected = _plain(model, m * images + (1 - m) * 0.3, 1).mean()
    assert prob_cnn(model, mask, images, 1,
                    perturbation=MaskConfig(constant=0.3)) == pytest.approx(expected, rel=1e-5)


def test_symmetric_prob_cnn_averages_the_two_cross_terms():
    rng = np.random.default_rng(3)
    images_a, images_b = torch.rand(4, 1, 8, 8, 8), torch.rand(3, 1, 8, 8, 8)
    model_a, model_b = _model(2, images_a), _model(3, images_a)
    mask_a, mask_b = (torch.as_tensor(rng.random((8, 8, 8)), dtype=torch.float32)
                      for _ in range(2))
    a_sees_b = _plain(model_a, mask_b * images_a + (1 - mask_b), 1).mean()
    b_sees_a = _plain(model_b, mask_a * images_b + (1 - mask_a), 0).mean()
    value = symmetric_prob_cnn(model_a, mask_a, model_b, mask_b, images_a, images_b,
                               target_a=1, target_b=0)
    assert value == pytest.approx((a_sees_b + b_sees_a) / 2, rel=1e-5)
