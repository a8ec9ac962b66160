"""Training and inference throughput of the default ``cnn`` against a bare forward+backward floor.

For the default model (``ModelConfig()``: paper-1 CNN, 1 channel, 2 classes) and the default
training batch size of ``TrainConfig``, on random float32 volumes held in memory as a numpy array
(as the trainer holds its cohort), at the demo grid (SPM grid downsampled by 4, 31x37x31) and the
full SPM grid (121x145x121), this measures:

- train vol/s: voxplain's real training step, :func:`voxplain.train.trainer._train_epoch` over a
  :class:`~voxplain.train.trainer.Dataset` of a few batches (numpy->torch batching, forward,
  loss, backward, Adam step, running metrics);
- inference vol/s: :func:`voxplain.train.trainer.predict_proba` over the same Dataset;
- floor s/batch: a bare forward + backward of the same model (train mode) on the same batches,
  already torch tensors on the device: no optimizer step, no data handling;
- step s/batch and ratio = step s/batch / floor s/batch.

Every figure is a median over repeats after one warm-up round; step, inference and floor take
turns within each round. A ratio near 1 means the training step costs what the network's own
forward and backward cost, so only a cheaper network, a smaller grid or more hardware can make
training faster; a ratio well above 1 means time goes to overhead around the network (batching
copies, optimizer, synchronisation) that is worth hunting down.

Run: ``.venv/bin/python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--repeats N]
[--grids demo,full]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from voxplain.config import ModelConfig, TrainConfig
from voxplain.data.grid import SPM_SHAPE, downsampled_shape
from voxplain.models.registry import build_model
from voxplain.train.trainer import Dataset, _train_epoch, predict_proba
from voxplain.models.device import resolve_device

#: grid name -> (spatial shape, batches in the Dataset, default repeats)
GRIDS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "demo": (downsampled_shape(SPM_SHAPE, 4), 8, 5),
    "full": (SPM_SHAPE, 2, 2),
}
SEED = 0


def random_dataset(shape: tuple[int, ...], n_images: int, rng: np.random.Generator) -> Dataset:
    """``n_images`` random volumes ``(n_images, 1, *shape)`` float32 with balanced labels."""
    images = rng.random((n_images, 1, *shape), dtype=np.float32)
    table = pd.DataFrame({"image_index": np.arange(n_images)})
    labels = (np.arange(n_images) % 2).astype(np.int64)
    return Dataset(table, images, labels)


def median_seconds(works: dict[str, Callable[[], object]], repeats: int,
                   device: torch.device) -> dict[str, float]:
    """Median wall time of each ``work()`` over ``repeats`` rounds, after one warm-up round.

    The works take turns within each round, so a drift of the machine (clock, other load) hits
    them alike instead of biasing the ratio.
    """
    times: dict[str, list[float]] = {name: [] for name in works}
    for round_index in range(repeats + 1):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def floor_pass(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Bare forward + backward (train mode) on each ``(x (B, C, *spatial), y (B,))`` batch."""
    model.train()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()


def measure_grid(name: str, device: torch.device, repeats: int | None) -> dict[str, object]:
    """One row of the table: throughputs, floor and ratio at grid ``name``."""
    shape, n_batches, default_repeats = GRIDS[name]
    repeats = repeats or default_repeats
    defaults = TrainConfig.model_fields
    batch_size = defaults["batch_size"].default
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    data = random_dataset(shape, n_batches * batch_size, rng)
    order = rng.permutation(len(data.table))
    model = build_model(ModelConfig(input_shape=list(shape))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults["learning_rate"].default,
                                 weight_decay=defaults["weight_decay"].default)
    tensors = [(x.to(device), y.to(device)) for x, y in data.batches(batch_size, order)]
    seconds = median_seconds({
        "step": lambda: _train_epoch(model, optimizer, data, order, batch_size, device),
        "inference": lambda: predict_proba(model, data, batch_size, device),
        "floor": lambda: floor_pass(model, tensors),
    }, repeats, device)
    step, inference, floor = (seconds[k] / n_batches for k in ("step", "inference", "floor"))
    return {"grid": "x".join(map(str, shape)), "batch": batch_size, "batches": n_batches,
            "repeats": repeats, "train vol/s": batch_size / step,
            "inference vol/s": batch_size / inference, "floor s/batch": floor,
            "step s/batch": step, "ratio": step / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measure (default: 5 at demo, 2 at full)")
    parser.add_argument("--grids", default="demo,full", help="comma-separated: demo, full")
    args = parser.parse_args()
    grids = args.grids.split(",")
    unknown = sorted(set(grids) - set(GRIDS))
    if unknown:
        parser.error(f"unknown grid(s) {unknown}; choose from {sorted(GRIDS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        parser.error(str(error))
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    rows = []
    for name in grids:
        rows.append(measure_grid(name, device, args.repeats))
        print(f"  {name} grid done")
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
