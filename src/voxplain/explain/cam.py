"""Class activation maps: CAM, Grad-CAM and Grad-CAM++ of paper 2, section 2.3, and the
element-wise HiResCAM and LayerCAM (our own code).

All weight the feature maps ``A^k`` ``(n, K, *spatial)`` of one layer by the class logit ``y^c``
and keep the positive part. CAM, Grad-CAM and Grad-CAM++ weight each *channel*,
``L^c = ReLU(sum_k w_k^c A^k)``:

- :class:`CAM` (Zhou et al. 2016): the weights of the linear layer that follows global average
  pooling (GAP), ``w_k^c = W[c, k]``, at the GAP input.
- :class:`GradCAM` (Selvaraju et al. 2017, paper 2 eq. 1): the gradient of the class logit
  ``y^c`` averaged over *all* spatial axes of the layer, ``w_k^c = 1/Z sum_ij dy^c/dA_ij^k``.
- :class:`GradCAMPlusPlus` (Chattopadhyay et al. 2018, paper 2 eq. 2): the closed form for the
  exponential score ``Y^c = exp(y^c)``.

HiResCAM and LayerCAM weight each *position* by the gradient there, so the map stays faithful
to the model at earlier, finer layers where averaging the gradient over space would not:

- :class:`HiResCAM` (Draelos & Carin 2020): ``L^c = ReLU(sum_k dy^c/dA^k ⊙ A^k)``.
- :class:`LayerCAM` (Jiang et al. 2021): ``L^c = ReLU(sum_k ReLU(dy^c/dA^k) ⊙ A^k)``.

Shared conventions, for 2D and 3D alike (``spatial_dims = x.ndim - 2``):

- the layer (gradient methods): any submodule that outputs a feature map once per forward pass,
  named as in ``model.named_modules()``; by default the rule of
  :func:`~voxplain.explain.layers.choose_cam_layer` (the deepest activated feature map that keeps
  at least ``min_layer_size`` voxels along every axis), resolved for each input shape.
- batched, one target class per sample: the score back-propagated is ``sum_n y^{c_n}_n``; in eval
  mode samples do not interact, so each sample's gradient is that of its own target and a batch
  with mixed targets gives exactly the per-sample maps.
- the layer map is upsampled to the input grid with :func:`torch.nn.functional.interpolate`,
  (bi/tri)linear with ``align_corners=False``: voxels are cells, a coarse cell's value sits at the
  centre of the block of input voxels it covers (MONAI's default upsampler does the same).
- ``baseline`` (optional, gradient methods): a reference image; the feature maps weighted are
  ``A^k(x) - A^k(baseline)`` instead of ``A^k(x)`` (see :class:`_LayerGradients`).
- ``normalise=True`` (the default) divides each sample's upsampled map by its own maximum, so
  every map lies in [0, 1] with 0 meaning "no positive evidence"; an all-zero map stays zero.
  ``normalise=False`` returns the raw map (for Grad-CAM++ see the note on its scale).
- gradients are taken with :func:`torch.autograd.grad` w.r.t. the layer's output only: the
  layers before it run without a graph (no memory kept for a backward that is not needed),
  no ``.grad`` of any parameter is written, and ``requires_grad`` of the parameters is left as
  it is. Hooks are removed before each call returns, also when it fails.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.explain.layers import (
    DEFAULT_MIN_LAYER_SIZE,
    LayerChoice,
    check_layer_name,
    check_min_size,
    choose_cam_layer,
    named_cam_layer,
)
from voxplain.models.declared_input import DeclaredInput
from voxplain.models.programs import is_program, program_refusal

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_GAP_TYPES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def to_input_grid(maps: torch.Tensor, shape: tuple[int, ...], normalise: bool) -> torch.Tensor:
    """Layer maps ``(n, 1, *layer_spatial)`` upsampled (linear, ``align_corners=False``) to
    ``shape``, then, if ``normalise``, divided by each sample's maximum; ``(n, 1, *shape)``."""
    if tuple(maps.shape[2:]) != tuple(shape):
        maps = F.interpolate(maps, size=shape, mode=_LINEAR_MODES[len(shape)], align_corners=False)
    if normalise:  # in place: ``maps`` is always a fresh tensor of ours here
        peak = maps.flatten(1).amax(1).view(-1, *[1] * (maps.ndim - 1))
        maps.div_(torch.where(peak > 0, peak, torch.ones_like(peak)))
    return maps


