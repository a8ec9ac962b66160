"""Which layer a gradient-based class activation map reads (Grad-CAM, Grad-CAM++, HiResCAM,
LayerCAM): the deepest activated feature map that still keeps a few voxels along every axis.

A class activation map is a map of one layer's feature maps ``A^k`` ``(N, K, *spatial)``,
upsampled to the input grid, so it can be no finer than that layer's grid. Selvaraju et al. read
"the last convolutional layer"; in Keras, and in paper 2 (VGG19 ``block5_conv4``), that layer's
output already includes its ReLU, and common practice reads the *activated output of a
convolutional block*. The last ``nn.Conv*`` module of a PyTorch network is not that layer: its
output comes before batch-norm and the activation, and on a deep network and a small grid it is
tiny (the default 5-block CNN on the 31x37x31 demo grid: 2x3x2 voxels, one blob stretched over
the volume). :func:`choose_cam_layer` states the rule we use instead; :func:`named_cam_layer`
reports the same facts for a layer the user names, so a ``--layer`` can be checked against the
rule.

Both run one dry forward pass (zeros ``(1, C, *input_shape)``, no graph, eval mode, on the
model's device and dtype) with hooks on every submodule, removed afterwards; the mode
(train/eval) of every module is restored as it was.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from voxplain.config import DEFAULT_MIN_LAYER_SIZE

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Activation functions whose output is an activated feature map. Sigmoid, Tanh and Hardsigmoid
#: are left out: inside convolutional networks they are gates (attention, squeeze-excitation),
#: multiplicative weights rather than feature maps.
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
                    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)


@dataclass(frozen=True)
class LayerChoice:
    """The layer a class activation map reads, for one input shape.

    ``name``: as in ``model.named_modules()``; ``shape``: the spatial shape of its output
    ``(*layer_spatial)``; ``coarse``: True when an axis has fewer voxels than the minimum size
    asked for (the map is then a few blobs stretched over the input).
    """

    name: str
    shape: tuple[int, ...]
    coarse: bool


@dataclass(frozen=True)
class LayerOutput:
    """One module call of the dry forward pass.

    ``shape``: the output's full shape (None when it is not a tensor); ``runs``: calls of the
    module in the pass; ``activated``: the output is the tensor an activation module returned
    (containers and pass-through modules such as ``Identity``, or ``Dropout`` in eval mode,
    return that very tensor); ``tensor``: modules that return the same tensor object share it.
    """

    name: str
    shape: tuple[int, ...] | None
    runs: int
    activated: bool
    convolution: bool
    tensor: int

    def is_feature_map(self, spatial_dims: int) -> bool:
        """``(1, C, *spatial)`` with as many spatial axes as the input."""
        return self.shape is not None and len(self.shape) == spatial_dims + 2 and self.shape[0] == 1

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.shape[2:]) if self.shape is not None else ()


class _DryPass:
    """Forward hooks that record each module's output in the order the modules return.

    A module returns after its children, so a container is recorded after its last leaf; the
    leaf count at its pre-hook tells whether a leaf ran inside it.
    """

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names = names
        self.calls: list[tuple[str, tuple[int, ...] | None, bool, bool, int]] = []
        self.leaves_run = 0
        self.starts: dict[nn.Module, list[int]] = defaultdict(list)
        self.last_leaf: tuple[object, bool, int] | None = None  # output, activated, tensor
        self.tensors = 0

    def before(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        self.starts[module].append(self.leaves_run)

    def after(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        start = self.starts[module].pop()
        leaf = next(module.children(), None) is None
        # a leaf returning its input unchanged (in place, Identity) or a container returning its
        # last leaf's output hands on that tensor, and with it whether it is activated
        same = (self.last_leaf is not None and output is self.last_leaf[0]
                and (leaf or self.leaves_run > start))
        activated = (bool(same and self.last_leaf[1])
                     or (leaf and (isinstance(module, ACTIVATION_TYPES)
                                  or _graph_output_op(module) in GRAPH_ACTIVATIONS)))
        if same:
            tensor = self.last_leaf[2]
        else:
            tensor, self.tensors = self.tensors, self.tensors + 1
        if leaf:
            self.leaves_run += 1
            self.last_leaf = (output, activated, tensor)
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        convolution = (isinstance(module, CONV_TYPES)
                       or (leaf and _graph_output_op(module) in GRAPH_CONVOLUTIONS))
        self.calls.append((self.names[module], shape, activated, convolution, tensor))


#: ATen operators (by name) whose output is an activated feature map, and convolutions: how the
#: leaves of an exported program (``torch.export.unflatten``: graph modules, not ``nn.ReLU`` or
#: ``nn.Conv3d``) are told apart, by the operator that computes their output.
GRAPH_ACTIVATIONS = frozenset({"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu",
                               "_prelu_kernel", "rrelu", "elu", "elu_", "selu", "celu", "gelu",
                               "silu", "silu_", "mish", "hardswish", "softplus"})
GRAPH_CONVOLUTIONS = frozenset({"conv1d", "conv2d", "conv3d", "convolution"})


def _graph_output_op(module: nn.Module) -> str | None:
    """The name of the operator that computes a graph module's output (``leaky_relu`` of
    ``aten.leaky_relu.default``), None for other modules."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    outputs = [node for node in graph.nodes if node.op == "output"]
    if len(outputs) != 1 or not outputs[0].args:
        return None
    node = outputs[0].args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def trace_layer_outputs(model: nn.Module, input_shape: Sequence[int],
                        in_channels: int) -> list[LayerOutput]:
    """Every submodule call of one forward pass of zeros ``(1, in_channels, *input_shape)``, in
    the order the modules return (no graph, eval mode, the model's device and dtype). Hooks are
    removed and every module's train/eval mode restored before returning, also on failure."""
    names = {module: name for name, module in model.named_modules() if name}
    reference = next((t for t in chain(model.parameters(), model.buffers())
                      if t.is_floating_point()), None)
    x = torch.zeros(1, in_channels, *input_shape,
                    device=None if reference is None else reference.device,
                    dtype=None if reference is None else reference.dtype)
    trace = _DryPass(names)
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(trace.before))
            handles.append(module.register_forward_hook(trace.after))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    runs = Counter(name for name, *_ in trace.calls)
    return [LayerOutput(name, shape, runs[name], activated, convolution, tensor)
            for name, shape, activated, convolution, tensor in trace.calls]


