"""Every explanation method by its command-line name, and :func:`explainer` to build one.

:data:`METHODS` is a plain dict, written out below: importing this module is all it takes to have
every method, and reading it tells which name is which class. A third-party method (a subclass of
:class:`~voxplain.explain.api.Explainer`) is added by assigning it::

    from voxplain.explain.methods import METHODS
    METHODS["my_method"] = MyExplainer

after which ``explainer("my_method", model)`` and ``voxplain explain --method my_method`` build
it. Keep the key equal to the class's ``name``.
"""

from __future__ import annotations

from torch import nn

from voxplain.explain.api import Explainer
from voxplain.explain.cam import CAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from voxplain.explain.cyce.relevance import CyCE
from voxplain.explain.gradients import (
    DeepLiftShapExplainer,
    GradientShapExplainer,
    IntegratedGradientsExplainer,
    OcclusionExplainer,
    SaliencyExplainer,
    SmoothGradExplainer,
)
from voxplain.explain.lrp import DeepTaylor, EpsilonLRP
from voxplain.explain.regions import RegionAblation, RegionShapley

__all__ = ["METHODS", "explainer", "Explainer", "CAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM",
           "LayerCAM", "SaliencyExplainer", "SmoothGradExplainer", "IntegratedGradientsExplainer",
           "OcclusionExplainer", "GradientShapExplainer", "DeepLiftShapExplainer", "EpsilonLRP",
           "DeepTaylor", "CyCE", "RegionAblation", "RegionShapley"]

METHODS: dict[str, type[Explainer]] = {
    # class activation maps (voxplain.explain.cam)
    "cam": CAM,
    "grad_cam": GradCAM,
    "grad_cam_pp": GradCAMPlusPlus,
    "hires_cam": HiResCAM,
    "layer_cam": LayerCAM,
    # gradients and perturbations, backed by Captum (voxplain.explain.gradients)
    "saliency": SaliencyExplainer,
    "smoothgrad": SmoothGradExplainer,
    "integrated_gradients": IntegratedGradientsExplainer,
    "occlusion": OcclusionExplainer,
    "gradient_shap": GradientShapExplainer,
    "deeplift_shap": DeepLiftShapExplainer,
    # regions as features, backed by Captum (voxplain.explain.regions)
    "region_ablation": RegionAblation,
    "region_shapley": RegionShapley,
    # layer-wise relevance propagation (voxplain.explain.lrp)
    "lrp": EpsilonLRP,
    "deep_taylor": DeepTaylor,
    # cycle-consistent generators (voxplain.explain.cyce)
    "cyce": CyCE,
}
"""Explanation methods by command-line name (each key is its class's ``name``)."""


def explainer(name: str, model: nn.Module, **options: object) -> Explainer:
    """Build the method called ``name`` (e.g. ``"grad_cam"``) for ``model`` with ``options``."""
    if name not in METHODS:
        raise ValueError(f"unknown explanation method {name!r}; "
                         f"available: {', '.join(sorted(METHODS))}")
    return METHODS[name](model, **options)