def on_input_grid(model: nn.Module, maps: torch.Tensor, shape: tuple[int, ...],
                  normalise: bool) -> torch.Tensor:
    """:func:`to_input_grid`, for a model that crops or pads its input first
    (:class:`~voxplain.models.declared_input.DeclaredInput` with a size): the layer maps cover
    the network's frame, so they are upsampled to it and then put back on the input grid."""
    size = model.preprocessing.size if isinstance(model, DeclaredInput) else None
    if size is None or tuple(size) == tuple(shape):
        return to_input_grid(maps, shape, normalise)
    framed = model.frame_to_input(to_input_grid(maps, tuple(size), False), shape)
    return to_input_grid(framed, shape, normalise)


def weighted_feature_maps(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k A^k)`` of weights ``(n, K)`` and feature maps ``(n, K, *spatial)``,
    shaped ``(n, 1, *spatial)``."""
    weights = weights.view(*weights.shape, *[1] * (activations.ndim - 2))
    return F.relu((weights * activations).sum(1, keepdim=True))  # einsum: ~100x slower on CPU


def forward_with_layer(model: nn.Module, layer: nn.Module,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, classes)`` of ``x`` and the output of ``layer`` as a leaf tensor that requires
    grad, with the logits' graph starting at that leaf.

    The forward runs without a graph up to ``layer``; its hook switches gradients on and hands the
    rest of the network a copy of the output (so an in-place operation after ``layer`` cannot
    alter the activations we keep). The hook is removed before returning.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...],
             output: torch.Tensor) -> torch.Tensor:
        if captured:
            raise ValueError(f"layer {type(module).__name__} runs more than once per forward pass; "
                             "choose a layer that produces one feature map per sample")
        torch.set_grad_enabled(True)  # restored when the enclosing no_grad block exits
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {type(layer).__name__} is not used by the model's forward pass")
    return logits, captured[0]


def check_targets(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse logits that are not ``(n, classes)`` and targets that are not class indices."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits (N, classes), got shape {tuple(logits.shape)}")
    if target.min() < 0 or target.max() >= logits.shape[1]:
        raise ValueError(f"targets {target.tolist()} outside the model's {logits.shape[1]} classes")


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logit of each sample's own target class, ``(n,)``."""
    check_targets(logits, target)
    return logits.gather(1, target[:, None]).squeeze(1)


