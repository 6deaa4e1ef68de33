"""`Flow(transform, distribution)`: a density from a base distribution pushed through an invertible transform,
with nflows' interface. The transform maps data to noise (its forward is the density direction)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .distributions import CountError, batch_sizes, check_count  # noqa: F401 (CountError: flows' public name)


class NoMeanException(Exception):
    """Raised by `Flow.mean`: a flow's mean has no closed form (nflows' exception of the same name)."""


class Flow(nn.Module):
    def __init__(self, transform: nn.Module, distribution: nn.Module, embedding_net: nn.Module | None = None):
        super().__init__()
        self._transform = transform
        self._distribution = distribution
        self._embedding_net = embedding_net if embedding_net is not None else nn.Identity()

    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(inputs) = log p_base(noise) + log|det d noise / d inputs|, one value per row."""
        if context is not None and inputs.shape[0] != context.shape[0]:
            raise ValueError(f"inputs and context must have the same number of rows, got {inputs.shape[0]} "
                             f"and {context.shape[0]}")
        embedded = self._embedding_net(context) if context is not None else None
        noise, logabsdet = self._transform(inputs, context=embedded)
        return self._distribution.log_prob(noise, context=embedded) + logabsdet

    def transform_to_noise(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        embedded = self._embedding_net(context) if context is not None else None
        noise, _ = self._transform(inputs, context=embedded)
        return noise

    def sample(self, num_samples: int, context: Tensor | None = None, batch_size: int | None = None) -> Tensor:
        """[num_samples, ...] without context; [context rows, num_samples, ...] with one. With `batch_size`,
        draws at most that many samples (per context row) at a time, as nflows' argument of the same name."""
        if batch_size is None:
            return self.sample_and_log_prob(num_samples, context)[0]
        check_count("batch_size", batch_size)
        check_count("num_samples", num_samples)
        chunks = [self.sample_and_log_prob(n, context)[0] for n in batch_sizes(num_samples, batch_size)]
        return torch.cat(chunks, dim=0 if context is None else 1)

    def mean(self, context: Tensor | None = None) -> Tensor:
        raise NoMeanException("a flow's mean has no closed form; estimate it from samples")

    def sample_and_log_prob(self, num_samples: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_count("num_samples", num_samples)
        embedded = self._embedding_net(context) if context is not None else None
        noise, log_prob = self._distribution.sample_and_log_prob(num_samples, context=embedded)
        if embedded is None:
            samples, logabsdet = self._transform.inverse(noise)
            return samples, log_prob - logabsdet
        rows = embedded.shape[0]
        flat_noise = noise.reshape(rows * num_samples, *noise.shape[2:])
        flat_context = embedded.repeat_interleave(num_samples, dim=0)
        samples, logabsdet = self._transform.inverse(flat_noise, context=flat_context)
        samples = samples.reshape(rows, num_samples, *samples.shape[1:])
        return samples, log_prob - logabsdet.reshape(rows, num_samples)
