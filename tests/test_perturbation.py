"""Meaningful-perturbation masks (paper 1, 2.3): eq. 1-2 term by term, stopping, batching."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from voxplain.config import GroupMaskConfig, ModelConfig, SessionMaskConfig
from voxplain.explain.masks import (make_reference, optimise_group_mask, optimise_session_masks,
                                    qc_flags, robust_z)
from voxplain.explain.perturbation import (MaskWeights, EarlyStopping, gaussian_blur,
                                           mask_loss, perturb, power_of_root, smoothness_term,
                                           sparsity_term, spatial_gradient, target_probability,
                                           threshold_mask)
from voxplain.models.registry import build_model

EPS = 1e-8


def _model(shape=(12, 12, 12)):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", input_shape=list(shape), channels=[4, 8]))
    return model.eval().requires_grad_(False)


def test_spatial_gradient_is_the_forward_difference_on_every_axis_and_0_beyond_the_grid():
    mask = torch.tensor([[0.0, 1.0], [2.0, 4.0]])[None, None]
    gradient = spatial_gradient(mask)
    assert gradient.shape == (1, 2, 2, 2)
    assert gradient[0, 0].tolist() == [[2.0, 3.0], [0.0, 0.0]]  # m(1,c) - m(0,c); last row 0
    assert gradient[0, 1].tolist() == [[1.0, 0.0], [2.0, 0.0]]  # m(r,1) - m(r,0); last col 0
    volume = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    steps = spatial_gradient(volume)
    assert steps.shape == (1, 3, 3, 3, 3)
    assert steps[0, :, 0, 0, 0].tolist() == [9.0, 3.0, 1.0]
    assert steps[0, :, 2, 1, 1].tolist() == [0.0, 3.0, 1.0]  # last slice along axis 0


def test_sparsity_term_is_the_mean_of_one_minus_m_to_the_b1():
    mask = torch.tensor([[1.0, 0.5], [0.0, 0.75]])[None, None]
    assert sparsity_term(mask, 1.0, EPS).item() == pytest.approx((0.5 + 1.0 + 0.25) / 4, abs=1e-6)
    expected = (0.5 ** 0.1 + 1.0 + 0.25 ** 0.1) / 4
    assert sparsity_term(mask, 0.1, EPS).item() == pytest.approx(expected, abs=1e-4)


def test_regularisers_do_not_depend_on_the_number_of_voxels():
    small = torch.rand(1, 1, 6, 6, 6)
    large = small.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert sparsity_term(large, 0.1, 1e-3).item() == pytest.approx(
        sparsity_term(small, 0.1, 1e-3).item(), rel=1e-5)
    constant = torch.full((1, 1, 30, 30, 30), 0.3)
    assert smoothness_term(constant, 1.0, 1e-3).item() == 0


def test_isotropic_smoothness_term_is_the_mean_of_euclidean_gradient_norms_to_the_b2():
    mask = torch.tensor([[0.0, 1.0, 1.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])[None, None]
    # (d_row, d_col) per voxel, 0 beyond the last row / column; the 3 voxels of the last row
    # have d_row = 0 and d_col = 0, 0
    pairs = [(2.0, 1.0), (3.0, 0.0), (-1.0, 0.0), (-1.0, 2.0), (-3.0, -4.0), (1.0, 0.0)]
    norms = [math.hypot(a, b) for a, b in pairs]
    assert smoothness_term(mask, 1.0, EPS, "isotropic").item() == pytest.approx(
        sum(norms) / 9, rel=1e-6)
    assert smoothness_term(mask, 2.0, EPS, "isotropic").item() == pytest.approx(
        sum(n ** 2 for n in norms) / 9, rel=1e-6)


def test_the_power_at_zero_has_a_finite_gradient_and_is_exact_beyond_epsilon():
    x = torch.tensor([0.0, 1e-6, 1e-3, 0.3, -0.3], requires_grad=True)
    values = power_of_root(x.square(), 0.1, 1e-3)
    values.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0] == 0
    assert values[0] == 0
    expected = x.detach().abs()[2:] ** 0.1
    torch.testing.assert_close(values[2:].detach(), expected)
    naive = torch.tensor([0.0], requires_grad=True)
    naive.abs().pow(0.1).sum().backward()
    assert not torch.isfinite(naive.grad).all()  # why the quadratic piece exists
    near = torch.linspace(0, 2e-3, 101)
    curve = power_of_root(near.square(), 0.1, 1e-3)
    assert (curve.diff() >= 0).all()  # monotone, continuous at epsilon
    assert curve[49].item() < 1e-3 ** 0.1 < curve[51].item()


def test_total_loss_is_the_weighted_sum_of_eq_2():
    model = _model()
    images = torch.rand(2, 1, 12, 12, 12)
    mask = torch.rand(2, 1, 12, 12, 12)
    targets = torch.tensor([0, 1])
    weights = MaskWeights(l1=0.3, l2=0.2, b1=0.5, b2=1.0, epsilon=1e-3)
    loss, terms = mask_loss(model, images, mask, torch.ones_like(images), targets, weights)
    masked = mask * images + (1 - mask)
    probability = torch.softmax(model(masked), 1)[[0, 1], [0, 1]]
    torch.testing.assert_close(terms["probability"], probability)
    expected = (0.3 * sparsity_term(mask, 0.5, 1e-3) + 0.2 * smoothness_term(mask, 1.0, 1e-3)
                + probability)
    torch.testing.assert_close(loss, expected)


def test_a_mask_of_ones_leaves_the_model_output_unchanged():
    model = _model()
    images = torch.rand(3, 1, 12, 12, 12)
    ones = torch.ones(3, 1, 12, 12, 12)
    assert torch.equal(perturb(images, ones, torch.zeros_like(images)), images)
    targets = torch.tensor([0, 1, 1])
    torch.testing.assert_close(target_probability(model, perturb(images, ones, images * 0 + 1),
                                                  targets), target_probability(model, images,
                                                                               targets))


def test_threshold_sets_values_above_095_to_one():
    mask = torch.tensor([0.2, 0.95, 0.951, 1.0])
    assert threshold_mask(mask).tolist() == pytest.approx([0.2, 0.95, 1.0, 1.0])


def _stops(stopping: EarlyStopping, losses) -> list[bool]:
    return [bool(stopping.step(np.array([value]))[0]) for value in losses]


def test_early_stopping_counts_steps_more_than_the_tolerance_above_the_lowest():
    # paper 1, 2.3.5: lowest so far 10, 8, 8, 8, 8; 9.5 > 8 * 1.1 = 8.8 counts, 8.7 does not
    # (reset), 9.0 and 9.9 count: the second count in a row stops
    stopping = EarlyStopping(1, tolerance=0.1, patience=2)
    assert _stops(stopping, (10.0, 8.0, 9.5, 8.7, 9.0, 9.9)) == [False] * 5 + [True]
    assert stopping.lowest[0] == 8.0


def test_early_stopping_never_stops_a_slowly_decreasing_loss():
    # 0.5 % lower each step: never 5 % better than the lowest (the rule of earlier versions
    # stopped it after `patience` steps), never above it either
    losses = 0.995 ** np.arange(150)
    assert not any(_stops(EarlyStopping(1, tolerance=0.05, patience=5), losses))


def test_early_stopping_stops_after_patience_on_a_plateau_above_the_lowest():
    # falls to 0.5 at step 9, then settles on a plateau at 0.6 (20 % above): stops at the
    # `patience`-th plateau step, not before
    losses = [1.0 - 0.05 * t for t in range(10)] + [0.6] * 20
    stops = _stops(EarlyStopping(1, tolerance=0.05, patience=5), losses)
    assert stops.index(True) == 10 + 5 - 1


def test_early_stopping_stops_each_sample_on_its_own():
    stopping = EarlyStopping(3, tolerance=0.0, patience=2)
    stopping.step(np.array([1.0, 1.0, 1.0]))
    assert stopping.step(np.array([2.0, 0.5, 2.0])).tolist() == [False, False, False]
    # only samples 0 and 2 are stepped: 0 rises again (stops), 2 returns to its lowest (reset)
    assert stopping.step(np.array([3.0, 1.0]), np.array([0, 2])).tolist() == [True, False]
    assert stopping.above_lowest.tolist() == [2, 0, 0]


def test_group_mask_runs_to_the_maximum_while_the_validation_loss_falls_slowly(monkeypatch):
    """The optimisation loop with a scripted validation loss: 1 % lower each epoch runs all
    `max_epochs`; a loss that then rises 10 % and stays there stops `patience` epochs later."""
    import voxplain.explain.masks as masks

    def scripted(losses):
        epochs = iter(losses)
        return lambda *args, **kwargs: {"loss": next(epochs), "probability": 0.0,
                                        "sparsity": 0.0, "smoothness": 0.0}

    model = _model()
    train, train_targets, validation, validation_targets = _group_inputs()
    config = GroupMaskConfig(max_epochs=12, patience=3, tolerance=0.05, batch_size=4)
    reference = make_reference(config)
    monkeypatch.setattr(masks, "_evaluate", scripted(0.99 ** np.arange(12)))
    falling = optimise_group_mask(model, train, train_targets, validation, validation_targets,
                                  reference, config, torch.device("cpu"))
    assert len(falling.history) == 12 and falling.best_epoch == 11
    monkeypatch.setattr(masks, "_evaluate", scripted([1.0, 0.9, 0.8] + [0.9] * 9))
    risen = optimise_group_mask(model, train, train_targets, validation, validation_targets,
                                reference, config, torch.device("cpu"))
    assert len(risen.history) == 3 + 3 and risen.best_epoch == 2


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(0)
    volume = rng.random((1, 2, 20, 22, 18)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(volume), (2.0, 1.0, 1.0)).numpy()
    for channel in range(2):
        expected = ndimage.gaussian_filter(volume[0, channel].astype(np.float64), (2.0, 1.0, 1.0),
                                           mode="mirror", truncate=3.0)
        np.testing.assert_allclose(ours[0, channel], expected, atol=1e-5)


def _session_config(**changes):
    values = {"max_iterations": 40, "patience": 5, "tolerance": 0.01, "batch_size": 4,
              "regularisation_factor": 1.0, "l1": 1e-5, "l2": 1e-4}
    return SessionMaskConfig(**{**values, **changes})


def test_batched_session_masks_equal_masks_optimised_alone():
    # float64: in float32 a convolution's rounding differs with the batch size, and Adam turns
    # the sign of a near-zero gradient into a full step; the independence itself is exact.
    model = _model().double()
    torch.manual_seed(1)
    images = torch.rand(4, 1, 12, 12, 12, dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0])
    # lr 1 and no tolerance: the losses oscillate above their lowest, so masks stop early
    config = _session_config(learning_rate=1.0, tolerance=0.0, patience=2)
    reference = make_reference(config)
    batched = optimise_session_masks(model, images, targets, reference, config)
    assert len(set(batched.iterations.tolist())) > 1, "masks must stop at different iterations"
    assert batched.iterations.max() < config.max_iterations
    for i in range(4):
        alone = optimise_session_masks(model, images[i:i + 1], targets[i:i + 1], reference,
                                       config.model_copy(update={"batch_size": 1}))
        torch.testing.assert_close(batched.masks[i], alone.masks[0], atol=1e-9, rtol=0)
        assert batched.iterations[i] == alone.iterations[0]


def test_session_masks_lower_the_target_probability():
    model = _model()
    images = torch.rand(2, 1, 12, 12, 12)
    targets = torch.tensor([0, 1])
    result = optimise_session_masks(model, images, targets, make_reference(_session_config()),
                                    _session_config(max_iterations=60, patience=60))
    assert (result.probability_after < result.probability_before).all()
    assert result.masks.min() < 1 and result.masks.max() <= 1


def _group_inputs():
    rng = np.random.default_rng(3)
    images = rng.random((6, 1, 12, 12, 12)).astype(np.float32)
    return images[:4], np.array([1, 1, 0, 1]), images[4:], np.array([1, 0])


def test_group_mask_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    model = _model()
    train, train_targets, validation, validation_targets = _group_inputs()
    config = GroupMaskConfig(max_epochs=6, patience=6, batch_size=2, l1=1e-3)
    reference = make_reference(config)
    device = torch.device("cpu")
    whole = optimise_group_mask(model, train, train_targets, validation, validation_targets,
                                reference, config, device, checkpoint=tmp_path / "whole")
    (tmp_path / "split").mkdir()

    class Interrupted(Exception):
        pass

    def stop_after_three(done, total):
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        optimise_group_mask(model, train, train_targets, validation, validation_targets,
                            reference, config, device, checkpoint=tmp_path / "split",
                            progress=stop_after_three)
    assert (tmp_path / "split" / "checkpoint.safetensors").is_file()
    resumed = optimise_group_mask(model, train, train_targets, validation, validation_targets,
                                  reference, config, device, checkpoint=tmp_path / "split")
    torch.testing.assert_close(resumed.mask, whole.mask)
    pd.testing.assert_frame_equal(resumed.history, whole.history)
    pd.testing.assert_frame_equal(resumed.image_losses, whole.image_losses)
    # the checkpoint stays until the caller has written its final files (mask_steps)
    assert (tmp_path / "split" / "checkpoint.safetensors").is_file()


def test_group_mask_keeps_the_epoch_of_lowest_validation_loss():
    model = _model()
    train, train_targets, validation, validation_targets = _group_inputs()
    config = GroupMaskConfig(max_epochs=8, patience=3, tolerance=0.05, batch_size=2)
    result = optimise_group_mask(model, train, train_targets, validation, validation_targets,
                                 make_reference(config), config, torch.device("cpu"))
    losses = result.history.validation_loss.to_numpy()
    assert result.best_epoch == int(np.argmin(losses))
    assert len(result.image_losses) == 4 * len(result.history)  # every image once per epoch


def test_qc_flags_the_image_that_makes_the_loss_jump():
    rng = np.random.default_rng(0)
    rows = [{"image": i, "epoch": e, "loss": 0.5 + 0.02 * rng.standard_normal()}
            for i in range(20) for e in range(5)]
    rows += [{"image": 20, "epoch": e, "loss": 0.95} for e in range(5)]
    flags = qc_flags(pd.DataFrame(rows))
    assert flags.loc[flags.flagged, "image"].tolist() == [20]


def test_qc_does_not_flag_clean_images_whose_losses_barely_differ():
    """Once the mask works every loss is tiny and the MAD tinier: an image at 0.02 among losses
    of 0.001 has a robust z in the hundreds, but it keeps only 2 points more of the masked
    class's probability; the absolute rule (0.1) keeps it unflagged (demo: z 222 to 3140)."""
    rng = np.random.default_rng(0)
    rows = [{"image": i, "epoch": e, "loss": 0.001 + 1e-5 * rng.standard_normal()}
            for i in range(30) for e in range(5)]
    rows += [{"image": 30, "epoch": e, "loss": 0.02} for e in range(5)]
    flags = qc_flags(pd.DataFrame(rows))
    assert flags.robust_z.max() > 100 and not flags.flagged.any()
    rows += [{"image": 31, "epoch": e, "loss": 0.4} for e in range(5)]  # a real jump
    assert qc_flags(pd.DataFrame(rows)).query("flagged").image.tolist() == [31]


