"""Base distributions for flows (nflows' interface: log_prob(inputs, context), sample(n, context))."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CountError(TypeError, ValueError):
    """A sample count or batch size that is not a positive int: nflows raises TypeError for these, and this is
    also a ValueError, as it was here before."""


def check_count(name: str, value) -> None:
    """nflows' rule for a number of samples or a batch size: a positive int (a bool passes nflows' check and then
    fails in torch.randn, with a TypeError too)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CountError(f"{name} must be a positive int, got {value!r}")


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """The sizes of the batches nflows draws num_samples in: full batches, then the rest."""
    return [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]


class StandardNormal(nn.Module):
    """A standard normal over tensors of `shape`; the context is ignored."""

    def __init__(self, shape):
        super().__init__()
        self._shape = torch.Size(shape)
        self.register_buffer("_log_z", torch.tensor(0.5 * math.prod(self._shape) * math.log(2 * math.pi),
                                                    dtype=torch.float64), persistent=False)

    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        if inputs.shape[1:] != self._shape:
            raise ValueError(f"expected inputs of shape [batch, {', '.join(map(str, self._shape))}], "
                             f"got {list(inputs.shape)}")
        return -0.5 * inputs.pow(2).flatten(1).sum(dim=1) - self._log_z.to(inputs.dtype)

    def sample(self, num_samples: int, context: Tensor | None = None, batch_size: int | None = None) -> Tensor:
        """[num_samples, *shape], or [context rows, num_samples, *shape]. With `batch_size` (nflows' argument),
        drawn that many at a time, as nflows draws them (the same values under the same seed)."""
        check_count("num_samples", num_samples)
        if batch_size is not None:
            check_count("batch_size", batch_size)
            return torch.cat([self.sample(n, context) for n in batch_sizes(num_samples, batch_size)],
                             dim=0 if context is None else 1)
        if context is None:
            return torch.randn(num_samples, *self._shape, device=self._log_z.device)
        return torch.randn(context.shape[0], num_samples, *self._shape, device=context.device)

    def mean(self, context: Tensor | None = None) -> Tensor:
        """Zeros of `shape` (float64, as nflows gives them); [context rows, *shape] in the context's dtype."""
        if context is None:
            return self._log_z.new_zeros(self._shape)
        return context.new_zeros(context.shape[0], *self._shape)

    def sample_and_log_prob(self, num_samples: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        samples = self.sample(num_samples, context)
        if context is None:
            return samples, self.log_prob(samples)
        flat = samples.reshape(-1, *self._shape)
        return samples, self.log_prob(flat).reshape(samples.shape[0], num_samples)
