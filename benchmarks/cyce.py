"""CyCE acceptance figures on a run folder with trained generators (paper 3).

``python benchmarks/cyce.py localisation --run RUN [--fold K] [--methods cyce,...]``: on the fold's validation images
of a 2D lesion cohort (``voxplain generate lesions``; masks from its ``mask_path`` column), the
share of each map's relevance mass inside the lesion mask (|map| for signed maps, as
:mod:`voxplain.evaluate.localisation` scores them) for CyCE's R, Grad-CAM and integrated
gradients (targets: the classifier's predicted class), with the chance level (mask area share);
``--margins 0,1,3`` adds the shares within 1 and 3 pixels of the mask (the mask dilated by a
3x3 cross, once per pixel): edits that grow or remove spicules lie on the border, half outside.
The first row, ``ideal_counterfactual``, scores the true class-defining change |x - x'|, where x'
is the same patch rendered with its lesion in the other class (spicules and lobes removed from a
malignant lesion, drawn for a benign one; :func:`voxplain.data.lesions.counterfactual_patches`):
what a perfect counterfactual explanation would score. ``r_true_change`` is the mean correlation
of |map| with |x - x'| over the malignant images (a benign patch's counterfactual draws random
new spicules, so it has no single true change).

``python benchmarks/cyce.py background --run RUN [--fold K]``: where R's mass outside the lesions
comes from, on the same validation images: |R| inside the masks and over the background (masks
dilated by 3 px excluded), the share of the background's R energy that is a per-image offset /
smooth (Gaussian sigma 3) / fine detail, the correlation of background R with x, the classifier's
malignancy probability when only the lesion part (dilated mask) or only the background part of
Delta+ and Delta- is applied, the classifier's response to background-only edits (texture gain,
white noise, offset), and the share a map R = x (a pure global gain) would score.

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
from scipy import ndimage

from voxplain.config import CyCEConfig
from voxplain.data.lesions import counterfactual_patches
from voxplain.evaluate.localisation import chance_mass, relevance, relevance_mass_inside
from voxplain.explain.cyce.training import CyCETrainer
from voxplain.explain.methods import explainer
from voxplain.io import read_tsv
from voxplain.models.networks import ConvNet
from voxplain.models.serialization import load_model
from voxplain.run import RunFolder

METHODS = {"cyce": {}, "grad_cam": {}, "integrated_gradients": {"n_steps": 32}}


def validation_images(run_path: Path, fold: int, run_index: int):
    """Classifier, its description, the fold's validation rows, images and lesion masks."""
    run = RunFolder(run_path)
    model, description = load_model(run.model_dir(fold, run_index))
    cohort = read_tsv(run.cohort_file)
    split = read_tsv(run.split_file(fold, "validation"))
    rows = cohort.merge(split[["participant_id", "session_id"]])
    images = torch.from_numpy(np.stack([np.load(p) for p in rows.path]).astype(np.float32))
    masks = np.stack([np.load(Path(p).parent.parent / m) for p, m in zip(rows.path, rows.mask_path)])
    return run, model.eval(), description, rows, images, masks.astype(bool)


def background(run_path: Path, fold: int, run_index: int) -> dict[str, float]:
    from voxplain.explain.cyce.relevance import CyCEGenerators

    run, model, _, _, x, masks = validation_images(run_path, fold, run_index)
    generators = CyCEGenerators.load(run.cyce_dir(fold, run_index))
    near = np.stack([ndimage.binary_dilation(m, iterations=3) for m in masks])
    far = ~near
    lesion_part = torch.from_numpy(near[:, None].astype(np.float32))

    def malignancy(images: torch.Tensor) -> float:
        return float(torch.softmax(model(images), 1)[:, 1].mean())

    def share(maps: np.ndarray) -> float:
        return float(np.mean([a[m].sum() / a.sum() for a, m in zip(np.abs(maps), masks)]))

    with torch.no_grad():
        plus, minus = generators.transfer(x)
        r = (plus - minus)[:, 0].numpy().astype(np.float64)
        images = x[:, 0].numpy().astype(np.float64)
        offsets = np.array([ri[f].mean() for ri, f in zip(r, far)])
        smooth = np.stack([ndimage.gaussian_filter(ri, 3) for ri in r])
        energy = np.array([(ri[f] ** 2).mean() for ri, f in zip(r, far)])
        detail = np.stack([xi - ndimage.gaussian_filter(xi, 3) for xi in images])
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        blurred = torch.from_numpy(np.stack([ndimage.gaussian_filter(xi, 3) for xi in images])
                                   [:, None].astype(np.float32))
        out = {
            "share_inside": share(r), "share_if_R_is_x": share(images),
            "abs_R_lesion": float(np.mean([np.abs(ri[m]).mean() for ri, m in zip(r, masks)])),
            "abs_R_background": float(np.mean([np.abs(ri[f]).mean() for ri, f in zip(r, far)])),
            "background_energy_offset": float(np.mean(offsets ** 2) / energy.mean()),
            "background_energy_smooth": float(np.mean(
                [((si - o)[f] ** 2).mean() for si, o, f in zip(smooth, offsets, far)]) / energy.mean()),
            "background_energy_detail": float(np.mean(
                [((ri - si)[f] ** 2).mean() for ri, si, f in zip(r, smooth, far)]) / energy.mean()),
            "corr_background_R_x": float(np.mean([np.corrcoef(ri[f], xi[f])[0, 1]
                                                  for ri, xi, f in zip(r, images, far)])),
            "corr_background_R_detail": float(np.mean([np.corrcoef(ri[f], di[f])[0, 1]
                                                       for ri, di, f in zip(r, detail, far)])),
            "p_x": malignancy(x), "p_G+": malignancy(plus), "p_G-": malignancy(minus),
            "p_lesion_part_of_G+": malignancy(x + (plus - x) * lesion_part),
            "p_background_part_of_G+": malignancy(x + (plus - x) * (1 - lesion_part)),
            "p_lesion_part_of_G-": malignancy(x + (minus - x) * lesion_part),
            "p_background_part_of_G-": malignancy(x + (minus - x) * (1 - lesion_part)),
            "p_background_detail_x1.5": malignancy(x + 0.5 * (x - blurred) * (1 - lesion_part)),
            "p_background_detail_x0.5": malignancy(x - 0.5 * (x - blurred) * (1 - lesion_part)),
            "p_background_noise_sd0.05": malignancy(x + 0.05 * noise * (1 - lesion_part)),
            "p_background_offset+0.05": malignancy(x + 0.05 * (1 - lesion_part)),
        }
    return out


