"""Eq. 2 of paper 1 with voxel means or with sums: which reproduces the paper's l1 grid?

Paper 1 (3.1, fig. 4, table 3.A) reports that with the paper's l2 = 0.01, b1 = 0.1, b2 = 1, "when
l1 increases, the surface covered by the mask decreases until it only becomes scattered points"
at l1 = 0.1, that consecutive l1 values give masks with an ROI similarity above 0.90, and that
every mask of its grid still occludes the CNN (mean probability of AD on the validation set
below 1e-6). This script optimises group masks (:func:`voxplain.explain.masks.optimise_group_mask`,
paper settings: Adam lr 0.1, batch 1, tolerance 0.05, patience 5, at most 150 epochs) for
l1 in {0.1, 0.01, 0.001, 0.0001} on a small synthetic atrophy cohort and a small trained CNN,
with the regularisers written three ways (voxplain computes means; a sum is the mean times the
number of voxels, so the sums are run as means with l1 and l2 scaled):

- ``mean``: voxplain's eq. 2, ``l1 mean_u |1-m|^b1 + l2 mean_u ||grad m||_b2^b2``;
- ``sum``: the written sums on this grid (l1, l2 times the voxel counts of this grid);
- ``sum@SPM``: the written sums at the paper's resolution, 121x145x121, where one voxel here
  stands for ``k^3 = (121*145*121) / (this grid's voxels)`` SPM voxels: the sparsity sum grows
  with the volume (l1 scaled by the SPM voxel count), the smoothness sum at b2 = 1 with the
  surface (l2 scaled by this grid's difference count times ``k^2``: an edge crosses ``k^2`` SPM
  voxels per voxel here, a ramp spreads its step over ``k`` of them): what the paper's lambdas
  weigh against ``f`` on the paper's images.

For each mask: the fraction of voxels it hides (``m < 1`` after thresholding), its connected
components, the share of its hidden mass ``sum (1 - m)`` inside the true atrophy pattern, the
mean validation probability of AD with the mask, the best epoch, and the ROI cosine similarity
(AAL2, paper 1 2.4) with the mask of the next larger l1 (none when either mask is empty). It
writes a montage of the masks (maximum of ``1 - m`` along the axial axis over the mean AD image)
to ``OUT/mask_loss_SMOOTHNESS.png`` and prints a Markdown table.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mask_loss.py [--out FOLDER]
[--smoothness anisotropic|isotropic]`` (about 4 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from voxplain.config import (
    AtrophyCohortConfig,
    GroupMaskConfig,
    ModelConfig,
    TrainConfig,
)
from voxplain.data.atlas import Atlas
from voxplain.data.grid import SPM_SHAPE
from voxplain.data.synthetic import generate_atrophy_cohort
from voxplain.evaluate.similarity import roi_cosine_similarity
from voxplain.explain.masks import make_reference, optimise_group_mask
from voxplain.explain.perturbation import perturb, target_probability
from voxplain.steps.context import load_context
from voxplain.steps.masks import correctly_classified
from voxplain.steps.train import run_train

L1 = [0.1, 0.01, 0.001, 0.0001]
L2 = 0.01


def train(folder: Path) -> Path:
    """A 40-subject atrophy cohort at 1/6 of the SPM resolution and a small CNN on it."""
    cohort = generate_atrophy_cohort(AtrophyCohortConfig(out=folder / "cohort", subjects=40,
                                                         downsample=6))
    run = folder / "run"
    run_train(TrainConfig(cohort=cohort, run=run, n_folds=2, epochs=40, patience=10,
                          model=ModelConfig(name="cnn", channels=[8, 16], dropout=0.2)))
    return run


def optimise(model, data, scale_l1: float, scale_l2: float, l1: float, smoothness: str):
    config = GroupMaskConfig(l1=l1 * scale_l1, l2=L2 * scale_l2, smoothness=smoothness)
    start = time.perf_counter()
    result = optimise_group_mask(model, *data, make_reference(config), config,
                                 torch.device("cpu"))
    return result, time.perf_counter() - start


def describe(mask: np.ndarray, truth: np.ndarray, probability: float) -> dict:
    hidden = 1 - mask
    masked = hidden > 0
    labels, components = ndimage.label(masked)
    sizes = np.bincount(labels.ravel())[1:]
    return {"hidden": masked.mean(), "components": components,
            "largest": int(sizes.max()) if components else 0,
            "in_truth": hidden[truth].sum() / hidden.sum() if hidden.sum() else math.nan,
            "probability": probability}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/mask_loss"))
    parser.add_argument("--smoothness", default="anisotropic",
                        choices=["anisotropic", "isotropic"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        run = train(Path(tmp))
        trained = time.perf_counter() - began
        context = load_context(run, "cpu")
        fold, _, fitted = next(context.models([0]))
        classes = fitted.classes
        ad = classes.index("AD")
        split = {name: context.run.read_split(fold, name) for name in ("train", "validation")}
        rows = {name: correctly_classified(context, fitted.model, split[name], classes, "AD")
                for name in split}
        images = {name: context.images[rows[name].image_index.to_numpy()] for name in rows}
        targets = {name: np.full(len(rows[name]), ad) for name in rows}
        data = (images["train"], targets["train"], images["validation"], targets["validation"])
        truth = np.asarray(nib.load(Path(tmp) / "cohort" / "ground_truth.nii.gz").dataobj) > 0
        background = images["train"][:, 0].mean(0)
        atlas = Atlas.aal2(context.grid)
    shape = images["train"].shape[2:]
    voxels = math.prod(shape)
    differences = math.prod(s - 1 for s in shape)
    spm = math.prod(SPM_SHAPE)
    refinement = (spm / voxels) ** (1 / 3)  # SPM voxels per voxel here, along one axis
    variants = {"mean": (1.0, 1.0), "sum": (voxels, differences),
                "sum@SPM": (spm, differences * refinement**2)}
    validation = torch.from_numpy(images["validation"])
    with torch.no_grad():
        before = target_probability(fitted.model, validation,
                                    torch.from_numpy(targets["validation"])).mean().item()
    print(f"grid {'x'.join(map(str, shape))} ({voxels} voxels), fold {fold}: "
          f"{len(rows['train'])} + {len(rows['validation'])} correctly classified AD "
          f"(train + validation), validation P(AD) {before:.3f} without mask; "
          f"training took {trained:.0f} s; smoothness {args.smoothness}")
    results, masks = [], {}
    for variant, (scale_l1, scale_l2) in variants.items():
        for l1 in L1:
            result, seconds = optimise(fitted.model, data, scale_l1, scale_l2, l1,
                                               args.smoothness)
            mask = result.mask[0, 0].numpy()
            with torch.no_grad():
                masked = perturb(validation, result.mask, torch.ones(()))
                probability = target_probability(fitted.model, masked, torch.from_numpy(
                    targets["validation"])).mean().item()
            row = {"variant": variant, "l1": l1, "epoch": result.best_epoch,
                   "seconds": seconds, **describe(mask, truth, probability)}
            previous = masks.get((variant, L1[L1.index(l1) - 1])) if l1 != L1[0] else None
            if previous is not None and (previous < 1).any() and (mask < 1).any():
                row["similarity"] = roi_cosine_similarity(previous, mask, atlas)
            masks[variant, l1] = mask
            results.append(row)
            print(row, flush=True)
    print("\n| eq. 2 | l1 | hidden | components | largest | in atrophy | P(AD) val. | "
          "best epoch | ROI sim. to previous l1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        similarity = f"{row['similarity']:.2f}" if "similarity" in row else "-"
        print(f"| {row['variant']} | {row['l1']:g} | {row['hidden']:.3f} | {row['components']} | "
              f"{row['largest']} | {row['in_truth']:.2f} | {row['probability']:.1e} | "
              f"{row['epoch']} | {similarity} |")
    montage(masks, background, variants, args.out / f"mask_loss_{args.smoothness}.png")


def montage(masks: dict, background: np.ndarray, variants: dict, path: Path) -> None:
    """Rows: eq. 2 variants; columns: l1. Each panel: the maximum of ``1 - m`` along the
    axial axis (red) over the axial maximum of the mean AD image (grey)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(variants), len(L1), figsize=(2.4 * len(L1),
                                                                  2.6 * len(variants)))
    anatomy = background.max(2).T
    for i, variant in enumerate(variants):
        for j, l1 in enumerate(L1):
            ax = axes[i, j]
            hidden = (1 - masks[variant, l1]).max(2).T
            ax.imshow(anatomy, cmap="gray", origin="lower")
            ax.imshow(np.ma.masked_equal(hidden, 0), cmap="autumn_r", vmin=0, vmax=1,
                      origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"l1 = {l1:g}")
            if j == 0:
                ax.set_ylabel(variant)
    figure.suptitle("group masks: max of 1 - m along the axial axis", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
