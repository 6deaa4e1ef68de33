"""Masked autoregressive affine transforms (MAF, and IAF as its inverse) with nflows' conventions."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import InverseTransform, Transform, check_context, check_features, check_finite
from . import made_plan
from .made import MADE


def affine_scale(unconstrained: Tensor, epsilon: float) -> Tensor:
    """nflows' scale: softplus(unconstrained) + epsilon, always positive."""
    return F.softplus(unconstrained) + epsilon


class MaskedAffineAutoregressiveTransform(Transform):
    """Drop-in for `nflows.transforms.MaskedAffineAutoregressiveTransform` (MAF layer): forward is the density
    direction, y = scale(x_<i) * x + shift(x_<i), log|det| = sum log scale, one network pass: a fused C++ op
    (the whole MADE, the affine map and the log-det, and a fused backward) for float32/float64 CPU inputs.

    inverse (sampling) computes each hidden unit of the MADE once, in order of degree: about one network pass
    of arithmetic instead of nflows' D passes; a fused C++ op when nothing needs gradients, torch ops otherwise.
    (With batch norm or dropout in training mode both directions take torch ops, and the inverse nflows' D-pass
    loop, whose semantics those layers define.) For an IAF, where sampling is the cheap
    direction, wrap it: `InverseTransform(MaskedAffineAutoregressiveTransform(...))`, or use `IAF`.

    The MADE's parameter names and output layout are nflows': an nflows transform's state_dict loads as is
    (see `from_nflows`).
    """

    def __init__(self, features: int, hidden_features: int, context_features: int | None = None,
                 num_blocks: int = 2, use_residual_blocks: bool = True, random_mask: bool = False,
                 activation: Callable = F.relu, dropout_probability: float = 0.0, use_batch_norm: bool = False):
        super().__init__()
        self.features = features
        self.context_features = context_features
        self.autoregressive_net = MADE(features=features, hidden_features=hidden_features,
                                       context_features=context_features, num_blocks=num_blocks,
                                       output_multiplier=2, use_residual_blocks=use_residual_blocks,
                                       random_mask=random_mask, activation=activation,
                                       dropout_probability=dropout_probability, use_batch_norm=use_batch_norm)
        self._epsilon = 1e-3

    def _scale_and_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        params = params.view(params.shape[0], self.features, 2)
        return affine_scale(params[..., 0], self._epsilon), params[..., 1]

    def _check(self, inputs: Tensor, context: Tensor | None, finite: bool = True) -> None:
        check_features(inputs, self.features, finite=finite)
        check_context(context, self.context_features, inputs.shape[0])

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(inputs, context, finite=False)
        fused = made_plan.made_forward(self.autoregressive_net, inputs, context, self._epsilon)
        if fused is not None:  # the network, affine map and log-det in one C++ pass (and a fused backward)
            return fused  # the op raised ValueError for NaN or inf inputs
        check_finite(inputs)
        return self._forward_composed(inputs, context)

    def _forward_composed(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(self.autoregressive_net(inputs, context))
        return scale * inputs + shift, torch.log(scale).sum(dim=1)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(inputs, context)
        if not self.autoregressive_net.supports_one_pass_inverse():
            return self._inverse_by_passes(inputs, context)
        if not self._needs_grad(inputs, context):  # the fused op (no backward): one pass, in C++
            fused = made_plan.made_inverse(self.autoregressive_net, inputs, context, self._epsilon)
            if fused is not None:
                return fused
        eps = self._epsilon
        log_scales = []

        def solve(feature, params, targets):
            scale = affine_scale(params[..., 0], eps)
            log_scales.append(torch.log(scale))
            return (targets - params[..., 1]) / scale

        outputs = self.autoregressive_net.invert(inputs, context, solve)
        return outputs, -torch.cat(log_scales, dim=1).sum(dim=1)

    def _needs_grad(self, inputs: Tensor, context: Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [inputs, *self.parameters()] + ([context] if context is not None else [])
        return any(t.requires_grad for t in tensors)

    def _inverse_by_passes(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        outputs = torch.zeros_like(inputs)
        logabsdet = inputs.new_zeros(inputs.shape[0])
        for _ in range(self.features):
            scale, shift = self._scale_and_shift(self.autoregressive_net(outputs, context))
            outputs = (inputs - shift) / scale
            logabsdet = -torch.log(scale).sum(dim=1)
        return outputs, logabsdet


class IAF(InverseTransform):
    """Inverse autoregressive flow layer: sampling (inverse) is one network pass, density of external data
    (forward) uses the one-pass inversion. Same constructor as MaskedAffineAutoregressiveTransform."""

    def __init__(self, *args, **kwargs):
        super().__init__(MaskedAffineAutoregressiveTransform(*args, **kwargs))


def from_nflows(module) -> Transform:
    """Builds our equivalent of an nflows MaskedAffineAutoregressiveTransform (or a CompositeTransform /
    permutation / InverseTransform of them) with the same weights and buffers."""
    from . import convert_nflows
    return convert_nflows.convert(module)