def test_robust_z_falls_back_to_the_mean_absolute_deviation_when_the_mad_is_zero():
    # 4 of 5 values equal: MAD 0; mean |x - 1| = 4 / 5, times sqrt(pi / 2)
    z = robust_z(np.array([1.0, 1.0, 1.0, 1.0, 5.0]))
    np.testing.assert_allclose(z, np.array([0, 0, 0, 0, 4]) / (0.8 * np.sqrt(np.pi / 2)))


def test_robust_z_is_the_distance_to_the_median_in_scaled_mads():
    # median 3, |x - 3| = 2, 1, 0, 1, 97 -> MAD 1, scaled by 1.4826 (normal consistency)
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    np.testing.assert_allclose(z, np.array([-2, -1, 0, 1, 97]) / 1.482602218505602)
    np.testing.assert_array_equal(robust_z(np.full(4, 0.3)), np.zeros(4))  # MAD 0: no outlier


def _away_from_the_kink(shape, epsilon, seed):
    """Random mask values, a third of them exactly 1 (the start, where |1 - m|^b1 has no
    derivative without smoothing). A value within the finite-difference step of epsilon, where
    the smoothed terms switch branch, has a probability of about 1e-6 per voxel."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator, dtype=torch.float64)
    mask[..., ::3] = 1.0  # exactly at m = 1 too: the point where |x|^b1 is not differentiable
    return mask


@pytest.mark.parametrize("shape", [(2, 1, 5, 4), (2, 1, 4, 3, 5)])
@pytest.mark.parametrize("exponent", [0.1, 1.0, 2.0])
def test_closed_form_gradients_of_the_regularisers_agree_with_finite_differences(shape, exponent):
    epsilon = 1e-3
    mask = _away_from_the_kink(shape, epsilon, seed=len(shape)).requires_grad_(True)
    for term in (sparsity_term, smoothness_term):
        weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda m: (term(m, exponent, epsilon) * weights).sum(),
                                        (mask,), eps=1e-7, atol=1e-5)


@pytest.mark.parametrize("exponent", [0.1, 1.0, 3.0])
def test_closed_form_gradients_equal_autograd_of_the_smoothed_powers(exponent):
    """Reference: the same terms written with autograd through power_of_root (the isotropic
    smoothness; the anisotropic one in tests/test_mask_smoothness.py)."""
    epsilon = 1e-2
    mask = _away_from_the_kink((3, 1, 6, 5, 4), epsilon, seed=7).requires_grad_(True)
    mask.data[0] = 1.0  # one mask at its starting point, where every voxel is below epsilon
    reference_sparsity = power_of_root((1 - mask).square(), exponent, epsilon).flatten(1).mean(1)
    steps = spatial_gradient(mask)
    reference_smoothness = power_of_root(steps.square().sum(1), exponent, epsilon).flatten(1).mean(1)
    for ours, reference in ((sparsity_term(mask, exponent, epsilon), reference_sparsity),
                            (smoothness_term(mask, exponent, epsilon, "isotropic"),
                             reference_smoothness)):
        torch.testing.assert_close(ours, reference)
        expected, = torch.autograd.grad(reference.sum(), mask, retain_graph=True)
        actual, = torch.autograd.grad(ours.sum(), mask, retain_graph=True)
        torch.testing.assert_close(actual, expected)


class _RegionEvidence(torch.nn.Module):
    """A classifier whose AD logit is known: grey matter missing in ``region`` (atrophy) and
    anything bright in ``outside`` (the eyes of paper 1's defective image, segmented as grey
    matter) both count as AD evidence. Restoring grey matter (mu = 1) removes the first and
    cannot remove the second: a bright voxel stays bright whatever the mask."""

    def __init__(self, region: torch.Tensor, outside: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region)
        self.register_buffer("outside", outside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        atrophy = ((1 - x) * self.region).flatten(1).sum(1) / self.region.sum()
        eyes = (x * self.outside).flatten(1).sum(1) / self.outside.sum()
        ad = 12 * atrophy + 12 * eyes - 3
        return torch.stack([torch.zeros_like(ad), ad], 1)


def test_qc_flags_the_planted_defective_image_and_no_clean_one():
    """Paper 1's QC step 2 end to end: 24 patients with atrophy in one region, one of them
    with a bright blob outside the brain. The group mask learns to restore the region, which
    brings every clean image's probability down; the defective image keeps its blob, so its
    loss stays high each epoch and it alone is flagged."""
    shape = (10, 12, 10)
    region = torch.zeros(1, 1, *shape)
    region[..., 3:6, 4:8, 3:6] = 1
    outside = torch.zeros(1, 1, *shape)
    outside[..., 0:2, 0:2, 0:2] = 1
    rng = np.random.default_rng(0)
    images = (0.8 + 0.05 * rng.standard_normal((25, 1, *shape))).clip(0, 1).astype(np.float32)
    images[:, :, 3:6, 4:8, 3:6] *= 0.3  # atrophy in the region
    images[:, :, 0:2, 0:2, 0:2] = 0.0   # background
    defective = 7
    images[defective, :, 0:2, 0:2, 0:2] = 1.0
    model = _RegionEvidence(region, outside).eval()
    config = GroupMaskConfig(max_epochs=15, patience=15, l1=1e-3, l2=1e-3)
    result = optimise_group_mask(model, images, np.ones(25, dtype=np.int64), None, None,
                                 make_reference(config), config, torch.device("cpu"))
    flags = qc_flags(result.image_losses, config.qc_z, config.qc_min_excess)
    assert flags.loc[flags.flagged, "image"].tolist() == [defective]
    assert flags.set_index("image").excess[defective] > 0.5
