"""Additive attention (Bahdanau et al., 2015) on the fused kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional.additive import additive_attention
from ..functional.linear import linear


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention:

        score(q, k_j) = v . tanh(W_q q + b + W_k k_j)
        a = softmax_j(score) over the keys not masked
        context = sum_j a_j value_j

    AdditiveAttention(query_size, key_size, hidden_size, bias=True): parameters `query_proj` (Linear
    query_size -> hidden_size, with the bias), `key_proj` (Linear key_size -> hidden_size, no bias: one bias
    suffices inside the tanh) and `v` [hidden_size].

    forward(query, key, value=None, key_padding_mask=None) -> (context, weights)
      query [batch, q_len, query_size], or [batch, query_size] for one decoder step (then the outputs drop q_len)
      key [batch, kv_len, key_size]; value [batch, kv_len, value_size] (default: key)
      key_padding_mask [batch, kv_len] bool, True = padding (ignored), as in nn.MultiheadAttention
      context [batch, q_len, value_size], weights [batch, q_len, kv_len]
    The [batch, q_len, kv_len, hidden] tanh tensor of the usual implementation is never stored. A query whose
    keys are all padding gets zero weights and context (the naive formula gives NaN).
    """

    def __init__(self, query_size: int, key_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        for name, value in (("query_size", query_size), ("key_size", key_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AdditiveAttention: {name} must be a positive int, got {value!r}")
        kw = {"device": device, "dtype": dtype}
        self.query_size, self.key_size, self.hidden_size = query_size, key_size, hidden_size
        self.query_proj = nn.Linear(query_size, hidden_size, bias=bias, **kw)
        self.key_proj = nn.Linear(key_size, hidden_size, bias=False, **kw)
        self.v = nn.Parameter(torch.empty(hidden_size, **kw))
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(self.v, -bound, bound)

    def forward(self, query: Tensor, key: Tensor, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        value = key if value is None else value
        step = query.dim() == 2
        if step:
            query = query.unsqueeze(1)
        if query.dim() != 3 or query.shape[2] != self.query_size:
            raise ValueError(f"AdditiveAttention: query must have shape [batch, q_len, {self.query_size}] or "
                             f"[batch, {self.query_size}], got {list(query.shape)}")
        if key.dim() != 3 or key.shape[2] != self.key_size or key.shape[0] != query.shape[0]:
            raise ValueError(f"AdditiveAttention: key must have shape [{query.shape[0]}, kv_len, {self.key_size}], "
                             f"got {list(key.shape)}")
        if value.dim() != 3 or tuple(value.shape[:2]) != tuple(key.shape[:2]):
            raise ValueError(f"AdditiveAttention: value must have shape [{key.shape[0]}, {key.shape[1]}, "
                             f"value_size], got {list(value.shape)}")
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(key.shape[:2]):
                raise ValueError(f"AdditiveAttention: key_padding_mask must be a bool tensor of shape "
                                 f"{list(key.shape[:2])}, got {key_padding_mask.dtype} {list(key_padding_mask.shape)}")
            mask = ~key_padding_mask[:, None, :]
        projected_query = linear(query, self.query_proj.weight, self.query_proj.bias)
        projected_key = linear(key, self.key_proj.weight, self.key_proj.bias)
        context, weights = additive_attention(projected_query, projected_key, value, self.v, attn_mask=mask)
        if step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


BahdanauAttention = AdditiveAttention
