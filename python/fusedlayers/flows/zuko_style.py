"""A masked autoregressive flow with zuko's constructor and call convention, built on our MAF layers.

`MAF(features, context)` is a module; `MAF(...)(c)` returns a distribution over x given the context c, with
`log_prob`, `sample`, `rsample` and `rsample_and_log_prob`, the usage of `zuko.flows.MAF` (zuko 1.6). Inside, it
is an nflows-style stack: `MaskedAffineAutoregressiveTransform` layers between feature permutations, in a
`CompositeTransform`, so sampling runs our one-pass inverse.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Size, Tensor, nn
from torch.distributions import Distribution, constraints

from .autoregressive import MaskedAffineAutoregressiveTransform
from .base import CompositeTransform
from .permutations import Permutation, ReversePermutation


def _activation_factory(activation) -> Callable[[], Callable[[Tensor], Tensor]]:
    """zuko passes a module class (`nn.ReLU`), nflows a function (`F.relu`): accept either. A class gets one
    instance per layer."""
    if activation is None:
        return lambda: F.relu
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation
    if callable(activation):
        return lambda: activation
    raise ValueError(f"activation must be a module class such as nn.ReLU or a function, got {activation!r}")


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _layers_for_orders(orders: list[Tensor], make_layer: Callable[[], nn.Module]) -> list[nn.Module]:
    """Our MADE is autoregressive in the natural order. A layer with order o (feature i comes o[i]-th) runs on
    the features rearranged by rank; between two layers one permutation moves from one rank space to the next,
    and a last one puts the features back where they were (so z[..., i] belongs to x[..., i], as in zuko).
    Identity permutations are left out."""
    layers: list[nn.Module] = []
    current = None  # the order whose rank space the features are in; None: the original positions
    for order in orders + [None]:
        if order is None:
            move = current if current is not None else None
        else:
            by_rank = torch.argsort(order)
            move = by_rank if current is None else current[by_rank]
        if move is not None and not torch.equal(move, torch.arange(len(move))):
            reverse = torch.equal(move, torch.arange(len(move) - 1, -1, -1))
            layers.append(ReversePermutation(len(move)) if reverse else Permutation(move.clone()))
        if order is not None:
            layers.append(make_layer())
        current = order
    return layers


class MAF(nn.Module):
    """Masked autoregressive flow with zuko's interface: `flow = MAF(features, context)`, then `flow(c)` is a
    distribution p(x | c) (`flow()` when context=0).

    Arguments (zuko's names and defaults):
        features: the number of features D of x (1 is allowed).
        context: the number of context features C; 0 means unconditional, and then no context may be given.
        transforms: the number of autoregressive layers.
        randperm: each layer gets a random feature order if True; otherwise ascending for even layers and
            descending for odd ones.
        hidden_features: widths of the hidden layers of each MADE. They must all be equal (nflows' MADE has
            one width).
        activation: a module class such as `nn.ReLU` (zuko's form) or a function such as `F.relu`.
        residual: residual MADE blocks (nflows' residual blocks, one per hidden width), as zuko's option.
        passes: only None (or `features`): each layer is fully autoregressive.

    What differs from `zuko.flows.MAF`:
        - Each layer is nflows' affine transform, z = scale * x + shift with scale = softplus(a) + 1e-3;
          zuko's is z = exp(a / (1 + |a / log 1e-3|)) * x + b. The conditioner is nflows' MADE (hidden units
          with cycling degrees, context added after the first layer) instead of zuko's MaskedMLP, and the
          base is a standard normal without zuko's DiagNormal buffers. So weights are not interchangeable.
        - Sampling inverts each layer in one network pass (zuko: D passes).
        - features=1 uses the same MADE (its outputs see only biases and the context), where zuko switches
          to an element-wise transform.
        - Unequal hidden widths, `univariate`, `shapes`, `order`, `adjacency` and passes < features are not
          supported. log_prob raises ValueError on NaN/inf inputs, where zuko returns NaN.

    `flow.transform` is the nflows-style `CompositeTransform` from x to z: `transform(x2d, c2d)` returns
    (z, log|det dz/dx|), and its `inverse` samples.
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3, randperm: bool = False,
                 hidden_features: Sequence[int] = (64, 64), activation=None, residual: bool = False,
                 passes: int | None = None):
        super().__init__()
        self.features = _positive_int(features, "features")
        self.context = _positive_int(context, "context", minimum=0)
        transforms = _positive_int(transforms, "transforms", minimum=0)
        if passes is not None and passes != features:
            raise ValueError(f"passes must be None or features ({features}): only fully autoregressive layers "
                             f"are supported, got {passes!r}")
        hidden = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError("hidden_features must be a non-empty sequence of positive ints, "
                             f"got {hidden_features!r}")
        if len(set(hidden)) != 1:
            raise ValueError(f"hidden_features must all be equal (nflows' MADE has one width), got {hidden}")
        new_activation = _activation_factory(activation)
        if randperm:
            orders = [torch.randperm(features) for _ in range(transforms)]
        else:
            ascending = torch.arange(features)
            orders = [ascending if i % 2 == 0 else ascending.flip(0) for i in range(transforms)]
        self.register_buffer("orders", torch.stack(orders) if orders else torch.zeros(0, features, dtype=torch.long))

        def make_layer():
            return MaskedAffineAutoregressiveTransform(
                features, hidden[0], context_features=context if context > 0 else None,
                num_blocks=len(hidden) if residual else len(hidden) - 1, use_residual_blocks=residual,
                activation=new_activation())

        self.transform = CompositeTransform(_layers_for_orders(orders, make_layer))
        # Carries the flow's dtype and device, also when there are no layers (transforms=0).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context}, transforms={len(self.orders)}"

    def forward(self, c: Tensor | None = None) -> "MAFDistribution":
        """p(x | c). c has shape [..., context] (its leading dims are the batch shape); None when context=0."""
        if self.context == 0:
            if c is not None:
                raise ValueError("c was given, but the flow was built with context=0 (unconditional)")
            return MAFDistribution(self, None, Size())
        if c is None:
            raise ValueError(f"this flow needs a context c of shape [..., {self.context}]")
        if not isinstance(c, Tensor):
            raise TypeError(f"c must be a tensor, got {type(c).__name__}")
        if c.dim() < 1 or c.shape[-1] != self.context:
            raise ValueError(f"c must have shape [..., {self.context}], got {list(c.shape)}")
        return MAFDistribution(self, c, c.shape[:-1])


class MAFDistribution(Distribution):
    """p(x | c) of a `MAF`: batch shape = the context's leading dims (() when unconditional), event shape
    [features]. x in log_prob broadcasts against the batch shape; sample(shape) has shape
    shape + batch_shape + [features], as in zuko's NormalizingFlow."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow: MAF, context: Tensor | None, batch_shape: Size):
        self.flow = flow
        self.context = context
        super().__init__(batch_shape=batch_shape, event_shape=Size([flow.features]), validate_args=False)

    def expand(self, batch_shape, _instance=None) -> "MAFDistribution":
        batch_shape = Size(batch_shape)
        context = None
        if self.context is not None:
            context = self.context.expand(batch_shape + self.context.shape[-1:])
        return MAFDistribution(self.flow, context, batch_shape)

    def _rows(self, leading: Size) -> tuple[Tensor | None, int]:
        """The context repeated for every row of `leading` (which ends with the batch shape), flattened."""
        rows = math.prod(leading)
        if self.context is None:
            return None, rows
        return self.context.expand(leading + self.context.shape[-1:]).reshape(rows, -1), rows

    @staticmethod
    def _base_log_prob(z: Tensor) -> Tensor:
        return -0.5 * z.pow(2).sum(dim=-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x | c) = log N(z; 0, I) + log|det dz/dx|, of shape broadcast(x.shape[:-1], batch_shape)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        features = self.flow.features
        if x.dim() < 1 or x.shape[-1] != features:
            raise ValueError(f"x must have shape [..., {features}], got {list(x.shape)}")
        try:
            leading = torch.broadcast_shapes(x.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"x of shape {list(x.shape)} does not broadcast with the batch shape "
                             f"{list(self.batch_shape)} of the context") from None
        context, rows = self._rows(leading)
        flat = x.expand(leading + x.shape[-1:]).reshape(rows, features)
        z, logabsdet = self.flow.transform(flat, context)
        return (self._base_log_prob(z) + logabsdet).reshape(leading)

    def rsample_and_log_prob(self, shape=()) -> tuple[Tensor, Tensor]:
        """Samples of shape shape + batch_shape + [features] and their log-densities, differentiable with
        respect to the flow's parameters and the context (one network pass per layer)."""
        leading = Size(shape) + self.batch_shape
        context, rows = self._rows(leading)
        anchor = self.flow._anchor
        z = torch.randn(rows, self.flow.features, dtype=anchor.dtype, device=anchor.device)
        x, logabsdet = self.flow.transform.inverse(z, context)
        log_prob = self._base_log_prob(z) - logabsdet
        return x.reshape(leading + self.event_shape), log_prob.reshape(leading)

    def rsample(self, shape=()) -> Tensor:
        return self.rsample_and_log_prob(shape)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape: {self.batch_shape}, event_shape: {self.event_shape})"
