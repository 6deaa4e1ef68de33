"""Base distributions for flows (nflows' interface: log_prob(inputs, context), sample(n, context))."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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

    def sample(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        if context is None:
            return torch.randn(num_samples, *self._shape, device=self._log_z.device)
        return torch.randn(context.shape[0], num_samples, *self._shape, device=context.device)

    def mean(self, context: Tensor | None = None) -> Tensor:
        """Zeros of `shape`; [context rows, *shape] with a context."""
        rows = () if context is None else (context.shape[0],)
        return self._log_z.new_zeros(*rows, *self._shape, dtype=torch.get_default_dtype())

    def sample_and_log_prob(self, num_samples: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        samples = self.sample(num_samples, context)
        if context is None:
            return samples, self.log_prob(samples)
        flat = samples.reshape(-1, *self._shape)
        return samples, self.log_prob(flat).reshape(samples.shape[0], num_samples)
