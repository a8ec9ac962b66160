"""Training cost of paper 2's six networks: VGG16, VGG19, ResNet-50, each with the gap and the
fc head, in 2D at 256x256 (paper 2's slices), 3 channels (T1, T2, FLAIR), 3 classes.

For batches of 1 and 8 random images, each network is measured in a process of its own (so
that peak memory belongs to that network and batch alone):

- ``s/step``: median seconds of one forward + backward (train mode, cross-entropy on random
  labels, parameter gradients set to None before each pass) over ``repeats`` passes after one
  warm-up pass; no optimizer step. The model is laid out as the trainer lays it out
  (:func:`~voxplain.models.layout.for_batches`: channels-last on the CPU for batches of 2 or
  more);
- ``images/s``: batch / ``s/step``;
- ``peak MiB``: on the CPU, the process's peak resident memory (``getrusage`` max RSS) minus
  its resident memory after the imports, before the model is built: parameters, gradients,
  activations and allocator slack; on CUDA, ``torch.cuda.max_memory_allocated``;
- ``parameters``: at 3 channels and 3 classes (the 1000-class counts of torchvision are tested
  in ``tests/test_networks_paper2.py``).

Run: ``.venv/bin/python benchmarks/networks.py [--device auto|cpu|cuda] [--repeats N]
[--batches 1,8] [--networks vgg16-gap,resnet50-fc,...] [--threads N]``. Default repeats: 5 at
batch 1, 2 at larger batches (a VGG step at batch 8 takes about 10 s on one CPU core); about 4
minutes on one core. ``--threads`` sets torch's CPU threads (default: torch's); on a machine
shared with another torch process, use 1: two processes spinning 2 threads each on 2 cores slow
each other down several times over (ResNet-50 at batch 1: 7.8 s per step instead of 0.4 s).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from voxplain.config import ModelConfig
from voxplain.models.device import resolve_device
from voxplain.models.layout import for_batches
from voxplain.models.registry import build_model

SHAPE = (256, 256)
CHANNELS = 3
CLASSES = 3
NETWORKS = [f"{name}-{head}" for name in ("vgg16", "vgg19", "resnet50") for head in ("gap", "fc")]
SEED = 0


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def measure(network: str, batch: int, device: torch.device, repeats: int) -> dict[str, object]:
    """One row: ``network`` (``name-head``) at ``batch``, in this process."""
    name, head = network.split("-")
    baseline = max_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(name=name, head=head, input_shape=list(SHAPE),
                                    in_channels=CHANNELS, n_classes=CLASSES))
    model = for_batches(model.to(device), len(SHAPE), batch, device).train()
    x = torch.rand(batch, CHANNELS, *SHAPE, device=device)
    y = torch.randint(CLASSES, (batch,), device=device)
    seconds = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:  # the first pass is the warm-up
            seconds.append(time.perf_counter() - started)
    step = statistics.median(seconds)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else max_rss_mib() - baseline)
    return {"network": name, "head": head, "batch": batch, "repeats": repeats,
            "s/step": step, "images/s": batch / step, "peak MiB": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def in_subprocess(network: str, batch: int, device: str, repeats: int) -> dict[str, object]:
    """:func:`measure` in a fresh Python process (its own peak memory)."""
    command = [sys.executable, __file__, "--child", network, "--batches", str(batch),
               "--device", device, "--repeats", str(repeats),
               "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{network} at batch {batch} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, object]]) -> str:
    columns = ["network", "head", "batch", "s/step", "images/s", "peak MiB", "parameters"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row['s/step']:.3f}" if c == "s/step" else f"{row[c]:.2f}" if c == "images/s"
                 else f"{row[c]:.0f}" if c == "peak MiB" else f"{row[c]:,}" if c == "parameters"
                 else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed passes after the warm-up (default: 5 at batch 1, else 2)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help=f"comma-separated, from {','.join(NETWORKS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    networks = [args.child] if args.child else args.networks.split(",")
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {NETWORKS}")
    if min(batches) < 1 or any(value is not None and value < 1
                               for value in (args.repeats, args.threads)):
        parser.error("batch sizes, --repeats and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        parser.error(str(error))
    if args.child:
        repeats = args.repeats or (5 if batches[0] == 1 else 2)
        print(json.dumps(measure(args.child, batches[0], device, repeats)))
        return
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{'x'.join(map(str, SHAPE))}, {CHANNELS} channels, {CLASSES} classes")
    rows = []
    for network in networks:
        for batch in batches:
            repeats = args.repeats or (5 if batch == 1 else 2)
            rows.append(in_subprocess(network, batch, device.type, repeats))
            print(f"  {network} batch {batch}: {rows[-1]['s/step']:.3f} s/step", flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
