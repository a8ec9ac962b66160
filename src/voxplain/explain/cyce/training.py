"""Training of CyCE (paper 3, 2.5): discriminators, then both generators, per batch of pairs.

Each step draws a batch of random image pairs ``(x_a, x_b)`` from the training images (labels
are never used), then

1. trains D+ and D- to find the real image in the shuffled pairs ``(x_b, G+(x_a))`` and
   ``(x_b, G-(x_a))`` (generators fixed);
2. freezes the discriminators and trains G+ and G- together on the sum of their eq. 4 losses::

       L(G+) = w_c cycle(x_a, G-(G+(x_a))) + w_s [dssim(x_a, G+(x_a)) + w_1 mean|x_a - G+(x_a)|]
             + w_a CE(D+(G+(x_a), x_b), inverted) + w_m CE(C(G+(x_a)), 1)

   and ``L(G-)`` with + and - exchanged and class 0 (``w_1 = similarity_l1_weight``, 0 in the
   paper, see :mod:`voxplain.explain.cyce.losses`). The cycle term of each generator also
   trains the other one, as in CycleGAN.

Choices the paper leaves open: Adam with CycleGAN's settings (learning rate 2e-4, beta1 0.5) for
all four networks, one optimiser for the two generators and one for the two discriminators;
``x_a`` and ``x_b`` are two independent draws without replacement within each; every random
draw of step ``t`` (pairs, patch shuffles) comes from generators seeded with ``(seed, t)``, so a
resumed run repeats exactly the draws of an uninterrupted one. Stopping: "until the overall loss
function of both generators converges" is made concrete as: the moving average of the
generator loss over ``window`` steps has not fallen by a relative ``tolerance`` below its best
value for ``patience`` steps (and at least ``min_steps`` were made), or ``max_steps`` is
reached, or the time budget ``max_seconds`` (if set) is spent. A checkpoint (weights, Adam moments, counters, history) is written every
``checkpoint_every`` steps; training resumes from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxplain.config import CyCEConfig
from voxplain.explain.cyce.discriminator import (
    PairDiscriminator,
    adversarial_loss,
    discriminator_loss,
)
from voxplain.explain.cyce.generator import UNetGenerator
from voxplain.explain.cyce.losses import (
    SSIMSettings,
    activation_maximisation_loss,
    cycle_loss,
    similarity_loss,
    ssim_settings,
)
from voxplain.models.checkpoint import (
    load_state,
    optimizer_tensors,
    restore_optimizer,
    save_state,
)

log = logging.getLogger("voxplain")

NETWORKS = ("g_plus", "g_minus", "d_plus", "d_minus")
#: Columns of loss.tsv, one row per step.
LOSS_COLUMNS = ("step", "discriminator", "generator", "cycle_plus", "cycle_minus",
                "similarity_plus", "similarity_minus", "adversarial_plus", "adversarial_minus",
                "activation_plus", "activation_minus", "probability_plus", "probability_minus",
                "seconds")

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class CyCEState:
    """Counters of a training run (everything but tensors)."""

    next_step: int = 0
    best_average: float = float("inf")
    steps_since_best: int = 0
    stop_reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def build_networks(config: CyCEConfig, spatial_dims: int, in_channels: int) -> nn.ModuleDict:
    """G+, G-, D+, D- (keys of :data:`NETWORKS`) for images with ``in_channels`` channels."""
    def generator() -> UNetGenerator:
        return UNetGenerator(spatial_dims, in_channels, config.widths, config.convs_per_stage)

    def discriminator() -> PairDiscriminator:
        return PairDiscriminator(spatial_dims, in_channels, config.widths,
                                 config.convs_per_stage, config.symmetric_discriminator,
                                 config.discriminator_normalisation)

    return nn.ModuleDict({"g_plus": generator(), "g_minus": generator(),
                          "d_plus": discriminator(), "d_minus": discriminator()})


def step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The random sources of one step, seeded by ``(seed, step)`` only."""
    numbers = np.random.default_rng([seed, step])
    shuffles = torch.Generator().manual_seed(int(numbers.integers(2**62)))
    return numbers, shuffles


