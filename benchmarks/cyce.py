"""CyCE acceptance figures on a run folder with trained generators (paper 3).

``python benchmarks/cyce.py localisation --run RUN [--fold K]``: on the fold's validation images
of a 2D lesion cohort (``voxplain generate lesions``; masks from its ``mask_path`` column), the
share of each map's relevance mass inside the lesion mask (|map| for signed maps, as
:mod:`voxplain.evaluate.localisation` scores them) for CyCE's R, Grad-CAM and integrated
gradients (targets: the classifier's predicted class), with the chance level (mask area share).

``python benchmarks/cyce.py steps --shape 64,64 [--widths 4,8,16,32] [--batch-size 4]``: seconds
per training step (discriminators + generators) of a CyCE trainer against a paper-3 ConvNet on
random images, and the floor: one forward+backward of one generator on the same batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from voxplain.config import CyCEConfig
from voxplain.evaluate.localisation import chance_mass, relevance, relevance_mass_inside
from voxplain.explain.api import explainer
from voxplain.explain.cyce.steps import cyce_dir
from voxplain.explain.cyce.training import CyCETrainer
from voxplain.io import read_tsv
from voxplain.models.networks import ConvNet
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder

METHODS = {"cyce": {}, "grad_cam": {}, "integrated_gradients": {"n_steps": 32}}


def localisation(run_path: Path, fold: int, run_index: int) -> pd.DataFrame:
    import voxplain.explain.cyce  # noqa: F401  (registers "cyce")

    run = RunFolder(run_path)
    model, description = load_model(run.model_dir(fold, run_index))
    cohort = read_tsv(run.cohort_file)
    split = read_tsv(run.split_file(fold, "validation"))
    rows = cohort.merge(split[["participant_id", "session_id"]])
    images = torch.from_numpy(np.stack([np.load(p) for p in rows.path]).astype(np.float32))
    masks = np.stack([np.load(Path(p).parent.parent / m) for p, m in zip(rows.path, rows.mask_path)])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    table = []
    for name, options in METHODS.items():
        if name == "cyce":
            options = {"generators": cyce_dir(run, fold, run_index)}
        method = explainer(name, model, **options)
        started = time.perf_counter()
        maps = method.explain(images, predicted)[:, 0].cpu().numpy()
        seconds = time.perf_counter() - started
        shares = np.array([relevance_mass_inside(relevance(m, method.signed), mask)
                           for m, mask in zip(maps, masks)])
        for diagnosis in ("all", *description["classes"]):
            keep = np.ones(len(rows), bool) if diagnosis == "all" else (rows.diagnosis == diagnosis).to_numpy()
            table.append({"method": name, "images": diagnosis, "n": int(keep.sum()),
                          "mass_inside": float(np.nanmean(shares[keep])),
                          "sd": float(np.nanstd(shares[keep], ddof=1)),
                          "chance": float(np.mean([chance_mass(m) for m in masks[keep]])),
                          "seconds": seconds})
    return pd.DataFrame(table)


def steps(shape: tuple[int, ...], widths: list[int], batch_size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    classifier = ConvNet(shape)
    images = torch.rand(max(2 * batch_size, 4), 1, *shape)
    trainer = CyCETrainer(classifier, images, CyCEConfig(widths=widths, batch_size=batch_size))
    trainer.train_step(0)
    seconds = [trainer.train_step(step)["seconds"] for step in range(1, repeats + 1)]
    generator, x = trainer.networks["g_plus"], images[:batch_size]
    started = time.perf_counter()
    for _ in range(repeats):
        generator(x).sum().backward()
    floor = (time.perf_counter() - started) / repeats
    return {"shape": "x".join(map(str, shape)), "widths": ",".join(map(str, widths)),
            "batch_size": batch_size, "seconds_per_step": float(np.mean(seconds)),
            "generator_forward_backward": floor, "ratio": float(np.mean(seconds)) / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    loc = sub.add_parser("localisation")
    loc.add_argument("--run", type=Path, required=True)
    loc.add_argument("--fold", type=int, default=0)
    loc.add_argument("--run-index", type=int, default=0)
    step = sub.add_parser("steps")
    step.add_argument("--shape", default="64,64")
    step.add_argument("--widths", default="4,8,16,32")
    step.add_argument("--batch-size", type=int, default=4)
    step.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.command == "localisation":
        print(localisation(args.run, args.fold, args.run_index).to_string(index=False))
    else:
        shape = tuple(int(v) for v in args.shape.split(","))
        print(steps(shape, [int(v) for v in args.widths.split(",")], args.batch_size, args.repeats))


if __name__ == "__main__":
    main()
