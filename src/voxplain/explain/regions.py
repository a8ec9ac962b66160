"""Region-level attributions: one value per brain region, tractable in 3D where voxel occlusion
is not (issue 22; Captum's ``FeatureAblation`` and ``ShapleyValueSampling`` with a feature mask).

The regions are a label map on the image grid, ``(*spatial)`` integers, every label one feature
(label 0, outside the atlas, included): ``voxplain explain`` passes the AAL2 atlas on the run's
grid (:class:`voxplain.data.atlas.Atlas`) for 3D images on an MNI grid; without one, the image is
cut into cubes of ``block`` voxels per axis (2D too). Every voxel of a region gets the region's
value, so the maps are scored, compared and tested like any other method's (a group map is the
mean of the session maps), and the region ranking is read off any voxel.

- ``region_ablation``: a region's value is the drop of the target logit when the region (all
  channels) is replaced by ``baseline``: ``f(x) - f(x with region r at the baseline)``;
- ``region_shapley``: Shapley values of the regions (Castro et al. 2009, Captum's
  ``ShapleyValueSampling``): the mean over ``n_samples`` random orders of the regions of the
  logit's change when the region is added to those before it, from the all-baseline image. Every
  order's changes sum to ``f(x) - f(baseline)``, so the values do too (efficiency).

Both are signed (a region can raise the logit when hidden). Cost: one forward pass per region
(ablation; 121 for AAL2 with its background) or per region and order (Shapley), batched by
``perturbations_per_eval``.
"""

from __future__ import annotations

import captum.attr as ca
import torch
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.explain.gradients import _baseline, _positive, channel_sum, seeded

__all__ = ["RegionAblation", "RegionShapley", "block_regions", "region_values"]


def block_regions(shape: tuple[int, ...], block: int) -> torch.Tensor:
    """Labels of cubes (squares in 2D) of ``block`` voxels per axis tiling ``shape``, 0, 1, ...
    in C order (the last axis fastest)."""
    _positive("block", block)
    cells = torch.meshgrid(*[torch.arange(n) // block for n in shape], indexing="ij")
    labels = torch.zeros(shape, dtype=torch.long)
    for cell, n in zip(cells, shape):
        labels = labels * ((n + block - 1) // block) + cell
    return labels


def region_values(maps: torch.Tensor, regions: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{label: (N,) values}`` of region maps ``(N, 1, *spatial)`` (each region's constant)."""
    flat = maps.flatten(1)
    labels = regions.flatten()
    return {int(label): flat[:, int(torch.nonzero(labels == label)[0])]
            for label in torch.unique(labels)}


class _RegionExplainer(Explainer):
    """A Captum perturbation method over a label map of regions."""

    signed = True

    def __init__(self, model: nn.Module, *, regions: torch.Tensor | None = None, block: int = 4,
                 baseline: float | torch.Tensor = 0.0, perturbations_per_eval: int = 16,
                 batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        _positive("block", block)
        _positive("perturbations_per_eval", perturbations_per_eval)
        self.regions, self.block, self.baseline = regions, block, baseline
        self.perturbations_per_eval = perturbations_per_eval

    def feature_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The regions as Captum's feature mask ``(1, C, *spatial)``, labels 0..R-1."""
        spatial = tuple(x.shape[2:])
        regions = (block_regions(spatial, self.block) if self.regions is None
                   else torch.as_tensor(self.regions))
        if tuple(regions.shape) != spatial:
            raise ValueError(f"{self.name}: regions of shape {tuple(regions.shape)} for images "
                             f"of spatial shape {spatial}")
        _, dense = torch.unique(regions.to(torch.long), return_inverse=True)  # 0..R-1
        return dense.to(x.device).expand(1, x.shape[1], *spatial).contiguous()


class RegionAblation(_RegionExplainer):
    """Feature ablation of regions: each region's value is the drop of the target logit when the
    region is set to ``baseline`` (Captum ``FeatureAblation``). Options: ``regions`` (a label
    map; ``voxplain explain`` gives AAL2 on an MNI grid), ``block`` (cube size without one,
    default 4), ``baseline`` (default 0), ``perturbations_per_eval`` (default 16)."""

    name = "region_ablation"

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        attributions = ca.FeatureAblation(self.model).attribute(
            x, baselines=_baseline(self.baseline, x), target=target,
            feature_mask=self.feature_mask(x), perturbations_per_eval=self.perturbations_per_eval)
        return channel_sum(attributions) / x.shape[1]  # the same value on every channel


class RegionShapley(_RegionExplainer):
    """Shapley value sampling over regions (Captum ``ShapleyValueSampling``): the mean over
    ``n_samples`` random orders (default 25, seeded by ``seed``) of each region's marginal
    contribution to the target logit; the values sum to ``f(x) - f(baseline)``. Options as
    :class:`RegionAblation`, plus ``n_samples`` and ``seed``."""

    name = "region_shapley"

    def __init__(self, model: nn.Module, *, n_samples: int = 25, seed: int = 0,
                 **options: object) -> None:
        super().__init__(model, **options)
        _positive("n_samples", n_samples)
        self.n_samples, self.seed = n_samples, seed

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shapley = ca.ShapleyValueSampling(self.model)
        mask = self.feature_mask(x)
        maps = []
        for sample, label in zip(x, target):  # one seeded draw of orders per sample
            with seeded(self.seed, x.device):
                maps.append(shapley.attribute(
                    sample[None], baselines=_baseline(self.baseline, sample[None]),
                    target=int(label), feature_mask=mask, n_samples=self.n_samples,
                    perturbations_per_eval=self.perturbations_per_eval))
        return channel_sum(torch.cat(maps)) / x.shape[1]
