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
    if input.dim() >= 3 and not input.is_contiguous():
        order = _contiguous_order(input)
        if order is not None:  # rows are independent: multiply them in memory order, and give the view back
            inverse = [0] * len(order)
            for position, dim in enumerate(order):
                inverse[dim] = position
            return _linear_op(input.permute(order), weight, bias).permute(inverse)
    return _linear_op(input, weight, bias)


def _contiguous_order(input: Tensor) -> list[int] | None:
    """An order of input's leading dims in which it is contiguous (a batch-first tensor transposed to
    sequence-first, as MultiheadAttention does), or None: the op would copy it to multiply it."""
    if input.stride(-1) != 1 or any(size == 0 for size in input.shape):
        return None
    leading = sorted(range(input.dim() - 1), key=lambda d: input.stride(d), reverse=True)
    order = leading + [input.dim() - 1]
    return order if input.permute(order).is_contiguous() else None
