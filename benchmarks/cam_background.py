"""Where a CAM's relevance outside the brain comes from (issue 15), on a trained run folder.

For every fold/run model of ``--run`` (3D, on an MNI grid), at the default CAM layer (or
``--layer``), over the fold's training sessions of the patient class (``--diagnosis``, default
the model's last class):

- ``act subj`` / ``act empty``: mean activation of the layer for the sessions and for an
  empty volume (all zeros, what the images hold outside the head): how much of the layer's
  activity does not depend on the input;
- ``bg cells``: cells of the layer's grid less than 10 % inside the brain mask (the mask
  averaged over each cell);
- ``Grad-CAM mass bg``: share of the mean layer-grid Grad-CAM map (each session's map divided
  by its maximum, before upsampling) in those cells;
- ``logit share bg``: share of ``sum_k dy/dA^k * A^k`` (the first-order account of the logit at
  the layer, HiResCAM's sum before its ReLU) that those cells hold: what the model's logit owes
  them;
- ``outside`` (Grad-CAM, HiResCAM): share of the mean upsampled map's relevance outside the brain,
  beside ``floor``, the brain mask itself seen at the layer's grid
  (:func:`voxplain.evaluate.localisation.brain_outside_at_layer`).

Run: ``.venv/bin/python benchmarks/cam_background.py --run demo/run`` (about 10 s after
``make demo``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from voxplain.data.template import brain_mask
from voxplain.evaluate.localisation import brain_outside_at_layer, share_outside
from voxplain.explain.cam import (GradCAM, HiResCAM, forward_with_layer, target_scores,
                                  to_input_grid)
from voxplain.explain.layers import choose_cam_layer
from voxplain.steps.context import load_context


def per_sample_max(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (maps.ndim - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--layer", default=None, help="default: the CAM layer rule's choice")
    parser.add_argument("--diagnosis", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = load_context(args.run, "cpu")
    brain = brain_mask(context.grid)
    print(f"{'fold/run':>8} {'layer':>16} {'grid':>8} {'act subj':>8} {'act empty':>9} "
          f"{'bg cells':>8} {'GC mass bg':>10} {'logit bg':>8} {'GC out':>6} {'HiRes out':>9} "
          f"{'floor':>5}")
    for fold, run, fold_model in context.models(None):
        model, classes = fold_model.model, fold_model.classes
        diagnosis = args.diagnosis or classes[-1]
        rows = context.split_rows(fold, "train")
        rows = rows[rows.diagnosis == diagnosis]
        x = torch.from_numpy(context.images_of(rows)).float()
        target = torch.full((len(x),), classes.index(diagnosis))
        name = args.layer or choose_cam_layer(model, x.shape[2:], x.shape[1]).name
        layer = dict(model.named_modules())[name]
        logits, activations = forward_with_layer(model, layer, x)
        gradients, = torch.autograd.grad(target_scores(logits, target).sum(), activations)
        _, empty = forward_with_layer(model, layer, torch.zeros_like(x[:1]))
        activations, gradients, empty = activations.detach(), gradients.detach(), empty.detach()
        spatial = tuple(activations.shape[2:])
        # the library's own layer maps (Grad-CAM's channel weights, HiResCAM's position-wise sum)
        grad_cam = per_sample_max(GradCAM(model).layer_map(activations, gradients, activations))
        hires = per_sample_max(HiResCAM(model).layer_map(activations, gradients, activations))
        contributions = (gradients * activations).sum(1, keepdim=True)  # HiResCAM before ReLU
        inside = torch.from_numpy(brain.astype(np.float32))[None, None]
        pool = F.adaptive_avg_pool3d if len(spatial) == 3 else F.adaptive_avg_pool2d
        background = (pool(inside, spatial) < 0.1)[0, 0]
        group = grad_cam.mean(0)[0]
        logit_share = contributions[:, 0][:, background].sum(1) / contributions.flatten(1).sum(1)
        outside = [share_outside(to_input_grid(per_sample_max(maps), brain.shape, True).mean(0)[0]
                                 .numpy(), brain) for maps in (grad_cam, hires)]
        print(f"{fold}/{run:<6} {name:>16} {'x'.join(map(str, spatial)):>8} "
              f"{float(activations.mean()):8.3f} {float(empty.mean()):9.3f} "
              f"{int(background.sum()):>3}/{background.numel():<4} "
              f"{float(group[background].sum() / group.sum()):10.2f} "
              f"{float(logit_share.mean()):8.2f} {outside[0]:6.2f} {outside[1]:9.2f} "
              f"{brain_outside_at_layer(brain, spatial):5.2f}")


if __name__ == "__main__":
    main()