def localisation(run_path: Path, fold: int, run_index: int, margins: tuple[int, ...] = (0,),
                 methods: tuple[str, ...] = tuple(METHODS)) -> pd.DataFrame:
    run, model, description, rows, images, masks = validation_images(run_path, fold, run_index)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    # The true class-defining change of every patch: the same patch rendered in the other class.
    twins = counterfactual_patches(Path(rows.path.iloc[0]).parent.parent,
                                   list(rows.participant_id))
    ideal = images[:, 0].numpy() - twins[:, 0]
    positive = (rows.diagnosis == description["classes"][-1]).to_numpy()
    maps_of = {"ideal_counterfactual": (ideal, True, float("nan"))}
    for name in methods:
        options = METHODS[name]
        if name == "cyce":
            options = {"generators": run.cyce_dir(fold, run_index)}
        method = explainer(name, model, **options)
        started = time.perf_counter()
        maps = method.explain(images, predicted)[:, 0].cpu().numpy()
        maps_of[name] = (maps, method.signed, time.perf_counter() - started)
    table = []
    for name, (maps, signed, seconds) in maps_of.items():
        magnitude = [relevance(m, signed) for m in maps]
        # Agreement with the true change where it is determined: a positive-class patch's
        # counterfactual removes the features it has (a negative one's draws new, random ones).
        # A constant map (Grad-CAM can be all zero) has no correlation: NaN, left out.
        with np.errstate(invalid="ignore", divide="ignore"):
            agreement = np.array([np.corrcoef(m.ravel(), np.abs(i).ravel())[0, 1] if p
                                  else np.nan for m, i, p in zip(magnitude, ideal, positive)])
        for margin in margins:
            near = np.stack([ndimage.binary_dilation(m, iterations=margin) if margin else m
                             for m in masks])
            shares = np.array([relevance_mass_inside(m, mask) for m, mask in zip(magnitude, near)])
            for diagnosis in ("all", *description["classes"]):
                keep = (np.ones(len(rows), bool) if diagnosis == "all"
                        else (rows.diagnosis == diagnosis).to_numpy())
                table.append({"method": name, "margin_px": margin, "images": diagnosis,
                              "n": int(keep.sum()), "mass_inside": float(np.nanmean(shares[keep])),
                              "sd": float(np.nanstd(shares[keep], ddof=1)),
                              "chance": float(np.mean([chance_mass(m) for m in near[keep]])),
                              "r_true_change": (float(np.nanmean(agreement[keep]))
                                                if positive[keep].any() else np.nan),
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
    loc.add_argument("--margins", default="0", help="comma-separated pixel margins around the masks")
    loc.add_argument("--methods", default=",".join(METHODS),
                     help=f"comma-separated maps to score, of {', '.join(METHODS)}")
    back = sub.add_parser("background")
    back.add_argument("--run", type=Path, required=True)
    back.add_argument("--fold", type=int, default=0)
    back.add_argument("--run-index", type=int, default=0)
    step = sub.add_parser("steps")
    step.add_argument("--shape", default="64,64")
    step.add_argument("--widths", default="4,8,16,32")
    step.add_argument("--batch-size", type=int, default=4)
    step.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.command == "localisation":
        margins = tuple(int(v) for v in args.margins.split(","))
        methods = tuple(args.methods.split(","))
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown --methods {unknown}; choose from {sorted(METHODS)}")
        print(localisation(args.run, args.fold, args.run_index, margins, methods)
              .to_string(index=False))
    elif args.command == "background":
        for name, value in background(args.run, args.fold, args.run_index).items():
            print(f"{name:28s} {value:.3f}")
    else:
        shape = tuple(int(v) for v in args.shape.split(","))
        print(steps(shape, [int(v) for v in args.widths.split(",")], args.batch_size, args.repeats))


if __name__ == "__main__":
    main()