def cam_candidates(outputs: Sequence[LayerOutput], spatial_dims: int) -> list[LayerOutput]:
    """The layers :func:`choose_cam_layer` chooses from, shallow to deep: feature maps of modules
    that run once, activated (else, if the network has none, convolution outputs); of modules
    returning the same tensor, the innermost."""
    usable = [out for out in outputs if out.runs == 1 and out.is_feature_map(spatial_dims)]
    kept = [out for out in usable if out.activated] or [out for out in usable if out.convolution]
    innermost: dict[int, LayerOutput] = {}
    for out in kept:  # children return before their containers
        innermost.setdefault(out.tensor, out)
    return list(innermost.values())


def choose_cam_layer(model: nn.Module, input_shape: Sequence[int], in_channels: int,
                     min_size: int = DEFAULT_MIN_LAYER_SIZE) -> LayerChoice:
    """The default layer of a class activation map for inputs ``(N, in_channels, *input_shape)``.

    Rule: among the *activated feature maps* — outputs ``(N, C, *spatial)`` (as many spatial
    axes as the input) of an activation module (ReLU, LeakyReLU, ELU, GELU, SiLU, ...; see
    :data:`ACTIVATION_TYPES`) or of a container whose last executed leaf is one and whose output
    is that leaf's output — of modules that run exactly once per forward pass, take the
    **deepest (last executed) that keeps at least** ``min_size`` **voxels along every spatial
    axis**. If none does, take the one with the largest smallest axis (ties: the deepest) and
    mark the choice ``coarse``. Where several modules return the same tensor (a ReLU, its conv
    block, the block's parent), the innermost is named. A network without any activation
    module (e.g. activations applied with ``torch.nn.functional``, invisible to hooks) is
    treated the same way over its convolution outputs.

    Why: deeper layers carry more class-specific features (Selvaraju et al.'s reason for the
    last convolutional layer), but a map is no finer than its layer's grid, and a 1- or 2-voxel
    axis gives one blob stretched over the input (the last block of the default CNN on the
    31x37x31 demo grid: 2x3x2 voxels). ``min_size = 4`` (:data:`DEFAULT_MIN_LAYER_SIZE`) is a
    judgement: with 4 cells per axis a map still tells apart the two quarters of each half (e.g.
    medial from lateral within a hemisphere), with 2 only the halves. Activated outputs, because
    ``A^k`` then is what the next block sees (paper 2's VGG19 ``block5_conv4`` includes its
    ReLU); a module that runs twice (a ReLU instance reused in a residual block) has two outputs
    and cannot be hooked unambiguously, so its container is taken instead.

    Returns the layer's name, its output's spatial shape and ``coarse``. Raises ``ValueError``
    when the network has no feature map for this input (or ``min_size < 1``).
    """
    check_min_size(min_size)
    outputs = trace_layer_outputs(model, input_shape, in_channels)
    candidates = cam_candidates(outputs, len(input_shape))
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no activation or convolution that outputs a "
                         f"feature map (N, C, *spatial) for inputs of shape {tuple(input_shape)} "
                         "once per forward pass; a class activation map needs one")
    fine = [out for out in candidates if min(out.spatial) >= min_size]
    chosen = fine[-1] if fine else max(reversed(candidates), key=lambda out: min(out.spatial))
    return LayerChoice(chosen.name, chosen.spatial, coarse=not fine)


