"""The Transform API of nflows: `forward(inputs, context=None) -> (outputs, logabsdet)` and `inverse(...)`,
one log|det J| per batch row."""

from __future__ import annotations

import torch
from torch import Tensor, nn


try:  # where nflows is installed, its exceptions are our bases: code that catches nflows' catches ours
    from nflows.transforms.base import InputOutsideDomain as _InputOutsideDomainBase
    from nflows.transforms.base import InverseNotAvailable as _InverseNotAvailableBase
except ImportError:
    _InverseNotAvailableBase = _InputOutsideDomainBase = Exception


class InverseNotAvailable(_InverseNotAvailableBase):
    """Raised by a transform that has no inverse."""


class InputOutsideDomain(_InputOutsideDomainBase):
    """Raised when an input lies outside a transform's domain."""


class Transform(nn.Module):
    """Base class: subclasses implement forward and, where it exists, inverse."""

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise InverseNotAvailable()


class CompositeTransform(Transform):
    """Applies transforms in order (their inverses in reverse order), summing the log-determinants."""

    def __init__(self, transforms):
        super().__init__()
        self._transforms = nn.ModuleList(transforms)

    @staticmethod
    def _cascade(inputs: Tensor, funcs, context: Tensor | None) -> tuple[Tensor, Tensor]:
        outputs = inputs
        total = inputs.new_zeros(inputs.shape[0])
        for func in funcs:
            outputs, logabsdet = func(outputs, context)
            total = total + logabsdet
        return outputs, total

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._cascade(inputs, self._transforms, context)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._cascade(inputs, (t.inverse for t in self._transforms[::-1]), context)


class InverseTransform(Transform):
    """Swaps a transform's forward and inverse directions (e.g. a MAF used as an IAF)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self._transform = transform

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform.inverse(inputs, context)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(inputs, context)


class ShapeError(ValueError, RuntimeError):
    """Inputs or context of the wrong shape: a ValueError, and also the RuntimeError that nflows' layers raise
    for them (from inside their matrix products), so code written against either keeps catching it."""


def check_features(inputs: Tensor, features: int, name: str = "inputs", finite: bool = True) -> None:
    """A clear error for the wrong shape, and for NaN/inf, which would otherwise propagate silently (finite=False
    leaves that to the caller: the fused MAF forward checks in C++)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() != 2 or inputs.shape[1] != features:
        raise ShapeError(f"{name} must have shape [batch, {features}], got {list(inputs.shape)}")
    if finite:
        check_finite(inputs, name)


def check_finite(inputs: Tensor, name: str = "inputs") -> None:
    # A data-dependent check: skipped while torch.compile traces (it would break the graph). One sum finds any
    # NaN or inf (or an overflow, then the exact check decides) at a fraction of isfinite().all()'s cost.
    if (not torch.compiler.is_compiling() and inputs.numel() and not bool(torch.isfinite(inputs.sum()))
            and not torch.isfinite(inputs).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_context(context: Tensor | None, context_features: int | None, batch: int) -> None:
    if context_features is None:
        if context is not None:
            raise ValueError("context was given, but the transform was built without context_features")
        return
    if context is None:
        raise ValueError(f"this transform needs a context of shape [batch, {context_features}]")
    if context.dim() != 2 or context.shape[1] != context_features or context.shape[0] != batch:
        raise ShapeError(f"context must have shape [{batch}, {context_features}], got {list(context.shape)}")
