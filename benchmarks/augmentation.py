"""Cost of each library augmentation per training batch, against the network's forward+backward.

For a batch of 8 images (the default ``TrainConfig.batch_size``) at two grids:

- ``2d``: 256x256 slices with 3 channels (paper 2: T1, T2 and FLAIR of one axial slice);
- ``3d``: 41x49x41 volumes with 1 channel (the SPM grid downsampled by 3),

this times :func:`voxplain.train.augment.augment` of each kind that runs a library transform
(``affine``: MONAI; ``bias_field``, ``motion``, ``ghosting``, ``spike``: TorchIO), and ``flip``
for reference, against the floor: one forward + backward of the default ``cnn``
(``ModelConfig()`` with the grid's channels and shape, train mode, channels-last on the CPU as
the trainer runs it) on the same batch. Augmentation runs on the CPU before the batch moves to
the device, so on a GPU the ratio grows by the speed-up of the network alone.

Each figure is the median over repeats after one warm-up round; the kinds and the floor take
turns within each round. Torch and SimpleITK (TorchIO's resampling, used by ``motion``) run on
``--threads`` threads (default 1: the machine it was written on is shared).

Run: ``.venv/bin/python benchmarks/augmentation.py [--repeats N] [--threads N] [--grids 2d,3d]``.
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
from voxplain.models.layout import for_batches
from voxplain.models.registry import build_model
from voxplain.train.augment import augment

#: grid name -> (channels, spatial shape)
GRIDS: dict[str, tuple[int, tuple[int, ...]]] = {"2d": (3, (256, 256)), "3d": (1, (41, 49, 41))}
KINDS = ("flip", "affine", "bias_field", "motion", "ghosting", "spike")
SEED = 0


def median_seconds(works: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each ``work()`` over ``repeats`` rounds after one warm-up round, the
    works taking turns within each round (a drift of the machine hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for round_index in range(repeats + 1):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            if round_index:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_grid(name: str, repeats: int) -> list[dict[str, object]]:
    """One row per kind: seconds per batch and the ratio to the forward+backward floor."""
    channels, shape = GRIDS[name]
    batch_size = TrainConfig.model_fields["batch_size"].default
    torch.manual_seed(SEED)
    images = torch.rand(batch_size, channels, *shape)
    labels = torch.arange(batch_size) % 2
    model = for_batches(build_model(ModelConfig(in_channels=channels, input_shape=list(shape))),
                        len(shape), batch_size, torch.device("cpu"))
    model.train()

    def floor() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()

    rng = np.random.default_rng(SEED)
    works: dict[str, Callable[[], object]] = {"floor": floor}
    works.update({kind: (lambda kind=kind: augment(images, kind, rng)) for kind in KINDS})
    seconds = median_seconds(works, repeats)
    grid = f"{'x'.join(map(str, shape))}x{channels}ch"
    return [{"grid": grid, "kind": kind, "s/batch": seconds[kind],
             "ms/image": 1000 * seconds[kind] / batch_size,
             "ratio to floor": seconds[kind] / seconds["floor"]} for kind in ("floor", *KINDS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    parser.add_argument("--grids", default="2d,3d", help="comma-separated: 2d, 3d")
    args = parser.parse_args()
    grids = args.grids.split(",")
    unknown = sorted(set(grids) - set(GRIDS))
    if unknown:
        parser.error(f"unknown grid(s) {unknown}; choose from {sorted(GRIDS)}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    import monai
    import SimpleITK
    import torchio

    torch.set_num_threads(args.threads)
    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    print(f"torch {torch.__version__}, monai {monai.__version__}, torchio {torchio.__version__}, "
          f"{args.threads} thread(s), batch {TrainConfig.model_fields['batch_size'].default}")
    table = pd.DataFrame([row for name in grids for row in measure_grid(name, args.repeats)])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