class CAM(Explainer):
    """Class activation map (Zhou et al. 2016; paper 2, 2.3): ``ReLU(sum_k W[c, k] A^k)``.

    Needs a network whose logits are ``W @ GAP(A) + b``: exactly one global average pooling
    module (adaptive average pooling to size 1) whose input ``A`` ``(n, K, *spatial)`` feeds one
    linear layer (dropout in between is allowed: it is the identity in eval mode), such as
    :class:`~voxplain.models.networks.VGGGAP` or paper 2's VGG16, VGG19 and ResNet-50 with
    their ``gap`` head (:mod:`voxplain.models.imagenet`). The structure is checked when the
    explainer is built and, numerically, on every call (the logits must equal
    ``W @ mean(A) + b``).

    Paper 2 writes CAM without a ReLU; we keep its positive part, like Grad-CAM, so the three
    maps share one convention (``signed = False``). With it, Grad-CAM at the GAP input equals
    CAM / Z exactly (Z = voxels of ``A``), because there ``dy^c/dA_ij^k = W[c, k] / Z``.
    """

    name = "cam"
    signed = False

    def __init__(self, model: nn.Module, *, normalise: bool = True, batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        self.normalise = normalise
        if is_program(model):
            raise ValueError(program_refusal("cam", model, "its global average pooling and "
                                             "linear layer as nn modules (to read the linear "
                                             "layer's weights)"))
        pools = [m for m in model.modules() if isinstance(m, _GAP_TYPES)
                 and all(size == 1 for size in _as_tuple(m.output_size))]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(pools) != 1 or len(linears) != 1:
            raise ValueError(
                f"cam needs a network with global average pooling followed by one linear layer "
                f"(e.g. vgg_gap, or vgg16, vgg19, resnet50 with head 'gap'); "
                f"{type(model).__name__} has {len(pools)} global average pooling "
                f"and {len(linears)} linear layers. Use grad_cam instead.")
        self.pool, self.linear = pools[0], linears[0]

    @torch.no_grad()
    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.pool.register_forward_hook(lambda module, inputs, output:
                                                 captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"cam: global average pooling ran {len(captured)} times per forward pass")
        activations = captured[0]
        check_targets(logits, target)
        expected = F.linear(activations.flatten(2).mean(2), self.linear.weight, self.linear.bias)
        tolerance = 1e-4 * float(expected.abs().max()) + 1e-6
        if not torch.allclose(logits, expected, rtol=1e-4, atol=tolerance):
            raise ValueError(f"cam: the logits of {type(self.model).__name__} are not "
                             "linear(global average pool(features)); use grad_cam instead")
        maps = weighted_feature_maps(self.linear.weight[target], activations)
        return on_input_grid(self.model, maps, tuple(x.shape[2:]), self.normalise)


class _LayerGradients(Explainer):
    """Common part of the gradient-based maps: the feature maps ``A`` of one layer and the gradient
    ``g = dy^c/dA`` of each sample's target logit w.r.t. them, both ``(n, K, *spatial)``.

    ``layer``: the name (as in ``model.named_modules()``) of any submodule that outputs a feature
    map ``(N, C, *spatial)`` once per forward pass: a convolution, an activation, a block. Default
    ``None``: the rule of :func:`~voxplain.explain.layers.choose_cam_layer` with
    ``min_layer_size``, resolved from the input's shape at the first call for that shape (see
    :meth:`resolve_layer`). After a call, ``layer_name``, ``layer_shape`` (the layer's spatial
    shape) and ``layer_coarse`` (an axis has fewer than ``min_layer_size`` voxels) describe the
    layer read for the last input shape.

    ``baseline`` (default ``None``: none): a reference image, a constant or a tensor
    ``(C, *spatial)`` (e.g. the mean image of the control class: ``voxplain explain
    --baseline-class CN``). The feature maps a method weights become their difference from the
    reference's, ``A^k(x) - A^k(b)``; the weights are the method's own, from the gradients at
    ``x``. A map then shows where the session's features depart from the reference's in the
    direction that raises the target logit, and gives nothing where they are the same (the
    background of a brain scan, features every image activates alike). For HiResCAM this is the
    first-order account of ``y^c(x) - y^c(b)`` per position (see :class:`HiResCAM`).
    """

    signed = False

    def __init__(self, model: nn.Module, *, layer: str | None = None,
                 min_layer_size: int = DEFAULT_MIN_LAYER_SIZE, normalise: bool = True,
                 baseline: float | torch.Tensor | None = None, batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        if layer is not None:
            check_layer_name(model, layer)
        check_min_size(min_layer_size)
        self.baseline = baseline
        self.layer = layer
        self.min_layer_size = min_layer_size
        self.normalise = normalise
        self.layer_name: str | None = layer
        self.layer_shape: tuple[int, ...] | None = None
        self.layer_coarse: bool | None = None
        self._choices: dict[tuple[int, ...], LayerChoice] = {}

    def resolve_layer(self, input_shape: Sequence[int], in_channels: int) -> LayerChoice:
        """The layer read for inputs ``(N, in_channels, *input_shape)``: ``layer`` if given, else
        the default rule's choice; sets ``layer_name``, ``layer_shape`` and ``layer_coarse``.
        One dry forward pass per input shape, then cached."""
        key = (in_channels, *input_shape)
        if key not in self._choices:
            size = self.min_layer_size
            self._choices[key] = (
                choose_cam_layer(self.model, input_shape, in_channels, size) if self.layer is None
                else named_cam_layer(self.model, self.layer, input_shape, in_channels, size))
        choice = self._choices[key]
        self.layer_name, self.layer_shape = choice.name, choice.shape
        self.layer_coarse = choice.coarse
        return choice

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        choice = self.resolve_layer(tuple(x.shape[2:]), x.shape[1])
        layer = self.model.get_submodule(choice.name)
        with torch.enable_grad():
            logits, activations = forward_with_layer(self.model, layer, x)
            scores = target_scores(logits, target)
            (gradients,) = torch.autograd.grad(scores.sum(), activations)
        activations = activations.detach()
        features = activations if self.baseline is None else \
            activations - self.reference_activations(layer, x)
        maps = self.layer_map(activations, gradients, features)
        return on_input_grid(self.model, maps, tuple(x.shape[2:]), self.normalise)

    def reference_activations(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(1, K, *spatial)`` of ``baseline`` at ``layer`` (one forward pass)."""
        if isinstance(self.baseline, torch.Tensor):
            reference = self.baseline.to(device=x.device, dtype=x.dtype)
            if reference.ndim == x.ndim - 1:
                reference = reference[None]
            if tuple(reference.shape) != (1, *x.shape[1:]):
                raise ValueError(f"baseline shape {tuple(self.baseline.shape)} does not match "
                                 f"one sample {tuple(x.shape[1:])}")
        else:
            reference = torch.full_like(x[:1], float(self.baseline))
        with torch.no_grad():
            return forward_with_layer(self.model, layer, reference)[1].detach()

    @abstractmethod
    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor,
                  features: torch.Tensor) -> torch.Tensor:
        """Map ``(n, 1, *spatial)`` of the layer from feature maps ``A`` and gradients ``g``
        ``(n, K, *spatial)``; ``features``: the maps that are weighted, ``A`` or, with a
        baseline, ``A - A(baseline)``."""


class _ChannelWeights(_LayerGradients):
    """Grad-CAM and Grad-CAM++: ``ReLU(sum_k w_k^c A^k)`` with one weight per channel."""

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor,
                  features: torch.Tensor) -> torch.Tensor:
        return weighted_feature_maps(self.weights(activations, gradients), features)

    @abstractmethod
    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights ``(n, K)`` from feature maps and gradients ``(n, K, *spatial)``."""


class GradCAM(_ChannelWeights):
    """Grad-CAM (paper 2, eq. 1): ``w_k^c = 1/Z sum_ij dy^c/dA_ij^k``, the gradient of the target
    logit averaged over all spatial axes of ``layer``; map ``ReLU(sum_k w_k^c A^k)``."""

    name = "grad_cam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.flatten(2).mean(2)


class GradCAMPlusPlus(_ChannelWeights):
    """Grad-CAM++ (paper 2, eq. 2) in closed form for the exponential score ``Y^c = exp(y^c)``.

    With ``g = dy^c/dA`` and a piecewise-linear network (ReLU, max-pool, linear layers: second
    derivatives of ``y^c`` vanish), ``d^n Y^c / (dA_ij^k)^n = Y^c g_ij^n``, so eq. 2 reads::

        alpha_ij^k = g_ij^2 / (2 g_ij^2 + (sum_ab A_ab^k) g_ij^3) = 1 / (2 + (sum_ab A_ab^k) g_ij)
        w_k^c      = sum_ij alpha_ij^k ReLU(Y^c g_ij) = Y^c sum_ij ReLU(g_ij) / (2 + S_k g_ij)

    with ``S_k = sum_ab A_ab^k``; positions where ``g_ij <= 0`` or the denominator is zero add
    nothing (``0/0`` taken as 0). Written with ``g_ij^2`` divided out, no power of ``g`` can
    underflow.

    Denominator convention: the paper's (Chattopadhyay et al. eq. 19 and their reference code):
    the spatial *sum of the activations* times the gradient cubed *at the same position*,
    ``S_k g_ij^3``. It is the one eq. 2 of paper 2 states and the one the derivation gives.
    MONAI's ``GradCAMpp`` uses ``sum_ab A_ab^k g_ab^3`` instead (one constant per channel, the
    cubed gradient summed with the activations). The two agree when the gradient is constant
    over space within each channel (e.g. at a layer followed directly by global average pooling)
    and differ otherwise.

    Overflow: ``Y^c = exp(y^c)`` overflows float32 for ``y^c > 88`` (float64: 709), and MONAI's
    ``exp(score) * grad`` then gives inf/NaN maps. ``Y^c`` cancels from ``alpha`` and is a positive
    factor of every weight of sample n, hence of its whole map: working in log space,
    ``log L = y^c + log ReLU(sum_k w'_k A^k)`` with ``w'_k = w_k / Y^c``, and we drop the additive
    ``y^c`` (equivalently: use ``exp(y^c - y^c)``). This is exact: the normalised map
    (``normalise=True``) is identical to eq. 2's, and the unnormalised map is eq. 2's divided by
    ``exp(y^c)`` of its own sample, finite for any logit.
    """

    name = "grad_cam_pp"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, activations.ndim))
        totals = activations.sum(spatial, keepdim=True)
        denominator = 2 + totals * gradients
        usable = (gradients > 0) & (denominator != 0)
        terms = torch.where(usable, gradients / torch.where(usable, denominator, 1), 0)
        return terms.flatten(2).sum(2)


class HiResCAM(_LayerGradients):
    """HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations
    of convolutional neural networks", arXiv:2011.08891): gradient and feature map multiplied
    position by position before the sum over channels, ``L^c = ReLU(sum_k g^k ⊙ A^k)`` with
    ``g^k = dy^c/dA^k``.

    Grad-CAM first averages ``g^k`` over space, so a position can light up where the model gives
    it a negative weight, as long as the channel's average weight is positive. HiResCAM keeps each
    position's own weight. Behind a flatten + linear head (``y^c = sum_kij W^c_kij A^k_ij + b_c``)
    ``g = W^c`` and, before the ReLU, each position's value is exactly its contribution to
    ``y^c - b_c``; more generally, when the layer reaches ``y^c - b_c`` through max-pool, ReLU
    and bias-free linear steps only (a positively homogeneous function of ``A``), the values sum
    to ``y^c - b_c`` (Euler's theorem). At a layer that feeds global average pooling and a linear
    layer directly, ``g^k`` is constant over space and HiResCAM equals Grad-CAM.

    With a ``baseline`` ``b``, ``L^c = ReLU(sum_k g^k ⊙ (A^k(x) - A^k(b)))``: before the ReLU,
    the first-order estimate of each position's share of ``y^c(x) - y^c(b)``; exactly that
    share (Captum's ``LayerIntegratedGradients`` from ``b``, summed over channels) when the
    network after the layer is linear, e.g. a flatten + linear or a pooling + linear head.
    """

    name = "hires_cam"

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor,
                  features: torch.Tensor) -> torch.Tensor:
        return F.relu((gradients * features).sum(1, keepdim=True))


class LayerCAM(_LayerGradients):
    """LayerCAM (Jiang, Zhang, Hou, Cheng & Wei 2021, "LayerCAM: exploring hierarchical class
    activation maps for localization", IEEE TIP 30, 5875-5888): each position weighted by the
    positive part of its own gradient, ``w_ij^k = ReLU(g_ij^k)``,
    ``L^c = ReLU(sum_k w^k ⊙ A^k)``, with ``g^k = dy^c/dA^k``.

    Like HiResCAM it weights positions, not channels, but drops negative gradients, so it equals
    HiResCAM wherever every gradient at the layer is non-negative. After an activation with
    non-negative outputs (ReLU) every term is non-negative and the outer ReLU changes nothing.
    Jiang et al. also fuse the maps of several layers (scaled by ``tanh``); we return one layer's
    map, like the other methods here, and leave fusion to the caller.
    """

    name = "layer_cam"

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor,
                  features: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(gradients) * features).sum(1, keepdim=True))


def _as_tuple(size: int | tuple[int | None, ...] | None) -> tuple[int | None, ...]:
    return size if isinstance(size, tuple) else (size,)
