"""Per-sample explanation methods behind one interface, and the group masks of paper 1.

- :mod:`~voxplain.explain.api` -- :class:`Explainer`: built with a model and options, one verb
  ``explain(x, target)`` giving one map ``(N, 1, *spatial)`` per sample, 2D and 3D alike;
- :mod:`~voxplain.explain.methods` -- :data:`METHODS`, every method by its command-line name, and
  :func:`explainer` to build one by name (add a method with ``METHODS["name"] = Class``);
- :mod:`~voxplain.explain.cam` -- CAM, Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM, at the layer
  :mod:`~voxplain.explain.layers` chooses;
- :mod:`~voxplain.explain.gradients` -- saliency, SmoothGrad, integrated gradients, occlusion,
  GradientSHAP, DeepLiftSHAP (Captum);
- :mod:`~voxplain.explain.lrp` -- LRP (epsilon rule) and Deep Taylor (z+ rule) (Captum);
- :mod:`~voxplain.explain.cyce` -- CyCE: generators, their training, the ``cyce`` explainer;
- :mod:`~voxplain.explain.perturbation` and :mod:`~voxplain.explain.masks` -- meaningful
  perturbation masks per session and per group (paper 1); not per-sample explainers.

Example::

    from voxplain.explain import explainer
    maps = explainer("grad_cam", model).explain(x, targets)
"""

from voxplain.explain import methods as _methods
from voxplain.explain.methods import *  # noqa: F403  (the interface, the registry, the classes)

__all__ = list(_methods.__all__)
