"""The contract of :class:`~voxplain.explain.api.Explainer`, checked for every method of
:data:`~voxplain.explain.methods.METHODS` in 2D and 3D (in the spirit of scikit-learn's
``check_estimator``): a method added to the dict is checked here without writing a test.

For inputs ``(N, C, *spatial)`` with two channels, on a tiny VGG-GAP network (batch-norm with
non-trivial statistics, dropout: eval and train mode compute different functions):

- one finite map ``(N, 1, *spatial)`` per sample, the input left as it was;
- per-sample targets: a batch with targets ``[0, 1]`` equals each sample explained alone with
  its own target (and the two classes do give different maps, so a wrong routing would show);
- a batch equals its samples one at a time, with ``batch_size`` smaller than the batch;
- deterministic: the same call gives the same maps whatever the global random state, which is
  left untouched; methods with a ``seed`` option draw from it (another seed, other maps);
- the model is left as it came: each module's train/eval mode (the maps of a model in train mode
  are those of eval mode), parameters and buffers, ``requires_grad`` flags, devices, no
  ``.grad`` written; the same after a call that fails (a target outside the classes);
- no leaked hooks: module hooks (forward, forward-pre, backward, global ones), tensor hooks on
  parameters, and attributes set on modules are as before.

Methods get cheap options (few samples, steps, baselines); a method missing from
:data:`OPTIONS` runs with its defaults. ``cyce`` gets a pair of random (untrained) generators.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals
from torch.nn.modules.batchnorm import _BatchNorm

from voxplain.explain.api import Explainer
from voxplain.explain.cyce import CyCEGenerators
from voxplain.explain.cyce.generator import UNetGenerator
from voxplain.explain.methods import METHODS, explainer
from voxplain.models.networks import VGGGAP

SHAPES = {2: (12, 12), 3: (8, 8, 8)}
CHANNELS = 2
OPTIONS: dict[str, dict[str, object]] = {
    "smoothgrad": {"n_samples": 4},
    "integrated_gradients": {"n_steps": 8},
    "occlusion": {"window": 4, "stride": 4},
    "gradient_shap": {"n_samples": 4, "n_baselines": 3},
    "deeplift_shap": {"n_baselines": 3},
    "region_shapley": {"n_samples": 2},
}
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_full_backward_hooks",
         "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")
CASES = [pytest.param(name, dims, id=f"{name}-{dims}d") for name in sorted(METHODS)
         for dims in (2, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def tiny_model(spatial_dims: int) -> nn.Module:
    """VGG-GAP (so ``cam`` runs too) with batch-norm statistics and affine parameters away from
    the identity and dropout before the linear layer; in eval mode."""
    torch.manual_seed(0)
    model = VGGGAP(SHAPES[spatial_dims], in_channels=CHANNELS, channels=[2, 4],
                   convs_per_block=[1], dropout=0.5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def generators(spatial_dims: int) -> CyCEGenerators:
    """Untrained U-Nets whose output layer is not zero (else both are the identity and R = 0)."""
    torch.manual_seed(1)
    pair = [UNetGenerator(spatial_dims, CHANNELS, (4, 8), 1) for _ in range(2)]
    for network in pair:
        nn.init.normal_(network.output.weight, std=0.1)
    return CyCEGenerators(*pair, {"positive_class": 1}).eval()


def build(name: str, model: nn.Module, spatial_dims: int, **options: object) -> Explainer:
    """The method ``name`` on ``model`` with its cheap options (``cyce``: random generators)."""
    defaults = dict(OPTIONS.get(name, {}))
    if name == "cyce":
        defaults["generators"] = generators(spatial_dims)
    return METHODS[name](model, **{**defaults, **options})


def images(n: int, spatial_dims: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, CHANNELS, *SHAPES[spatial_dims],
                      generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_one_finite_map_per_sample_on_the_input_grid(name, spatial_dims):
    model, x = tiny_model(spatial_dims), images(3, spatial_dims)
    original = x.clone()
    method = build(name, model, spatial_dims)
    maps = method.explain(x, [0, 1, 1])
    assert METHODS[name].name == name and isinstance(METHODS[name].signed, bool)
    assert maps.shape == (3, 1, *SHAPES[spatial_dims])
    assert maps.dtype == x.dtype and maps.device == x.device and not maps.requires_grad
    assert torch.isfinite(maps).all()
    assert torch.equal(x, original) and not x.requires_grad


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_each_sample_is_explained_for_its_own_target(name, spatial_dims):
    model, x = tiny_model(spatial_dims), images(2, spatial_dims)
    method = build(name, model, spatial_dims)
    batched = method.explain(x, [0, 1])
    close(batched[0:1], method.explain(x[0:1], 0))
    close(batched[1:2], method.explain(x[1:2], 1))
    close(method.explain(x, torch.tensor([0, 1])), batched)
    assert not torch.allclose(method.explain(x, [1, 0]), batched), "the target changes nothing"


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_a_batch_in_chunks_equals_its_samples_one_at_a_time(name, spatial_dims):
    model, x, targets = tiny_model(spatial_dims), images(3, spatial_dims), [1, 0, 1]
    method = build(name, model, spatial_dims, batch_size=2)
    batched = method.explain(x, targets)
    for i, target in enumerate(targets):
        close(batched[i:i + 1], method.explain(x[i:i + 1], target))
    close(build(name, model, spatial_dims, batch_size=3).explain(x, targets), batched)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_the_same_call_gives_the_same_maps_whatever_the_global_random_state(name, spatial_dims):
    model, x, targets = tiny_model(spatial_dims), images(3, spatial_dims), [0, 1, 1]
    torch.manual_seed(1)
    np.random.seed(1)
    first = build(name, model, spatial_dims).explain(x, targets)
    torch.manual_seed(2)
    np.random.seed(2)
    method = build(name, model, spatial_dims)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    again = method.explain(x, targets)
    assert torch.equal(torch.get_rng_state(), torch_state), "explain drew from torch's generator"
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state)), \
        "explain drew from NumPy's global generator"
    assert torch.equal(again, first)
    assert torch.equal(method.explain(x, targets), first)
    if "seed" in inspect.signature(METHODS[name]).parameters:
        assert torch.equal(build(name, model, spatial_dims, seed=7).explain(x, targets),
                           build(name, model, spatial_dims, seed=7).explain(x, targets))
        assert not torch.equal(build(name, model, spatial_dims, seed=7).explain(x, targets), first)


def model_state(model: nn.Module) -> dict[str, object]:
    """Everything about ``model`` that explaining it must leave as it was."""
    return {
        "modes": [module.training for module in model.modules()],
        "tensors": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "devices": [t.device for t in (*model.parameters(), *model.buffers())],
        "grads": [p.grad for p in model.parameters()],
    }


def assert_same_state(model: nn.Module, before: dict[str, object]) -> None:
    after = model_state(model)
    assert after["modes"] == before["modes"], "train/eval mode changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), f"{key} changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert after["devices"] == before["devices"], "device changed"
    assert all(grad is None for grad in after["grads"]), ".grad written"


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_the_model_is_left_as_it_came_and_explained_in_eval_mode(name, spatial_dims):
    model, x, targets = tiny_model(spatial_dims), images(3, spatial_dims), [0, 1, 1]
    reference = build(name, model, spatial_dims).explain(x, targets)  # model in eval mode
    model.train()
    model.features[0].eval()  # mixed modes come back module by module
    model.features[0][0].requires_grad_(False)  # a partly frozen model
    before = model_state(model)
    method = build(name, model, spatial_dims)
    assert_same_state(model, before)
    maps = method.explain(x, targets)
    assert_same_state(model, before)
    close(maps, reference)  # dropout and batch statistics would change the maps
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        method.explain(x, 5)  # no such class: fails, and leaves the model as it was
    assert_same_state(model, before)


def hooks(model: nn.Module) -> list[object]:
    """Keys of every hook dict of every module and the global ones, tensor hooks of every
    parameter, and the attributes of every module."""
    state: list[object] = []
    for module in model.modules():
        state.append(sorted(module.__dict__))
        state.extend(list(getattr(module, attribute, None) or {}) for attribute in HOOKS)
    for parameter in model.parameters():
        state.append(list(parameter._backward_hooks or {}))
        state.append(list(getattr(parameter, "_post_accumulate_grad_hooks", None) or {}))
    state.extend(list(getattr(module_globals, attribute, None) or {}) for attribute in GLOBAL_HOOKS)
    return state


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_no_hook_or_attribute_is_left_on_the_model(name, spatial_dims):
    model, x = tiny_model(spatial_dims), images(3, spatial_dims)
    before = hooks(model)
    method = build(name, model, spatial_dims, batch_size=2)
    method.explain(x, [0, 1, 1])
    assert hooks(model) == before
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        method.explain(x, 5)
    assert hooks(model) == before


def test_a_method_added_to_the_dict_is_built_by_name_and_unknown_names_are_listed(monkeypatch):
    class Constant(Explainer):
        name, signed = "constant", False

        def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.ones(len(x), 1, *x.shape[2:])

    monkeypatch.setitem(METHODS, "constant", Constant)
    built = explainer("constant", tiny_model(2), batch_size=2)
    assert type(built) is Constant and built.batch_size == 2
    with pytest.raises(ValueError, match=r"unknown explanation method 'nope'; available: cam, "):
        explainer("nope", tiny_model(2))
