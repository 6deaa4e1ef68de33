"""Self-attention layers of the classic literature on the fused scaled-dot-product attention kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional.attention import scaled_dot_product_attention
from ..functional.linear import linear


class SelfAttention2d(nn.Module):
    """Self-attention over the positions of a feature map (SAGAN, Zhang et al., 2018).

    With f, g, h the paper's 1x1 convolutions (f, g reduce channels by `reduction`):
        beta = softmax_j(f(x)_i . g(x)_j)   (no scaling, as in the paper)
        o_i  = sum_j beta_ij h(x)_j
        out  = gamma * o + x,   gamma learnable, initialised to 0.
    Input and output: [batch, in_channels, height, width]. The H*W x H*W attention map is never stored.
    """

    def __init__(self, in_channels: int, reduction: int = 8, device=None, dtype=None):
        super().__init__()
        if in_channels < 1 or reduction < 1:
            raise ValueError(f"in_channels and reduction must be positive, got {in_channels} and {reduction}")
        kw = {"device": device, "dtype": dtype}
        inner = max(1, in_channels // reduction)
        self.in_channels = in_channels
        self.f = nn.Conv2d(in_channels, inner, kernel_size=1, **kw)  # queries
        self.g = nn.Conv2d(in_channels, inner, kernel_size=1, **kw)  # keys
        self.h = nn.Conv2d(in_channels, in_channels, kernel_size=1, **kw)  # values
        self.gamma = nn.Parameter(torch.zeros(1, **kw))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SelfAttention2d: expected input of shape [batch, {self.in_channels}, height, width], "
                             f"got {list(x.shape)}")
        b, c, height, width = x.shape
        rows = x.flatten(2).transpose(1, 2).contiguous()  # [batch, positions, channels], copied once
        # f, g and h as one product (their weights stacked), split into views: q, k, v share one buffer.
        convs = (self.f, self.g, self.h)
        weight = torch.cat([conv.weight.flatten(1) for conv in convs])
        bias = torch.cat([conv.bias for conv in convs]) if self.f.bias is not None else None
        q, k, v = linear(rows, weight, bias).split([self.f.out_channels, self.g.out_channels, c], dim=2)
        o = scaled_dot_product_attention(q, k, v, scale=1.0)  # [batch, positions, channels]
        # gamma * o + x in one pass, o read through a transposed view (no copy back to channels-first).
        return torch.addcmul(x, self.gamma, o.transpose(1, 2).unflatten(2, (height, width)))


class AttentionBlock(nn.Module):
    """SNAIL's attention block (Mishra et al., 2017): causal attention of each time step over the past (itself
    included), its result concatenated to the input.

    Input [batch, time, in_channels] -> output [batch, time, in_channels + value_size]; keys and queries of
    `key_size` features, scores scaled by 1/sqrt(key_size).
    """

    def __init__(self, in_channels: int, key_size: int, value_size: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.query = nn.Linear(in_channels, key_size, **kw)
        self.key = nn.Linear(in_channels, key_size, **kw)
        self.value = nn.Linear(in_channels, value_size, **kw)
        self.key_size = key_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.in_channels:
            raise ValueError(f"AttentionBlock: expected input of shape [batch, time, {self.in_channels}], "
                             f"got {list(x.shape)}")
        q = linear(x, self.query.weight, self.query.bias)
        k = linear(x, self.key.weight, self.key.bias)
        v = linear(x, self.value.weight, self.value.bias)
        read = scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.key_size))
        return torch.cat([x, read], dim=2)
