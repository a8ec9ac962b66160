"""Sanity check of explanation methods: cascading model-parameter randomisation (Adebayo et al.,
"Sanity checks for saliency maps", NeurIPS 2018, section 3.1; cited by paper 1).

The layers of a copy of the model are re-initialised one after the other from the top (the
classifier) down, cumulatively; after each one the maps of the same inputs and targets are
computed again and compared with the maps of the trained model by Spearman's rank correlation,
per sample, then averaged over samples. A method whose maps depend on what the model learned
must give maps that stop resembling the original ones; a method whose maps barely change is
explaining the input (e.g. its edges), not the model, and fails the check.

Layers are the modules with a weight matrix or kernel (convolutions, linear layers); they are
re-initialised with their own ``reset_parameters`` (PyTorch's default initialisation, as Adebayo
et al. re-initialise from the initialisation distribution), seeded with ``seed + k`` for the
k-th layer. Batch-norm statistics and parameters are kept.

Correlations are computed on absolute values (``spearman_abs``, Adebayo et al.'s main measure,
since the sign of many methods is arbitrary), and for signed methods also on the signed maps
(``spearman_signed``). A constant map has no ranking: its correlation with a non-constant map is
reported as 0, and as 1 with a constant map.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.evaluate.similarity import rank_correlation
from voxplain.explain.methods import explainer
from voxplain.explain.gradients import seeded

RANDOMISATION_THRESHOLD = 0.5
"""A method passes when the mean Spearman correlation of its absolute maps with the trained
model's maps is below this once every layer is randomised. Adebayo et al. judge visually and by
the drop of the curves; 0.5 means that at most a quarter of the rank variance (rho^2) is shared."""


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules with a weight matrix or kernel, from the top (output) down, in the
    reverse order of their definition."""
    names = [name for name, module in model.named_modules()
             if not list(module.children()) and hasattr(module, "reset_parameters")
             and isinstance(getattr(module, "weight", None), torch.Tensor)
             and module.weight.ndim >= 2]
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer with weights to randomise")
    return names[::-1]


def _build(method: str | type[Explainer], model: nn.Module, options: dict[str, object]) -> Explainer:
    if isinstance(method, str):
        return explainer(method, model, **options)
    if isinstance(method, type) and issubclass(method, Explainer):
        return method(model, **options)
    raise ValueError(f"method must be a method name or an Explainer subclass, got {method!r}")


def model_randomisation_test(model: nn.Module, method: str | type[Explainer], x: torch.Tensor,
                             target: torch.Tensor | Sequence[int] | int, *, seed: int = 0,
                             **options: object) -> pd.DataFrame:
    """Cascading randomisation of ``model`` (not modified: the work is done on copies) for
    ``method`` (a name such as ``"grad_cam"`` or an :class:`Explainer` subclass, built with
    ``options``) on inputs ``x`` ``(N, C, *spatial)`` and one ``target`` class per sample.

    Returns one row per randomised layer, top down: ``layer`` (its name), ``randomised`` (how many
    layers are randomised so far), ``spearman_abs`` and ``spearman_signed`` (mean over samples of
    the rank correlation with the trained model's maps; ``spearman_signed`` is NaN for unsigned
    methods), ``spearman_abs_min`` (the lowest sample's value).
    """
    trained = copy.deepcopy(model)
    reference = _build(method, trained, options)
    original = reference.explain(x, target).cpu().numpy()
    signed = reference.signed
    device = next(trained.parameters()).device
    randomised = copy.deepcopy(trained)
    modules = dict(randomised.named_modules())
    rows = []
    for k, name in enumerate(randomisable_layers(randomised)):
        with seeded(seed + k, device), torch.no_grad():
            modules[name].reset_parameters()
        maps = _build(method, randomised, options).explain(x, target).cpu().numpy()
        absolute = [rank_correlation(np.abs(o), np.abs(m)) for o, m in zip(original, maps)]
        signed_rho = ([rank_correlation(o, m) for o, m in zip(original, maps)] if signed
                      else [np.nan])
        rows.append({"layer": name, "randomised": k + 1, "spearman_abs": float(np.mean(absolute)),
                     "spearman_signed": float(np.mean(signed_rho)),
                     "spearman_abs_min": float(np.min(absolute))})
    return pd.DataFrame(rows)


def passes_model_randomisation(table: pd.DataFrame,
                               threshold: float = RANDOMISATION_THRESHOLD) -> bool:
    """Verdict on a :func:`model_randomisation_test` table: True when the absolute maps of the
    fully randomised model have a mean rank correlation with the trained model's maps below
    ``threshold`` (:data:`RANDOMISATION_THRESHOLD`)."""
    if table.empty:
        raise ValueError("the randomisation table is empty")
    return bool(table["spearman_abs"].iloc[-1] < threshold)
