"""Layer-wise relevance propagation with Captum's ``LRP`` and explicit per-module rules.

- ``lrp``: the epsilon rule (Bach et al. 2015) on every convolution and linear layer,
  ``R_i = sum_j x_i w_ij / (z_j + eps sign(z_j)) R_j``. Signed.
- ``deep_taylor``: the z+ rule (Montavon et al. 2017), Captum's ``Alpha1_Beta0_Rule`` with the
  biases left out (the z+ rule has no bias term), ``R_i = sum_j x_i w_ij^+ / sum_i' x_i' w_i'j^+ R_j``.
  On a ReLU network with non-negative inputs every ratio is non-negative, so the map has the sign
  of the target logit: non-negative for a positive logit. Declared unsigned (group maps take
  absolute values). On LeakyReLU networks (paper-1 CNN) the small negative activations can make
  some voxels negative.

What Captum needs and this module provides, on a deep copy of the model (the model is never
modified):

1. batch-norm folded into the preceding convolution/linear layer
   (:func:`voxplain.models.folding.fold_batch_norm`);
   Captum's rules do not fit batch-norm (Alpha1_Beta0 would clamp its scale);
2. modules that are the identity in evaluation mode (the folded-away batch-norms, dropout) removed
   from their ``nn.Sequential`` so that no rule has to pass relevance through them;
3. a rule on every remaining leaf module (Captum has no default for 3D layers): the method's rule
   on convolutions and linear layers, the epsilon rule with Captum's default stabiliser (1e-9) on
   pooling layers (max-pooling passes relevance to the winner, average pooling in proportion to
   the inputs, neither absorbs any), ``IdentityRule`` on activations Captum does not know (e.g.
   LeakyReLU: relevance passes through unchanged, as Captum does for ReLU). ReLU is left to Captum.
   A leaf module that fits none of these raises a ``ValueError`` naming it.

Captum returns the relevance scaled so that it sums to the target logit, minus what is absorbed:
by the biases and epsilon (``lrp``), or, for the z+ rule, at active neurons whose input has no
positive contribution (activated by their bias alone). The map is summed over the input channels.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import captum.attr as ca
import torch
from captum.attr._utils.lrp_rules import (
    Alpha1_Beta0_Rule,
    EpsilonRule,
    IdentityRule,
    PropagationRule,
)
from torch import nn

from voxplain.explain.api import Explainer
from voxplain.explain.gradients import channel_sum
from voxplain.models.declared_input import DeclaredInput
from voxplain.models.folding import FOLDABLE, fold_batch_norm
from voxplain.models.programs import is_program, program_refusal

WEIGHTED = FOLDABLE
POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
ELEMENTWISE = (nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Sigmoid)
CAPTUM_ACTIVATIONS = (nn.ReLU, nn.Tanh)
EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)


def _without_eval_identities(model: nn.Module) -> nn.Module:
    """Remove (in place) the modules of every ``nn.Sequential`` that are the identity in
    evaluation mode: folded batch-norms and dropout."""
    for container in model.modules():
        if isinstance(container, nn.Sequential):
            for name in [key for key, child in container._modules.items()
                         if isinstance(child, EVAL_IDENTITY)]:
                del container._modules[name]
    return model


def assign_rules(model: nn.Module, weighted_rule: Callable[[], PropagationRule],
                 epsilon_pooling: float = 1e-9) -> None:
    """Set ``module.rule`` on every leaf module of ``model`` as described in the module docstring;
    ``weighted_rule()`` makes the rule of each convolution and linear layer. Captum deletes the
    rules after each attribution, so call this before each one."""
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if isinstance(module, WEIGHTED):
            module.rule = weighted_rule()
        elif isinstance(module, POOLING):
            module.rule = EpsilonRule(epsilon_pooling)
        elif isinstance(module, ELEMENTWISE):
            module.rule = IdentityRule()
        elif type(module) in CAPTUM_ACTIVATIONS:
            continue
        else:
            raise ValueError(f"no LRP rule for module {name!r} ({type(module).__name__}) of "
                             f"{type(model).__name__}; supported: convolution, linear, pooling, "
                             "activations, batch-norm after a convolution, dropout")


class LRPExplainer(Explainer):
    """Base of the Captum LRP methods: a folded, identity-free copy of the model is built once."""

    signed = True

    def __init__(self, model: nn.Module, *, batch_size: int = 8) -> None:
        super().__init__(model, batch_size=batch_size)
        if is_program(model):
            raise ValueError(program_refusal(self.name, model, "the network's layers as nn "
                                             "modules (convolutions, linear layers, pooling, "
                                             "activations) to give each its LRP rule"))
        if isinstance(model, DeclaredInput) and model.preprocessing.normalisation != "none":
            raise ValueError(f"{self.name} has no rule for the {model.preprocessing.normalisation}"
                             " intensity normalisation the model declares (per-image statistics "
                             "inside the forward pass, no module to give a rule); use a method "
                             "that needs only gradients or forward passes")
        self.lrp_model = _without_eval_identities(fold_batch_norm(self.model))
        for parameter in self.lrp_model.parameters():
            parameter.requires_grad_(False)
        self._check_rules()

    def _check_rules(self) -> None:
        self.assign_rules()
        for module in self.lrp_model.modules():
            if hasattr(module, "rule"):
                del module.rule

    @abstractmethod
    def assign_rules(self) -> None:
        """Set ``module.rule`` on every module of ``self.lrp_model`` (the method's rules)."""

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.assign_rules()
        x = x.detach().clone().requires_grad_(True)
        return channel_sum(ca.LRP(self.lrp_model).attribute(x, target=target))


class EpsilonLRP(LRPExplainer):
    """LRP with the epsilon rule on convolutions and linear layers (``epsilon``, default 0.01, in
    the units of the pre-activations, which batch-norm brings to order 1). Signed. With
    ``epsilon -> 0`` and no biases the map sums to the target logit (conservation)."""

    name = "lrp"
    signed = True

    def __init__(self, model: nn.Module, *, epsilon: float = 0.01, batch_size: int = 8) -> None:
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.epsilon = epsilon
        super().__init__(model, batch_size=batch_size)

    def assign_rules(self) -> None:
        assign_rules(self.lrp_model, lambda: EpsilonRule(self.epsilon))


class DeepTaylor(LRPExplainer):
    """Deep Taylor decomposition with the z+ rule (``Alpha1_Beta0_Rule`` without biases) on
    convolutions and linear layers. Unsigned: non-negative for ReLU networks, non-negative inputs
    and a positive target logit."""

    name = "deep_taylor"
    signed = False

    def assign_rules(self) -> None:
        assign_rules(self.lrp_model, lambda: Alpha1_Beta0_Rule(set_bias_to_zero=True))
