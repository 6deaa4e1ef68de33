"""Feature permutations (volume preserving: log|det| = 0), as nflows defines them."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Transform


class Permutation(Transform):
    """Reorders features: outputs[:, i] = inputs[:, permutation[i]]."""

    def __init__(self, permutation: Tensor, dim: int = 1):
        if permutation.dim() != 1:
            raise ValueError("permutation must be a 1-D tensor")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError("dim must be a positive integer")
        super().__init__()
        self._dim = dim
        self.register_buffer("_permutation", permutation)

    @property
    def _inverse_permutation(self) -> Tensor:
        return torch.argsort(self._permutation)

    @staticmethod
    def _permute(inputs: Tensor, permutation: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        if dim >= inputs.dim():
            raise ValueError(f"no dimension {dim} in inputs of shape {list(inputs.shape)}")
        if inputs.shape[dim] != len(permutation):
            raise ValueError(f"dimension {dim} of inputs must have size {len(permutation)}, got {inputs.shape[dim]}")
        outputs = torch.index_select(inputs, dim, permutation)
        return outputs, inputs.new_zeros(inputs.shape[0])

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._permute(inputs, self._permutation, self._dim)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._permute(inputs, self._inverse_permutation, self._dim)


class RandomPermutation(Permutation):
    """A random permutation drawn from torch's generator at construction."""

    def __init__(self, features: int, dim: int = 1):
        if not isinstance(features, int) or features < 1:
            raise ValueError("features must be a positive integer")
        super().__init__(torch.randperm(features), dim)


class ReversePermutation(Permutation):
    """Reverses the order of the features."""

    def __init__(self, features: int, dim: int = 1):
        if not isinstance(features, int) or features < 1:
            raise ValueError("features must be a positive integer")
        super().__init__(torch.arange(features - 1, -1, -1), dim)
