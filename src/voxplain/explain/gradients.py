"""Gradient and perturbation attributions, backed by Captum (not re-implemented here).

=====================  ======  ==============================================================
name                   signed  map
=====================  ======  ==============================================================
saliency               no      ``|d logit_t / d x|`` (Simonyan et al. 2014), Captum ``Saliency``
smoothgrad             no      mean ``|gradient|`` over noisy copies (Smilkov et al. 2017),
                               Captum ``NoiseTunnel(Saliency)``
integrated_gradients   yes     path integral of gradients times ``x - baseline`` (Sundararajan
                               et al. 2017), Captum ``IntegratedGradients``
occlusion              yes     drop of the target logit when a window is set to the baseline
                               (Zeiler & Fergus 2014), Captum ``Occlusion``
gradient_shap          yes     expected gradients over a baseline distribution (Lundberg & Lee
                               2017), Captum ``GradientShap``
deeplift_shap          yes     DeepLIFT (rescale rule) averaged over a baseline distribution,
                               Captum ``DeepLiftShap``
=====================  ======  ==============================================================

What this module adds to Captum: one target per sample, maps reduced to ``(N, 1, *spatial)`` by
**summing over the input channels** (for the unsigned methods, a sum of absolute values), seeds for
the random draws, the default baselines, and batch sizes derived from a memory bound.

**Memory bound.** ``memory_mb`` (default :data:`MEMORY_MB`) caps the activations of one batch that
Captum sends through the model. The activations of one input are measured once per input shape by
a forward pass that sums the sizes of the outputs of every leaf module (plus the input):
:func:`activation_bytes`. A pass may then hold ``memory_mb / activation_bytes`` inputs
(:func:`inputs_per_pass`); this gives Captum's ``perturbations_per_eval`` (occlusion),
``internal_batch_size`` (integrated gradients) and ``nt_samples_batch_size`` (SmoothGrad) unless
the caller sets them. The sum over all leaf outputs over-estimates a no-grad forward and is close
to what autograd keeps for a backward pass.

**Baselines.** Integrated gradients and occlusion use a constant baseline, 0 by default, or a
tensor ``(C, *spatial)``. The SHAP methods take a baseline *distribution* ``(B, C, *spatial)``
(e.g. training images); by default, per sample, :data:`SHAP_BASELINES` constant images at levels
spread evenly over the sample's value range ``[min, max]`` (:func:`constant_baselines`).

The stochastic methods (``smoothgrad``, ``gradient_shap``) and the methods whose default
baselines depend on the sample (``deeplift_shap``) run Captum once per sample, seeded with
``seed``, so a sample's map does not depend on the other samples of the batch; the unit of work is
then the batch of noisy copies / baselines of that sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import captum.attr as ca
import numpy as np
import torch
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.models.programs import is_program, program_refusal

MEMORY_MB = 1024.0
"""Default bound (MiB) on the activations of one batch sent through the model by Captum."""

SHAP_BASELINES = 8
"""Default size of the SHAP baseline distribution (constant images, see constant_baselines)."""


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations of one input ``x`` ``(1, C, *spatial)``: the input plus the
    outputs of every leaf module in one forward pass."""
    total = [x[:1].numel() * x.element_size()]

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def inputs_per_pass(model: nn.Module, x: torch.Tensor, memory_mb: float) -> int:
    """How many inputs shaped like one sample of ``x`` fit in ``memory_mb`` MiB of activations
    (at least 1)."""
    return max(1, int(memory_mb * 2**20 // activation_bytes(model, x)))


def constant_baselines(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` constant images ``(n, C, *spatial)`` at levels evenly spaced over ``[x.min(), x.max()]``
    of one sample ``x`` ``(C, *spatial)`` (the default SHAP baseline distribution)."""
    levels = torch.linspace(float(x.min()), float(x.max()), n, device=x.device, dtype=x.dtype)
    return levels.view(n, *([1] * x.ndim)).expand(n, *x.shape).contiguous()


def channel_sum(attributions: torch.Tensor) -> torch.Tensor:
    """``(n, C, *spatial)`` -> ``(n, 1, *spatial)``: sum over the input channels."""
    return attributions.sum(dim=1, keepdim=True)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators (CPU, and ``device`` if CUDA) and NumPy's global one
    (Captum's GradientShap draws from it) seeded with ``seed``, restoring their states afterwards."""
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)


def _positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value}")


def _per_axis(name: str, value: int | Sequence[int], spatial_dims: int,
              shape: Sequence[int]) -> tuple[int, ...]:
    """A window/stride option as one positive int per spatial axis, no larger than the image."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != spatial_dims:
        raise ValueError(f"{name} must give one value per spatial axis ({spatial_dims}), "
                         f"got {value}")
    if any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must hold positive integers, got {value}")
    if any(v > s for v, s in zip(values, shape)):
        raise ValueError(f"{name} {values} is larger than the image {tuple(shape)}")
    return values


def _baseline(baseline: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A constant, or a tensor ``(C, *spatial)`` / ``(1, C, *spatial)`` broadcast to ``x``."""
    if not isinstance(baseline, torch.Tensor):
        return float(baseline)
    if baseline.ndim == x.ndim - 1:
        baseline = baseline.unsqueeze(0)
    if baseline.shape != (1, *x.shape[1:]):
        raise ValueError(f"baseline shape {tuple(baseline.shape)} does not match one sample "
                         f"{tuple(x.shape[1:])}")
    return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)


def _distribution(baselines: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The SHAP baseline distribution ``(B, C, *spatial)`` for one sample ``x`` ``(C, *spatial)``."""
    if baselines is None:
        return constant_baselines(x, n)
    if baselines.shape[1:] != x.shape:
        raise ValueError(f"baselines shape {tuple(baselines.shape)} does not match one sample "
                         f"{tuple(x.shape)}: expected (B, {', '.join(map(str, x.shape))})")
    return baselines.to(device=x.device, dtype=x.dtype)


def _check_distribution(baselines: torch.Tensor | None, minimum: int) -> None:
    if baselines is None:
        return
    if baselines.ndim < 3 or len(baselines) < minimum:
        raise ValueError(f"baselines must be a distribution (B, C, *spatial) with B >= {minimum}, "
                         f"got shape {tuple(baselines.shape)}")


class MemoryBoundedExplainer(Explainer):
    """An explainer whose Captum method batches inputs: :meth:`inputs_per_pass` is measured once
    per input shape (:func:`inputs_per_pass`) and cached."""

    def __init__(self, model: nn.Module, *, memory_mb: float = MEMORY_MB,
                 batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        _positive("memory_mb", memory_mb)
        self.memory_mb = memory_mb
        self._per_pass: dict[tuple[object, ...], int] = {}

    def inputs_per_pass(self, x: torch.Tensor) -> int:
        """Inputs shaped like one sample of ``x`` that fit in ``memory_mb`` of activations."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._per_pass:
            self._per_pass[key] = inputs_per_pass(self.model, x, self.memory_mb)
        return self._per_pass[key]


class SaliencyExplainer(Explainer):
    """Saliency (Simonyan et al. 2014): absolute gradient of the target logit, summed over the
    input channels. Unsigned."""

    name = "saliency"
    signed = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)  # Captum warns when it has to do this itself
        return channel_sum(ca.Saliency(self.model).attribute(x, target=target, abs=True))


class SmoothGradExplainer(MemoryBoundedExplainer):
    """SmoothGrad (Smilkov et al. 2017): mean absolute gradient over ``n_samples`` noisy copies,
    summed over channels. Unsigned.

    Options: ``n_samples`` (default 50), ``noise`` — standard deviation of the Gaussian noise as a
    fraction of the sample's value range ``max - min`` (default 0.15; the paper recommends
    10-20 %), ``seed`` (default 0), ``memory_mb`` or ``nt_samples_batch_size`` (noisy copies per
    pass; derived from ``memory_mb`` when not given).
    """

    name = "smoothgrad"
    signed = False

    def __init__(self, model: nn.Module, *, n_samples: int = 50, noise: float = 0.15,
                 seed: int = 0, memory_mb: float = MEMORY_MB,
                 nt_samples_batch_size: int | None = None, batch_size: int = 8) -> None:
        super().__init__(model, memory_mb=memory_mb, batch_size=batch_size)
        _positive("n_samples", n_samples)
        _non_negative("noise", noise)
        _positive("nt_samples_batch_size", nt_samples_batch_size, allow_none=True)
        self.n_samples, self.noise, self.seed = n_samples, noise, seed
        self.nt_samples_batch_size = nt_samples_batch_size

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tunnel = ca.NoiseTunnel(ca.Saliency(self.model))
        per_pass = self.nt_samples_batch_size or self.inputs_per_pass(x)
        maps = []
        for sample, label in zip(x, target):
            stdev = self.noise * float(sample.max() - sample.min())
            with seeded(self.seed, x.device):
                maps.append(tunnel.attribute(
                    sample[None], nt_type="smoothgrad", nt_samples=self.n_samples,
                    nt_samples_batch_size=min(per_pass, self.n_samples), stdevs=stdev,
                    target=int(label), abs=True))
        return channel_sum(torch.cat(maps))


class IntegratedGradientsExplainer(MemoryBoundedExplainer):
    """Integrated gradients (Sundararajan et al. 2017), summed over channels. Signed: positive
    voxels raise the target logit relative to the baseline; the map sums to
    ``F(x) - F(baseline)`` (completeness) up to the quadrature error.

    Options: ``baseline`` (default 0.0: a constant, or a tensor ``(C, *spatial)``), ``n_steps``
    (default 50), ``method`` (Captum's quadrature, default ``"gausslegendre"``),
    ``internal_batch_size`` (path points per pass; derived from ``memory_mb`` when not given).
    """

    name = "integrated_gradients"
    signed = True

    def __init__(self, model: nn.Module, *, baseline: float | torch.Tensor = 0.0,
                 n_steps: int = 50, method: str = "gausslegendre", memory_mb: float = MEMORY_MB,
                 internal_batch_size: int | None = None, batch_size: int = 8) -> None:
        super().__init__(model, memory_mb=memory_mb, batch_size=batch_size)
        _positive("n_steps", n_steps)
        _positive("internal_batch_size", internal_batch_size, allow_none=True)
        methods = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
                   "gausslegendre")
        if method not in methods:
            raise ValueError(f"unknown integration method {method!r}; available: {', '.join(methods)}")
        self.baseline, self.n_steps, self.method = baseline, n_steps, method
        self.internal_batch_size = internal_batch_size

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pass = self.internal_batch_size or self.inputs_per_pass(x)
        attributions = ca.IntegratedGradients(self.model).attribute(
            x, baselines=_baseline(self.baseline, x), target=target, n_steps=self.n_steps,
            method=self.method, internal_batch_size=max(per_pass, len(x)))
        return channel_sum(attributions)


class OcclusionExplainer(MemoryBoundedExplainer):
    """Occlusion (Zeiler & Fergus 2014): a window covering all channels slides over the image with
    ``stride``; each voxel gets the mean drop of the target logit over the windows covering it
    (Captum's convention), summed over channels. Signed: positive where hiding the voxel lowers the
    target logit.

    Options: ``window`` (default 8 voxels per axis, or one value per spatial axis), ``stride``
    (default 8: non-overlapping windows, one forward pass per window position), ``baseline``
    (default 0.0 or a tensor ``(C, *spatial)``), ``perturbations_per_eval`` (window positions per
    pass; by default as many as fit in ``memory_mb`` for the whole chunk).
    """

    name = "occlusion"
    signed = True

    def __init__(self, model: nn.Module, *, window: int | Sequence[int] = 8,
                 stride: int | Sequence[int] = 8, baseline: float | torch.Tensor = 0.0,
                 memory_mb: float = MEMORY_MB, perturbations_per_eval: int | None = None,
                 batch_size: int = 8) -> None:
        super().__init__(model, memory_mb=memory_mb, batch_size=batch_size)
        _positive("perturbations_per_eval", perturbations_per_eval, allow_none=True)
        self.window, self.stride, self.baseline = window, stride, baseline
        self.perturbations_per_eval = perturbations_per_eval

    def perturbations_per_pass(self, x: torch.Tensor) -> int:
        """Window positions evaluated per forward pass for the chunk ``x`` (Captum's
        ``perturbations_per_eval``): a pass holds ``len(x)`` inputs per position."""
        if self.perturbations_per_eval is not None:
            return self.perturbations_per_eval
        return max(1, self.inputs_per_pass(x) // len(x))

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial_dims = x.ndim - 2
        window = _per_axis("window", self.window, spatial_dims, x.shape[2:])
        stride = _per_axis("stride", self.stride, spatial_dims, x.shape[2:])
        attributions = ca.Occlusion(self.model).attribute(
            x, sliding_window_shapes=(x.shape[1], *window), strides=(x.shape[1], *stride),
            baselines=_baseline(self.baseline, x), target=target,
            perturbations_per_eval=self.perturbations_per_pass(x))
        return channel_sum(attributions)


class GradientShapExplainer(Explainer):
    """GradientSHAP (Lundberg & Lee 2017; Captum ``GradientShap``): expected gradients times
    ``x - baseline`` at random points between ``x`` and baselines drawn from a distribution,
    summed over channels. Signed; sums to ``F(x) - E[F(baseline)]`` in expectation.

    Options: ``baselines`` (a distribution ``(B, C, *spatial)``, e.g. training images; default
    :data:`SHAP_BASELINES` constant images over the sample's range), ``n_samples`` (random draws
    per sample, default 50; all of them go through the model in one pass, Captum has no batching
    knob here), ``noise`` (standard deviation of the Gaussian noise added to each draw, as a
    fraction of the sample's range; default 0.0 as in Captum), ``seed`` (default 0).
    """

    name = "gradient_shap"
    signed = True

    def __init__(self, model: nn.Module, *, baselines: torch.Tensor | None = None,
                 n_baselines: int = SHAP_BASELINES, n_samples: int = 50, noise: float = 0.0,
                 seed: int = 0, batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        _check_distribution(baselines, 1)
        _positive("n_baselines", n_baselines)
        _positive("n_samples", n_samples)
        _non_negative("noise", noise)
        self.baselines, self.n_baselines = baselines, n_baselines
        self.n_samples, self.noise, self.seed = n_samples, noise, seed

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shap = ca.GradientShap(self.model)
        maps = []
        for sample, label in zip(x, target):
            stdev = self.noise * float(sample.max() - sample.min())
            with seeded(self.seed, x.device):
                maps.append(shap.attribute(
                    sample[None], baselines=_distribution(self.baselines, sample, self.n_baselines),
                    n_samples=self.n_samples, stdevs=stdev, target=int(label)))
        return channel_sum(torch.cat(maps))


class DeepLiftShapExplainer(Explainer):
    """DeepLiftSHAP (Lundberg & Lee 2017; Captum ``DeepLiftShap``): DeepLIFT's rescale rule
    against each baseline of a distribution, averaged, summed over channels. Signed; sums to
    ``F(x) - mean_b F(baseline_b)`` (summation-to-delta).

    Options: ``baselines`` (a distribution ``(B, C, *spatial)``, ``B >= 2``; default
    ``n_baselines`` = :data:`SHAP_BASELINES` constant images over the sample's range). The ``B``
    baselines of one sample go through the model in one pass.

    Known limitation of Captum 0.9: its DeepLIFT rule for a max-pooling that follows an activation
    does not conserve the difference (captum issues #1104 and #1276), so on the paper-1 CNN and
    VGG-GAP the maps sum to ``F(x) - mean F(baseline)`` only up to a few percent.
    """

    name = "deeplift_shap"
    signed = True

    def __init__(self, model: nn.Module, *, baselines: torch.Tensor | None = None,
                 n_baselines: int = SHAP_BASELINES, batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        if is_program(model):
            raise ValueError(program_refusal(self.name, model, "the network's activations as "
                                             "nn modules (DeepLift's rescale rule hooks them)"))
        _check_distribution(baselines, 2)
        if n_baselines < 2:
            raise ValueError(f"deeplift_shap needs at least 2 baselines, got n_baselines={n_baselines}")
        self.baselines, self.n_baselines = baselines, n_baselines

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shap = ca.DeepLiftShap(self.model)
        with warnings.catch_warnings(), _module_attributes_restored(self.model):
            # Captum announces, on every call, the hooks it sets and removes on activations
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            maps = [shap.attribute(sample[None],
                                   baselines=_distribution(self.baselines, sample, self.n_baselines),
                                   target=int(label))
                    for sample, label in zip(x, target)]
        return channel_sum(torch.cat(maps))


@contextmanager
def _module_attributes_restored(model: nn.Module) -> Iterator[None]:
    """Delete, after the block (also when it fails), the attributes set on ``model``'s modules
    during it. Captum's DeepLIFT stores each activation's input and output as ``module.input`` /
    ``module.output`` in forward hooks and deletes them in the backward pass; when the call fails
    between the two (e.g. a target outside the classes) they stay, holding activations."""
    before = {module: set(vars(module)) for module in model.modules()}
    try:
        yield
    finally:
        for module, names in before.items():
            for name in set(vars(module)) - names:
                delattr(module, name)
