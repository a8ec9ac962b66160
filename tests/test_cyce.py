"""CyCE (paper 3): MS-DSSIM, U-Net generators, paired discriminators, training, resume, relevance,
domain-transfer statistics, and the run-folder steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import write_cohort
from statsmodels.stats.weightstats import DescrStatsW

from voxplain.config import CyCEConfig, CyCEStepConfig, CyCETransferConfig, TrainConfig
from voxplain.explain.cyce import CyCE, CyCEGenerators
from voxplain.explain.cyce.discriminator import PairDiscriminator, shuffled_pair
from voxplain.explain.cyce.generator import UNetGenerator
from voxplain.explain.cyce.losses import dssim, similarity_loss, ssim_settings
from voxplain.explain.cyce.training import CyCETrainer
from voxplain.explain.methods import METHODS
from voxplain.evaluate.transfer import transfer_table
from voxplain.models.networks import ConvNet

TINY = {"widths": [4, 8, 8, 8], "convs_per_stage": 1, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def noisy(shape, sigma, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator) * 0.5 + 0.25
    return x, (x + sigma * torch.randn(shape, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 1, 20, 24, 20)])
def test_dssim_of_identical_images_is_zero_and_grows_with_noise(shape):
    settings = ssim_settings(shape[2:])
    x, _ = noisy(shape, 0.0)
    values = [float(dssim(x, noisy(shape, sigma)[1], settings)) for sigma in (0.02, 0.1, 0.3)]
    assert float(dssim(x, x, settings)) == pytest.approx(0.0, abs=1e-7)
    assert 0 < values[0] < values[1] < values[2] <= 0.5 + 1e-9


@pytest.mark.parametrize(("shape", "last_beta"), [
    ((1, 1, 64, 64), 0.3001 / (0.0448 + 0.2856 + 0.3001)),  # 3 scales
    ((1, 1, 20, 24, 20), 0.2856 / (0.0448 + 0.2856)),        # 2 scales
])
def test_dssim_uses_c1_as_k1_squared_on_constant_images(shape, last_beta):
    # Constant images: every contrast-structure term is c2/c2 = 1, so MS-SSIM is the luminance
    # term of the coarsest scale, (2ab + c1) / (a^2 + b^2 + c1), to the power of its beta;
    # with k1 = .01 on [0, 1], c1 = 1e-4 (c1 = .01 would give a clearly different value).
    a, b = 0.2, 0.6
    expected = (1 - ((2 * a * b + 1e-4) / (a**2 + b**2 + 1e-4)) ** last_beta) / 2
    value = dssim(torch.full(shape, a, dtype=torch.float64),
                  torch.full(shape, b, dtype=torch.float64), ssim_settings(shape[2:]))
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - (1 - ((2 * a * b + 0.01) / (a**2 + b**2 + 0.01)) ** last_beta) / 2) > 1e-3


def test_ssim_window_and_scales_adapt_to_small_inputs():
    assert (ssim_settings((64, 64)).kernel_size, ssim_settings((64, 64)).scales) == (7, 3)
    assert (ssim_settings((20, 24, 20)).kernel_size, ssim_settings((20, 24, 20)).scales) == (5, 2)
    for k in (3, 5, 7, 9, 11):  # torchmetrics' Gaussian window is int(3.5 sigma + 0.5) * 2 + 1 wide
        sigma = ssim_settings((200, 200), kernel_size=k).sigma
        assert int(3.5 * sigma + 0.5) * 2 + 1 == k
    assert sum(ssim_settings((64, 64)).betas) == pytest.approx(1.0)
    x, y = noisy((1, 1, 41, 49, 41), 0.1)
    assert 0 < float(dssim(x, y, ssim_settings((41, 49, 41)))) < 0.5
    with pytest.raises(ValueError, match="too small"):
        ssim_settings((8, 8), kernel_size=11)


@pytest.mark.parametrize("shape", [(2, 1, 33, 47), (1, 2, 13, 17, 11)])
def test_generators_keep_the_input_shape_for_odd_sizes_and_start_as_the_identity(shape):
    generator = UNetGenerator(len(shape) - 2, shape[1], widths=(4, 8, 8, 8))
    x = torch.rand(shape)
    y = generator(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)  # zero-initialised residual output
    torch.nn.init.normal_(generator.output.weight)
    assert generator(x).shape == x.shape and not torch.equal(generator(x), x)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_discriminator_decision_does_not_depend_on_the_order_of_the_pair(spatial):
    torch.manual_seed(0)
    discriminator = PairDiscriminator(len(spatial), 1, (4, 8, 8, 8), symmetric=True)
    torch.nn.init.normal_(discriminator.heads[0].weight)
    real, fake = torch.rand(3, 1, *spatial), torch.rand(3, 1, *spatial)
    for a, b in zip(discriminator(real, fake), discriminator(fake, real)):
        assert a.shape[1] == 2 and a.shape[2:] != b.shape[1:]
        # p(real is first | real, fake) == p(real is second | fake, real)
        torch.testing.assert_close(torch.softmax(a, 1)[:, 0], torch.softmax(b, 1)[:, 1])


def test_shuffled_pairs_label_the_position_of_the_real_patch():
    real = [torch.zeros(4, 3, 8, 8)]
    fake = [torch.ones(4, 3, 8, 8)]
    first, second, position = shuffled_pair(real, fake, torch.Generator().manual_seed(1))
    # where the real patch went first, the first feature is 0 (real), else 1 (fake)
    assert torch.equal(first[0][:, 0], position[0].float())
    assert torch.equal(second[0][:, 0], 1 - position[0].float())
    assert 0.35 < position[0].float().mean() < 0.65  # no fixed "real" neuron


def test_similarity_l1_term_charges_a_global_offset_linearly_where_dssim_hardly_does():
    # G(x) = x + c: mean |x - G(x)| = c exactly (hand-computed), and the option adds
    # l1_weight * c to the paper's DSSIM-only similarity (default weight 0 = the paper).
    settings = ssim_settings((64, 64))
    x, _ = noisy((2, 1, 64, 64), 0.0)
    offset = 0.02
    paper = float(similarity_loss(x, x + offset, settings))
    assert paper == pytest.approx(float(dssim(x, x + offset, settings)), abs=1e-7)
    assert float(similarity_loss(x, x + offset, settings, l1_weight=3.0)) == pytest.approx(
        paper + 3.0 * offset, rel=1e-5)
    # MS-SSIM sees luminance only at its coarsest scale, quadratically near G(x) = x: the
    # offset is almost free for DSSIM (the background mass of R, benchmarks/README.md CyCE)
    assert paper < offset / 20
    assert CyCEConfig().similarity_l1_weight == 0.0


def test_group_normalised_discriminator_cannot_see_a_global_gain():
    # Stage 0 has 4 channels, so group norm normalises each channel alone:
    # conv(a x) = a (W * x) + bias, whose per-channel standardisation is that of W * x, so the
    # features of a x (a > 0) are those of x up to group norm's epsilon. Without normalisation
    # they differ, so the discriminator can tell a contrast-stretched image.
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    for normalisation, blind in (("group", True), ("none", False)):
        discriminator = PairDiscriminator(2, 1, (4, 8, 8, 8), normalisation=normalisation)
        stage0 = discriminator.encoder.stages[0]
        assert any(isinstance(m, torch.nn.GroupNorm) for m in stage0) == blind
        with torch.no_grad():
            same = torch.allclose(stage0(1.5 * x), stage0(x), atol=1e-3)
        assert same == blind
    with pytest.raises(ValueError, match="normalisation"):
        PairDiscriminator(2, 1, (4, 8, 8, 8), normalisation="batch")


def test_trainer_builds_the_configured_discriminator_and_similarity():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    config = CyCEConfig(**TINY, discriminator_normalisation="none", similarity_l1_weight=2.0)
    trainer = CyCETrainer(tiny_classifier(), images, config)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in trainer.networks["d_plus"].modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in trainer.networks["g_plus"].modules())
    torch.nn.init.normal_(trainer.networks["g_plus"].output.weight, std=0.1)
    with torch.no_grad():
        plus = trainer.networks["g_plus"](images)
        terms = trainer.generator_losses(images, images)
    expected = dssim(images, plus, trainer.ssim) + 2.0 * (images - plus).abs().mean()
    assert float(terms["similarity_plus"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["similarity_minus"]) == pytest.approx(0.0, abs=1e-7)  # G- = identity


def tiny_classifier(spatial=(16, 16), seed=0):
    torch.manual_seed(seed)
    return ConvNet(spatial, channels=[4, 8, 8, 8], dropout=0.0).eval()


def test_one_training_step_decreases_the_activation_maximisation_loss():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # Generators start as the identity, where the cycle and similarity terms are at their
    # minimum; without the adversarial term the first step follows the AM gradient.
    trainer = CyCETrainer(tiny_classifier(), images,
                          CyCEConfig(**TINY, learning_rate=1e-3, adversarial_weight=0.0, seed=0))

    def activation_losses():
        with torch.no_grad():
            terms = trainer.generator_losses(images, images)
        return float(terms["activation_plus"]), float(terms["activation_minus"])

    before = activation_losses()
    trainer.train_step(0)
    after = activation_losses()
    assert after[0] < before[0] and after[1] < before[1]


def test_resume_after_an_interruption_continues_from_the_checkpoint_identically(tmp_path):
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    config = CyCEConfig(**TINY, max_steps=4, min_steps=4, checkpoint_every=2, seed=3)
    whole = CyCETrainer(tiny_classifier(), images, config)
    whole.fit(tmp_path / "whole")

    def interrupt(step, losses):
        if step == 3:
            raise KeyboardInterrupt

    first = CyCETrainer(tiny_classifier(), images, config)
    with pytest.raises(KeyboardInterrupt):
        first.fit(tmp_path / "resumed", interrupt)
    resumed = CyCETrainer(tiny_classifier(), images, config)
    state = resumed.fit(tmp_path / "resumed")
    assert [row["step"] for row in state.history] == list(range(4))
    for name, network in whole.networks.items():
        for key, value in network.state_dict().items():
            torch.testing.assert_close(resumed.networks[name].state_dict()[key], value,
                                       rtol=1e-5, atol=1e-7)
    for a, b in zip(whole.state.history, state.history):
        assert a["generator"] == pytest.approx(b["generator"], rel=1e-5)


def test_training_stops_when_the_moving_average_of_the_generator_loss_converges():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    config = CyCEConfig(**TINY, max_steps=20, min_steps=0, window=2, tolerance=0.5, patience=2)
    state = CyCETrainer(tiny_classifier(), images, config).fit()
    # a relative fall of 50 % of the moving average every 2 steps cannot last
    assert state.stop_reason == "converged" and state.next_step < 20


def test_transfer_t_tests_and_intervals_match_statsmodels():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, 30)
    probabilities = {"x": x, "G-(x)": x - rng.uniform(0, 0.3, 30),
                     "G+(x)": x + rng.normal(0.05, 0.1, 30)}
    table = transfer_table(probabilities).set_index("domain")
    for domain in ("G-(x)", "G+(x)"):
        difference = probabilities[domain] - x
        t, p, df = DescrStatsW(difference).ttest_mean(0)
        hand = difference.mean() / (difference.std(ddof=1) / math.sqrt(30))
        assert table.loc[domain, "t"] == pytest.approx(t, rel=1e-9)
        assert table.loc[domain, "t"] == pytest.approx(hand, rel=1e-9)
        assert table.loc[domain, "p"] == pytest.approx(p, rel=1e-9)
        assert table.loc[domain, "df"] == df == 29
        low, high = DescrStatsW(probabilities[domain]).tconfint_mean(alpha=0.05)
        assert (table.loc[domain, "ci_low"], table.loc[domain, "ci_high"]) == pytest.approx((low, high))
    assert math.isnan(table.loc["x", "p"])


def test_relevance_is_g_plus_minus_g_minus_and_survives_saving(tmp_path):
    torch.manual_seed(0)
    g_plus, g_minus = (UNetGenerator(2, 1, (4, 8, 8, 8), 1) for _ in range(2))
    for network in (g_plus, g_minus):
        torch.nn.init.normal_(network.output.weight, std=0.1)
    config = CyCEConfig(widths=[4, 8, 8, 8], convs_per_stage=1)
    generators = CyCEGenerators(g_plus, g_minus).eval()
    generators.save(tmp_path, {"spatial_dims": 2, "in_channels": 1, "positive_class": 1,
                               "config": config.model_dump()})
    x = torch.rand(3, 1, 32, 32)
    classifier = ConvNet((32, 32), channels=[4, 8, 8, 8])
    explainer = CyCE(classifier, generators=tmp_path)
    assert METHODS["cyce"] is CyCE and CyCE.signed
    expected = g_plus(x) - g_minus(x)
    maps = explainer.explain(x, [1, 0, 1])
    torch.testing.assert_close(maps[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[1], -expected[1], rtol=1e-5, atol=1e-6)
    deltas = CyCE(classifier, generators=generators, map="delta").explain(x, [1, 0, 0])
    torch.testing.assert_close(deltas[0], (g_plus(x) - x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas[1], (g_minus(x) - x)[1], rtol=1e-5, atol=1e-6)


def test_cyce_steps_train_resume_and_evaluate_the_transfer_on_a_run_folder(tmp_path):
    from voxplain.steps.cyce import run_cyce_train, run_cyce_transfer
    from voxplain.steps.train import run_train

    tsv = write_cohort(tmp_path / "cohort", subjects=8, sessions=1, shape=(12, 12, 12))
    run_train(TrainConfig(cohort=tsv, out=tmp_path / "run", folds=2, epochs=1, batch_size=4,
                             device="cpu", model={"name": "cnn", "channels": [2, 4]}))
    step = CyCEStepConfig(run=tmp_path / "run", folds=[0], device="cpu",
                          cyce={**TINY, "max_steps": 2, "min_steps": 2})
    summary = run_cyce_train(step)
    folder = tmp_path / "run" / "cyce" / "fold-0" / "run-0"
    assert {"generators.safetensors", "generators.json", "loss.tsv"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "checkpoint.safetensors").exists() and summary.steps.tolist() == [2]
    assert run_cyce_train(step).steps.tolist() == [2]  # finished: skipped
    table = run_cyce_transfer(CyCETransferConfig(run=tmp_path / "run", folds=[0], device="cpu"))
    assert table.domain.tolist() == ["x", "G-(x)", "G+(x)"] and (folder / "transfer.tsv").is_file()
    with pytest.raises(ValueError, match="other \\[cyce_train\\] settings"):
        run_cyce_train(step.model_copy(update={"cyce": CyCEConfig(**TINY, max_steps=3)}))
    # the explain step finds each fold's generators in RUN/cyce/fold-K/run-R by itself
    from voxplain.config import ExplainStepConfig
    from voxplain.steps.explain import run_explain

    index = run_explain(ExplainStepConfig(run=tmp_path / "run", explain={"method": "cyce"}, folds=[0],
                                          device="cpu"))
    assert len(index) > 0 and set(index.method) == {"cyce"}
    maps = sorted((tmp_path / "run" / "explanations" / "cyce" / "fold-0" / "run-0").glob("sub-*"))
    assert len(maps) == len(index)
    with pytest.raises(FileNotFoundError, match="no trained CyCE generators"):
        run_explain(ExplainStepConfig(run=tmp_path / "run", explain={"method": "cyce"}, folds=[1],
                                      device="cpu"))
