"""Cost of every explanation method, and of our CAM family against MONAI and Captum, in one run.

For the default paper-1 ``cnn`` (``build_model(ModelConfig(input_shape=grid))``) at the demo grid
(the SPM grid 121x145x121 downsampled by 4, :func:`~voxplain.data.grid.downsampled_shape`:
31x37x31) and the full SPM grid, batches of 1 and 8 random volumes:

- ``s/volume``: median seconds of ``explainer(name, model).explain(x, targets)`` per volume, maps
  upsampled to the input grid (every method returns maps on the input grid, so upsampling is part
  of every timing);
- ``floor``: one forward + backward of the same model on the same batch, in eval mode: the summed
  target logits differentiated w.r.t. the input (``torch.autograd.grad``; no parameter
  gradients) — what one gradient map cannot avoid, timed right before each method in every
  round; ``ratio`` = median over rounds of method / that floor;
- methods that need global average pooling (``cam``) cannot run on the ``cnn``: they are timed on
  ``vgg_gap`` at the same grid, against that model's own floor (marked in the output);
- peers (timed in a block of their own, before the other methods, demo grid: 5 repeats), on
  the same ``cnn``, input, targets and layer (our default,
  :func:`~voxplain.explain.layers.choose_cam_layer`): our ``grad_cam`` / ``grad_cam_pp`` vs MONAI's
  ``GradCAM`` / ``GradCAMpp`` (batch size 1: MONAI is only correct there, so batch 8 is a loop
  over the 8 volumes; its trilinear upsampler, no post-processing) and Captum's ``LayerGradCam``
  (batched, with ``LayerAttribution.interpolate(..., "trilinear")``). All three do the same
  work: upsampled ReLU maps, no normalisation (ours with ``normalise=False``; the default
  normalisation costs two more passes over the upsampled maps).

Expensive methods (those in :data:`REDUCED`) run with fewer samples than their defaults (listed
in the ``settings`` column and printed above the table; their cost grows about linearly with
it), are timed once, and at the full grid only at batch 1. The other figures are medians over
repeats (demo grid: 3, after one warm-up round; full grid: one round, no warm-up); methods and
floor take turns within each round, so a drift of the machine hits them alike.

Run: ``.venv/bin/python benchmarks/attributions.py [--quick] [--methods a,b] [--device auto|cpu|cuda]``
(``--quick``: demo grid only, fewer repeats).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from voxplain.config import ModelConfig
from voxplain.data.grid import SPM_SHAPE, downsampled_shape
from voxplain.explain.layers import choose_cam_layer
from voxplain.explain.methods import METHODS, explainer
from voxplain.models.registry import build_model
from voxplain.models.device import resolve_device

GRIDS = {"demo": downsampled_shape(SPM_SHAPE, 4), "full": SPM_SHAPE}
#: Methods that need more than a classifier (``cyce``: trained generators, see benchmarks/cyce.py).
NEEDS_MORE = {"cyce"}
NEEDS_GAP = {"cam"}
#: Reduced settings for methods that run the network many times per map (defaults: 50 samples or
#: steps; occlusion window = stride = 8, i.e. thousands of windows at the full grid).
REDUCED = {
    "demo": {"smoothgrad": {"n_samples": 8}, "integrated_gradients": {"n_steps": 8},
             "gradient_shap": {"n_samples": 8}, "occlusion": {"window": 8, "stride": 8},
             "deeplift_shap": {}},
    "full": {"smoothgrad": {"n_samples": 8}, "integrated_gradients": {"n_steps": 8},
             "gradient_shap": {"n_samples": 8}, "occlusion": {"window": 32, "stride": 32},
             "deeplift_shap": {}},
}


def load_methods() -> list[str]:
    """Every method of :data:`~voxplain.explain.methods.METHODS` that a classifier alone can run."""
    return sorted(set(METHODS) - NEEDS_MORE)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], object], device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    call()
    synchronise(device)
    return time.perf_counter() - start


def floor_call(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> Callable[[], object]:
    """One forward + backward of the summed target logits w.r.t. the input (eval mode)."""
    def call() -> object:
        inputs = x.detach().requires_grad_(True)
        score = model(inputs).gather(1, targets[:, None]).sum()
        return torch.autograd.grad(score, inputs)
    return call


def default_cam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The layer our ``grad_cam`` reads by default for ``x``, so the peers do the same work."""
    return choose_cam_layer(model, tuple(x.shape[2:]), x.shape[1]).name


def monai_call(kind: str, model: nn.Module, x: torch.Tensor,
               targets: torch.Tensor) -> Callable[[], object]:
    from monai.visualize import GradCAM, GradCAMpp

    # MONAI leaves its hooks on the model: give it a copy
    cam = {"grad_cam": GradCAM, "grad_cam_pp": GradCAMpp}[kind](
        copy.deepcopy(model), target_layers=default_cam_layer(model, x),
        postprocessing=lambda m: m)
    return lambda: [cam(x[i:i + 1], class_idx=int(targets[i])) for i in range(len(x))]


def captum_call(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> Callable[[], object]:
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, model.get_submodule(default_cam_layer(model, x)))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return lambda: LayerAttribution.interpolate(
        cam.attribute(x, targets, relu_attributions=True).detach(), tuple(x.shape[2:]), mode)


