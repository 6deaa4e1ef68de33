"""`linear` on the GEMM engine (float32/float64 on the CPU; anything else runs torch's F.linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_linear_op = torch.ops.fusedlayers.linear


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Drop-in for `torch.nn.functional.linear`: input (..., in) @ weight (out, in)^T + bias (out)."""
    supported = (input.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and input.dtype in (torch.float32, torch.float64)
                 and weight.dtype == input.dtype and (bias is None or bias.dtype == input.dtype)
                 and input.dim() >= 1 and weight.dim() == 2
                 and weight.numel() != 0)  # in_features or out_features 0: the engine reshapes to [-1, 0]
    if not supported:
        return F.linear(input, weight, bias)
    return _linear_op(input, weight, bias)