def named_cam_layer(model: nn.Module, name: str, input_shape: Sequence[int], in_channels: int,
                    min_size: int = DEFAULT_MIN_LAYER_SIZE) -> LayerChoice:
    """The layer ``name`` as :func:`choose_cam_layer` would describe it: its output's spatial
    shape for inputs ``(N, in_channels, *input_shape)``, ``coarse`` when an axis has fewer than
    ``min_size`` voxels. Raises ``ValueError`` when the module does not exist, does not run,
    runs more than once per forward pass, or does not output a feature map ``(N, C, *spatial)``
    (the messages list the rule's candidates)."""
    check_min_size(min_size)
    check_layer_name(model, name)
    outputs = trace_layer_outputs(model, input_shape, in_channels)
    calls = [out for out in outputs if out.name == name]
    candidates = ", ".join(out.name for out in cam_candidates(outputs, len(input_shape))) or "none"
    where = f"layer {name!r} of {type(model).__name__}"
    if not calls:
        raise ValueError(f"{where} is not used by its forward pass; candidates: {candidates}")
    if len(calls) > 1:
        raise ValueError(f"{where} runs {len(calls)} times per forward pass and cannot be hooked "
                         f"unambiguously; candidates: {candidates}")
    if not calls[0].is_feature_map(len(input_shape)):
        raise ValueError(f"{where} outputs shape {calls[0].shape}, not a feature map (N, C, "
                         f"*spatial) of a {len(input_shape)}D input; candidates: {candidates}")
    return LayerChoice(name, calls[0].spatial, coarse=min(calls[0].spatial) < min_size)


def check_layer_name(model: nn.Module, name: str) -> None:
    """Refuse a name that is not a submodule of ``model``; the message lists its convolutions and
    activation modules (any other submodule that outputs a feature map is valid too)."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return
    kinds = {"convolutions": CONV_TYPES, "activations": ACTIVATION_TYPES}
    listed = [f"{', '.join(names)} ({kind})" for kind, types in kinds.items()
              if (names := [key for key, module in modules.items() if isinstance(module, types)])]
    raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}; valid layers: "
                     f"{'; '.join(listed) or 'none'}; or any other module of named_modules() "
                     "that outputs a feature map (N, C, *spatial) once per forward pass")


def check_min_size(min_size: int) -> None:
    if min_size < 1:
        raise ValueError(f"the minimum layer size must be at least 1 voxel, got {min_size}")
