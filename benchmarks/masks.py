"""Cost of meaningful-perturbation session masks (paper 1, 2.3.4), measured in one run.

For the default ``cnn`` at the demo grid (31x37x31) and the full SPM grid (121x145x121):

- seconds per iteration of :func:`optimise_session_masks` for a batch of B masks (B = 1, 4, 16;
  a call's fixed costs left out, see :func:`mask_seconds`),
  against the floor: one forward + backward pass of the same frozen model on the same batch with
  the gradient taken w.r.t. the input (what one mask iteration cannot avoid). ``ratio`` =
  iteration / floor. The masks run a faster copy of the model (batch-norm folded; channels-last
  for batches on the CPU, :mod:`voxplain.models.layout`), so ``ratio`` can fall below 1; the
  ``floor of the copy`` column is that copy's forward + backward, and ``bookkeeping`` =
  iteration / floor of the copy (1.0: eq. 2 terms, Adam, clamping and early-stopping checks are
  free).
- throughput of batched masks vs the same masks one after another (B = 8): ``speed-up`` =
  (8 x time of one mask) / (time of 8 masks as one batch).
- peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak
  resident set size so far (configurations run in increasing size, so each reading is that
  configuration's peak or an earlier, smaller one's).

Run: ``.venv/bin/python benchmarks/masks.py [--device auto|cpu|cuda] [--grids demo,full]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from voxplain.config import ModelConfig, SessionMaskConfig
from voxplain.data.grid import SPM_SHAPE, downsampled_shape
from voxplain.explain.masks import make_reference, optimise_session_masks
from voxplain.models.folding import fold_batch_norm
from voxplain.models.layout import for_batches
from voxplain.models.registry import build_model
from voxplain.models.device import resolve_device

GRIDS = {"demo": downsampled_shape(SPM_SHAPE, 4), "full": SPM_SHAPE}
ITERATIONS = {"demo": 100, "full": 3}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def floor_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Median time of one forward + backward w.r.t. the input."""
    times = []
    for _ in range(repeats):
        x = images.clone().requires_grad_(True)
        synchronise(images.device)
        start = time.perf_counter()
        torch.softmax(model(x), 1)[:, 1].sum().backward()
        synchronise(images.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask_seconds(model: torch.nn.Module, images: torch.Tensor, iterations: int) -> float:
    """Seconds per iteration of session masks for the whole batch (no early stop): the time of
    a call with ``1 + iterations`` iterations minus that of a call with 1, divided by
    ``iterations``, so that a call's fixed costs (the folded copy of the model, the final
    probabilities, thresholding) are left out."""
    return (_call_seconds(model, images, 1 + iterations) - _call_seconds(model, images, 1)) \
        / iterations


def _call_seconds(model: torch.nn.Module, images: torch.Tensor, iterations: int) -> float:
    config = SessionMaskConfig(max_iterations=iterations, patience=iterations + 1, tolerance=0,
                               batch_size=len(images))
    targets = torch.ones(len(images), dtype=torch.long, device=images.device)
    synchronise(images.device)
    start = time.perf_counter()
    optimise_session_masks(model, images, targets, make_reference(config), config)
    synchronise(images.device)
    return time.perf_counter() - start


def benchmark_grid(name: str, device: torch.device) -> list[str]:
    shape = GRIDS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=list(shape))).to(device).eval()
    model.requires_grad_(False)
    iterations = ITERATIONS[name]
    rows = []
    for batch in (1, 4, 16):
        images = torch.rand(batch, 1, *shape, device=device)
        floor_seconds(model, images, 1)  # warm-up of both code paths at this batch size
        mask_seconds(model, images, 2)
        floor = floor_seconds(model, images, max(3, iterations // 2))
        fast = for_batches(fold_batch_norm(model), len(shape), batch, device)
        floor_seconds(fast, images, 1)
        fast_floor = floor_seconds(fast, images, max(3, iterations // 2))
        ours = mask_seconds(model, images, iterations)
        rows.append(f"| {name} {'x'.join(map(str, shape))} | {batch} | {ours:.4f} | {floor:.4f} "
                    f"| {ours / floor:.2f} | {fast_floor:.4f} | {ours / fast_floor:.2f} "
                    f"| {peak_memory_mb(device):.0f} |")
    images = torch.rand(8, 1, *shape, device=device)
    mask_seconds(model, images, 2)
    one = statistics.median(mask_seconds(model, images[i:i + 1], iterations) for i in range(8))
    eight = mask_seconds(model, images, iterations)
    rows.append(f"| {name} {'x'.join(map(str, shape))} | 8 vs 8x1 | speed-up of batching: "
                f"{8 * one / eight:.2f} ({8 * one:.4f} s vs {eight:.4f} s per iteration) | | | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--grids", default="demo,full")
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("| grid | masks (B) | s / iteration | floor s (fwd+bwd) | ratio | floor of the copy s "
          "| bookkeeping | peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in arguments.grids.split(","):
        for row in benchmark_grid(name, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
