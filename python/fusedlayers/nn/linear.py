"""`Linear`: torch.nn.Linear on the GEMM engine."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional.linear import linear


class Linear(torch.nn.Linear):
    """Drop-in for `torch.nn.Linear(in_features, out_features, bias=True, device=None, dtype=None)`: float32 and
    float64 CPU products on the GEMM engine, anything else through torch."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)
