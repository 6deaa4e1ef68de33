"""Fused additive (Bahdanau) attention over projected queries and keys."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import _window_bounds

_additive_op = torch.ops.fusedlayers.additive_attention


def additive_attention(query: Tensor, key: Tensor, value: Tensor, score: Tensor, attn_mask: Tensor | None = None,
                       window: tuple[int | None, int | None] | None = None) -> tuple[Tensor, Tensor]:
    """Additive attention of projected queries over projected keys (Bahdanau et al., 2015):

        score(i, j) = score . tanh(query_i + key_j)
        weights(i)  = softmax_j(score(i, j)) over the keys query i may attend to
        context_i   = sum_j weights(i, j) value_j

    query [batch, q_len, hidden] (W_q q, with its bias), key [batch, kv_len, hidden] (W_k k: project the keys
    once per sequence and reuse them across decoder steps), value [batch, kv_len, v_dim], score [hidden] (the
    vector v). attn_mask: bool, True = may attend, broadcastable to [batch, q_len, kv_len]. window=(left, right):
    query i sees only keys i-left .. i+right (None = unbounded); keys outside are never touched.

    Returns (context [batch, q_len, v_dim], weights [batch, q_len, kv_len]). The [batch, q_len, kv_len, hidden]
    tanh tensor is never stored; the backward recomputes it. A query with no key to attend to gets zero weights
    and a zero context (the naive formula gives NaN).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"additive_attention: {name} must be 3-D [batch, length, features], got shape "
                             f"{list(t.shape)}")
    if score.dim() != 1 or score.shape[0] != query.shape[2]:
        raise ValueError(f"additive_attention: score must have shape [{query.shape[2]}] (the queries' hidden size), "
                         f"got {list(score.shape)}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"additive_attention: key must have the queries' hidden size {query.shape[2]}, got "
                         f"{list(key.shape)}")
    if value.shape[1] != key.shape[1] or not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"additive_attention: expected key [batch, kv_len, hidden] and value [batch, kv_len, v_dim] "
                         f"matching query's batch, got query {list(query.shape)}, key {list(key.shape)}, value "
                         f"{list(value.shape)}")
    if not (query.dtype == key.dtype == value.dtype == score.dtype):
        raise TypeError(f"additive_attention: query, key, value and score must have one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype} and {score.dtype}")
    left, right = _window_bounds(window)
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"additive_attention: attn_mask must be a bool tensor (True = may attend), got "
                            f"{attn_mask.dtype}")
        try:
            mask = attn_mask.expand(query.shape[0], query.shape[1], key.shape[1])
        except RuntimeError:
            raise ValueError(f"additive_attention: attn_mask of shape {list(attn_mask.shape)} does not broadcast "
                             f"to [batch, q_len, kv_len] = {[query.shape[0], query.shape[1], key.shape[1]]}") from None
    return _additive_op(query, key, score, value, mask, left, right)