def medians(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            once: set[str], warm_up: bool) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds taking turns, after one warm-up round
    if ``warm_up``; the calls named in ``once`` are timed in the first round only, unwarmed."""
    if warm_up:
        for name, call in calls.items():
            if name not in once:
                call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats):
        for name, call in calls.items():
            if round_ == 0 or name not in once:
                times[name].append(timed(call, device))
    return {name: statistics.median(values) for name, values in times.items()}


def paired_medians(calls: dict[str, Callable[[], object]], floors: dict[str, Callable[[], object]],
                   repeats: int, device: torch.device, once: set[str],
                   warm_up: bool) -> dict[str, tuple[float, float, float]]:
    """Per method: median seconds, median seconds of its floor, median ratio. Each method is timed
    right after its own floor (``floors[name]``) in every round, so the ratio of a round compares
    two calls a few seconds apart, whatever the other jobs on the machine do meanwhile."""
    if warm_up:
        for call in floors.values():
            call()
        for name, call in calls.items():
            if name not in once:
                call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for round_ in range(repeats):
        for name, call in calls.items():
            if round_ == 0 or name not in once:
                floor = timed(floors[name], device)
                times[name].append((timed(call, device), floor))
    return {name: (statistics.median(t for t, _ in pairs), statistics.median(f for _, f in pairs),
                   statistics.median(t / f for t, f in pairs)) for name, pairs in times.items()}


def peer_medians(peers: list[str], model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                 repeats: int, device: torch.device, grid: str) -> dict[str, float]:
    """Our ``peers`` methods, MONAI's and Captum's, timed in a block of their own, before the
    expensive methods run (their large allocations would slow whatever follows them)."""
    calls: dict[str, Callable[[], object]] = {}
    for name in peers:
        method = explainer(name, model, batch_size=len(x), normalise=False)  # the peers' work
        calls[name] = lambda method=method: method.explain(x, targets)
        calls[f"monai {name}"] = monai_call(name, model, x, targets)
        if name == "grad_cam":
            calls["captum grad_cam"] = captum_call(model, x, targets)
    return medians(calls, repeats + 2 * (grid != "full"), device, once=set(), warm_up=grid != "full")


def settings_text(options: dict[str, object]) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items()) or "defaults"


def benchmark_grid(grid: str, methods: list[str], batches: list[int], repeats: int,
                   device: torch.device) -> tuple[list[str], list[str]]:
    shape = GRIDS[grid]
    label = "x".join(map(str, shape))
    torch.manual_seed(0)
    models = {name: build_model(ModelConfig(name=name, input_shape=list(shape))).to(device).eval()
              for name in ("cnn", "vgg_gap")}
    rows, peer_rows = [], []
    for batch in batches:
        x = torch.rand(batch, 1, *shape, device=device)
        targets = torch.arange(batch, device=device) % 2  # mixed targets
        floors = {net: floor_call(model, x, targets) for net, model in models.items()}
        calls: dict[str, Callable[[], object]] = {}
        skipped = []
        for name in methods:
            options = REDUCED[grid].get(name, {})
            if grid == "full" and batch > 1 and name in REDUCED[grid]:
                skipped.append(name)
                continue
            net = "vgg_gap" if name in NEEDS_GAP else "cnn"
            method = explainer(name, models[net], batch_size=batch, **options)
            calls[name] = lambda method=method: method.explain(x, targets)
        peers = [name for name in ("grad_cam", "grad_cam_pp") if name in calls]
        peer_seconds = peer_medians(peers, models["cnn"], x, targets, repeats, device, grid)
        expensive = set(REDUCED[grid]) & set(calls)
        seconds = paired_medians(
            calls, {name: floors["vgg_gap" if name in NEEDS_GAP else "cnn"] for name in calls},
            repeats, device, once=expensive, warm_up=grid != "full")
        for name in methods:
            if name in skipped:
                rows.append(f"| {label} | {batch} | {name} | not timed (expensive; batch 1 only "
                            f"at this grid) | | | |")
                continue
            net = "vgg_gap" if name in NEEDS_GAP else "cnn"
            method_seconds, floor, ratio = seconds[name]
            settings = settings_text(REDUCED[grid].get(name, {}))
            if net != "cnn":
                settings += "; on vgg_gap (needs GAP), its own floor"
            if name in expensive:
                settings += "; timed once"
            rows.append(f"| {label} | {batch} | {name} | {settings} | {method_seconds / batch:.4f} "
                        f"| {floor / batch:.4f} | {ratio:.2f} |")
        for name in peers:
            ours, monai = peer_seconds[name], peer_seconds[f"monai {name}"]
            captum = peer_seconds.get("captum grad_cam") if name == "grad_cam" else None
            captum_text = (f"{captum / batch:.4f} | {captum / ours:.2f}" if captum is not None
                           else "n/a (no Grad-CAM++) | ")
            peer_rows.append(f"| {label} | {batch} | {name} | {ours / batch:.4f} | "
                             f"{monai / batch:.4f} | {monai / ours:.2f} | {captum_text} |")
        print("\n".join(rows[len(rows) - len(methods):] + peer_rows[len(peer_rows) - len(peers):]),
              flush=True)
    return rows, peer_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="demo grid only, fewer repeats")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: every registered method)")
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
    available = load_methods()
    methods = available if arguments.methods is None else arguments.methods.split(",")
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; available: {', '.join(available)}")
    grids = ["demo"] if arguments.quick else ["demo", "full"]
    repeats = {"demo": 2 if arguments.quick else 3, "full": 1}
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for grid in grids:
        reduced = {name: settings_text(o) for name, o in REDUCED[grid].items() if name in methods}
        print(f"# {grid}: {repeats[grid]} repeats; reduced settings: {reduced}")
    rows, peer_rows = [], []
    for grid in grids:
        grid_rows, grid_peers = benchmark_grid(grid, methods, [1, 8], repeats[grid], device)
        rows += grid_rows
        peer_rows += grid_peers
    print("| grid | batch | method | settings | s / volume | floor s / volume | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print()
    print("| grid | batch | method | ours s / volume | MONAI s / volume | MONAI / ours "
          "| Captum s / volume | Captum / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(peer_rows))


if __name__ == "__main__":
    main()