class CyCETrainer:
    """Trains G+, G-, D+, D- against a frozen classifier on ``images`` ``(N, C, *spatial)``.

    Args:
        classifier: the model to explain; put in eval mode and frozen.
        images: training images (a NumPy array or tensor); batches are moved to ``device``.
        config: networks, loss weights and optimisation settings.
        device: where to train.
        dtype: floating type of the networks (float64 in tests).
    """

    def __init__(self, classifier: nn.Module, images: np.ndarray | torch.Tensor,
                 config: CyCEConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.images = torch.as_tensor(np.asarray(images))
        if self.images.ndim not in (4, 5) or len(self.images) < 2:
            raise ValueError("CyCE needs at least 2 training images shaped (N, C, *spatial) with "
                             f"2 or 3 spatial axes, got shape {tuple(self.images.shape)}")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.classifier = classifier.to(self.device, dtype).eval().requires_grad_(False)
        self.ssim: SSIMSettings = ssim_settings(
            self.images.shape[2:], config.ssim_kernel, config.ssim_scales, config.ssim_k1,
            config.ssim_k2, config.data_range)
        torch.manual_seed(config.seed)
        self.networks = build_networks(config, self.images.ndim - 2, self.images.shape[1]).to(
            self.device, dtype)
        adam = {"lr": config.learning_rate, "betas": (config.beta1, 0.999)}
        self.optimise_g = torch.optim.Adam(
            [*self.networks["g_plus"].parameters(), *self.networks["g_minus"].parameters()], **adam)
        self.optimise_d = torch.optim.Adam(
            [*self.networks["d_plus"].parameters(), *self.networks["d_minus"].parameters()], **adam)
        self.state = CyCEState()

    @property
    def classes(self) -> tuple[int, int]:
        """``(class of G+, class of G-)``."""
        return self.config.positive_class, 1 - self.config.positive_class

    def batch(self, numbers: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random pairs ``(x_a, x_b)``."""
        size = min(self.config.batch_size, len(self.images))
        a = numbers.choice(len(self.images), size, replace=False)
        b = numbers.choice(len(self.images), size, replace=False)
        return (self.images[a].to(self.device, self.dtype),
                self.images[b].to(self.device, self.dtype))

    def generator_losses(self, x_a: torch.Tensor, x_b: torch.Tensor,
                         shuffles: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every term of eq. 4 for G+ and G- (and the classifier's output on G(x_a))."""
        g_plus, g_minus = self.networks["g_plus"], self.networks["g_minus"]
        plus, minus = g_plus(x_a), g_minus(x_a)
        class_plus, class_minus = self.classes
        terms = {
            "cycle_plus": cycle_loss(x_a, g_minus(plus), self.ssim),
            "cycle_minus": cycle_loss(x_a, g_plus(minus), self.ssim),
            "similarity_plus": similarity_loss(x_a, plus, self.ssim,
                                               self.config.similarity_l1_weight),
            "similarity_minus": similarity_loss(x_a, minus, self.ssim,
                                                self.config.similarity_l1_weight),
            "adversarial_plus": adversarial_loss(self.networks["d_plus"], x_b, plus, shuffles),
            "adversarial_minus": adversarial_loss(self.networks["d_minus"], x_b, minus, shuffles),
            "activation_plus": activation_maximisation_loss(self.classifier, plus, class_plus),
            "activation_minus": activation_maximisation_loss(self.classifier, minus, class_minus),
        }
        c = self.config
        weights = {"cycle": c.cycle_weight, "similarity": c.similarity_weight,
                   "adversarial": c.adversarial_weight, "activation": c.activation_weight}
        terms["generator"] = sum(weights[name.rsplit("_", 1)[0]] * value
                                 for name, value in terms.items())
        with torch.no_grad():
            terms["probability_plus"] = torch.softmax(self.classifier(plus), 1)[:, class_plus].mean()
            terms["probability_minus"] = torch.softmax(self.classifier(minus), 1)[:, class_plus].mean()
        return terms

    def train_step(self, step: int) -> dict[str, float]:
        """Step ``step``: discriminators, then both generators; returns every loss term."""
        started = time.perf_counter()
        numbers, shuffles = step_generators(self.config.seed, step)
        x_a, x_b = self.batch(numbers)
        self.networks.train()
        with torch.no_grad():
            fake_plus, fake_minus = self.networks["g_plus"](x_a), self.networks["g_minus"](x_a)
        loss_d = (discriminator_loss(self.networks["d_plus"], x_b, fake_plus, shuffles)
                  + discriminator_loss(self.networks["d_minus"], x_b, fake_minus, shuffles))
        self.optimise_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimise_d.step()
        discriminators = [self.networks["d_plus"], self.networks["d_minus"]]
        for network in discriminators:
            network.requires_grad_(False)
        try:
            terms = self.generator_losses(x_a, x_b, shuffles)
            self.optimise_g.zero_grad(set_to_none=True)
            terms["generator"].backward()
            self.optimise_g.step()
        finally:
            for network in discriminators:
                network.requires_grad_(True)
        row = {"step": step, "discriminator": float(loss_d.detach())}
        row |= {name: float(value.detach()) for name, value in terms.items()}
        row["seconds"] = time.perf_counter() - started
        return {column: row[column] for column in LOSS_COLUMNS}

    def converged(self) -> bool:
        """Update the moving-average rule with the last step; True when training should stop."""
        c, state = self.config, self.state
        if len(state.history) >= c.window:
            average = float(np.mean([row["generator"] for row in state.history[-c.window:]]))
            if average < state.best_average * (1 - c.tolerance):
                state.best_average, state.steps_since_best = average, 0
            else:
                state.steps_since_best += 1
        return state.next_step >= c.min_steps and state.steps_since_best >= c.patience

    def fit(self, checkpoint: Path | None = None, callback: StepCallback | None = None) -> CyCEState:
        """Train until convergence or ``max_steps``, resuming from ``checkpoint`` if it holds one.

        ``callback(step, losses)`` is called after every step (progress display).
        """
        if checkpoint is not None and self.load_checkpoint(checkpoint):
            log.info("CyCE: resuming at step %d (%s)", self.state.next_step, checkpoint)
        started = time.perf_counter()
        while self.state.stop_reason is None:
            if self.state.next_step >= self.config.max_steps:
                self.state.stop_reason = "max_steps"
                break
            losses = self.train_step(self.state.next_step)
            self.state.history.append(losses)
            self.state.next_step += 1
            if self.converged():
                self.state.stop_reason = "converged"
            elif (self.config.max_seconds is not None
                  and time.perf_counter() - started > self.config.max_seconds):
                self.state.stop_reason = "max_seconds"
            if checkpoint is not None and (self.state.next_step % self.config.checkpoint_every == 0
                                           or self.state.stop_reason is not None):
                self.save_checkpoint(checkpoint)
            if callback is not None:
                callback(self.state.next_step, losses)
        return self.state

    def save_checkpoint(self, folder: Path) -> None:
        """Weights, Adam moments and counters to ``folder/checkpoint.safetensors``."""
        tensors = {f"{name}.{key}": value for name, network in self.networks.items()
                   for key, value in network.state_dict().items()}
        groups = {}
        for prefix, optimiser in (("g", self.optimise_g), ("d", self.optimise_d)):
            moments, groups[prefix] = optimizer_tensors(optimiser)
            tensors |= {f"{prefix}.{key}": value for key, value in moments.items()}
        save_state(folder, tensors, {"state": asdict(self.state), "param_groups": groups})

    def load_checkpoint(self, folder: Path) -> bool:
        """Restore a checkpoint written by :meth:`save_checkpoint`; False when there is none."""
        loaded = load_state(folder)
        if loaded is None:
            return False
        tensors, saved = loaded
        for name, network in self.networks.items():
            network.load_state_dict({key[len(name) + 1:]: value.to(self.device)
                                     for key, value in tensors.items()
                                     if key.startswith(f"{name}.")})
        for prefix, optimiser in (("g", self.optimise_g), ("d", self.optimise_d)):
            moments = {key[2:]: value for key, value in tensors.items()
                       if key.startswith(f"{prefix}.optimizer.")}
            restore_optimizer(optimiser, moments, saved["param_groups"][prefix])
        self.state = CyCEState(**saved["state"])
        return True

    def description(self) -> dict[str, Any]:
        """What ``generators.json`` records about the networks and the training."""
        return {"spatial_dims": self.images.ndim - 2, "in_channels": int(self.images.shape[1]),
                "input_shape": list(self.images.shape[2:]), "config": self.config.model_dump(),
                "ssim": {**asdict(self.ssim), "sigma": self.ssim.sigma,
                         "betas": list(self.ssim.betas)},
                "positive_class": self.classes[0], "negative_class": self.classes[1],
                "steps": self.state.next_step, "stop_reason": self.state.stop_reason}
