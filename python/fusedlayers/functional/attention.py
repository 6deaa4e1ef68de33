"""Fused scaled-dot-product attention with torch's signature and semantics."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_sdpa_op = torch.ops.fusedlayers.sdpa


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float) -> None:
    # The checks (exception types and messages) of torch.nn.functional.scaled_dot_product_attention.
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{_short(query.dtype)} key.dtype: {_short(key.dtype)} and value.dtype: {_short(value.dtype)} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "Expected query, key, and value to have the same device type, but got query.device: "
            f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"expected scalar type Float but found {_short(query.dtype).capitalize()}")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(
            "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
            f"{_short(attn_mask.dtype)} and  query.dtype: {_short(query.dtype)} instead.")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key must have the query's embedding size {query.shape[-1]} "
            f"(query {list(query.shape)}, key {list(key.shape)})")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value must have the same sequence length "
            f"(key {list(key.shape)}, value {list(value.shape)})")


def _dim_out_of_range(dim: int, ndim: int) -> IndexError:
    """torch's error for indexing dimension `dim` of a tensor with `ndim` dimensions."""
    if ndim == 0:
        return IndexError(f"Dimension specified as {dim} but tensor has no dimensions")
    return IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim})")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "float").replace("float64", "double").replace(
        "int32", "int").replace("int64", "long").replace("float16", "half")


def _window_bounds(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a (left, right) pair of ints >= 0 or None, got {window!r}")
    bounds = []
    for side, bound in zip(("left", "right"), window):
        if bound is None:
            bounds.append(-1)
        elif isinstance(bound, int) and bound >= 0:
            bounds.append(bound)
        else:
            raise ValueError(f"window {side} bound must be an int >= 0 or None, got {bound!r}")
    return bounds[0], bounds[1]


def _as_batch_heads(t: Tensor, lead: tuple[int, ...], length: int, features: int) -> Tensor:
    """Views t as [batch, heads, length, features], with batch = prod(lead[:-1]), heads = lead[-1]."""
    t = t.expand(*lead, length, features)
    if len(lead) == 0:
        return t.reshape(1, 1, length, features)
    return t.reshape(math.prod(lead[:-1]), lead[-1], length, features)  # not -1: ambiguous when t is empty


def _torch_fused_path_takes(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, dropout_p: float,
                            enable_gqa: bool) -> bool:
    """Whether torch's CPU dispatch would pick its fused (flash) kernel for these inputs (torch 2.13): 4-D,
    no dropout, no mask gradient, unit stride in the last dim, nonzero head size, one batch size and (without
    GQA) one head count."""
    tensors = (query, key, value)
    if (any(t.dim() != 4 or t.stride(-1) != 1 for t in tensors) or dropout_p > 0.0 or query.shape[-1] == 0
            or attn_mask.requires_grad):
        return False
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return False
    return enable_gqa or query.shape[1] == key.shape[1] == value.shape[1]


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False, window: tuple[int | None, int | None] | None = None
                                 ) -> Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`, fused (the L x S score matrix is never
    stored; causal and banded masks skip the tiles they exclude).

    query (..., L, E), key (..., S, E), value (..., S, Ev), any number of leading dims broadcast as torch does.
    attn_mask: bool (True = may attend) or additive float, broadcastable to (..., L, S); given together
    with is_causal, both apply where torch's fused CPU path takes them (else the same error as torch). is_causal is aligned as torch aligns it (query i sees keys 0..i). enable_gqa: key/value may have
    fewer heads (dim -3) than query, dividing them. dropout is drawn from torch's default generator.

    scale, enable_gqa (and window) are keyword-only, as in torch.

    window=(left, right): an extra keyword: query i sees only keys i-left .. i+right (None = unbounded), as in
    Luong's local attention; tiles outside the band are skipped.

    Differs from torch where torch returns NaN: a query row that may attend to no key returns zeros, and its
    gradients are zero.
    """
    # torch's argument parser takes a real number (or a 0-dim tensor) for scale.
    if scale is not None and not (isinstance(scale, numbers.Real) or (isinstance(scale, Tensor) and scale.dim() == 0)):
        raise TypeError(f"scaled_dot_product_attention(): argument 'scale' must be float, not {type(scale).__name__}")
    _check_inputs(query, key, value, attn_mask, dropout_p)
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):  # torch's parser takes only a bool
        if not isinstance(flag, bool):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be bool, not {type(flag).__name__}")
    # torch's fused CPU path indexes the mask's dim -2 (its math path broadcasts a 0-D or 1-D mask, as we do
    # everywhere else), and with enable_gqa every path indexes each input's head dim -3: the same IndexError.
    if attn_mask is not None and attn_mask.dim() < 2 and _torch_fused_path_takes(query, key, value, attn_mask,
                                                                                 dropout_p, enable_gqa):
        raise _dim_out_of_range(-2, attn_mask.dim())
    for t in (query, key, value) if enable_gqa else ():
        if t.dim() < 3:
            raise _dim_out_of_range(-3, t.dim())
    # attn_mask together with is_causal: both apply (AND-ed), as torch's fused CPU path does; where torch would
    # take its math path instead, which rejects the combination, so do we.
    if attn_mask is not None and is_causal and not _torch_fused_path_takes(query, key, value, attn_mask, dropout_p,
                                                                           enable_gqa):
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    left, right = _window_bounds(window)
    q_len, e = query.shape[-2], query.shape[-1]
    s_len, ev = key.shape[-2], value.shape[-1]
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk != 0 or hq % hv != 0:
            raise RuntimeError("Number of heads in key and value must divide the number of heads in query")
        if hk != hv:  # torch repeats key and value separately: bring both to lcm(hk, hv) heads (divides hq)
            heads = math.lcm(hk, hv)
            key, value = key.repeat_interleave(heads // hk, -3), value.repeat_interleave(heads // hv, -3)
            hk = heads
        batch_lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        q_lead, kv_lead = (*batch_lead, hq), (*batch_lead, hk)
    else:
        q_lead = kv_lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q4 = _as_batch_heads(query, q_lead, q_len, e)
    k4 = _as_batch_heads(key, kv_lead, s_len, e)
    v4 = _as_batch_heads(value, kv_lead, s_len, ev)
    mask4 = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)  # torch accepts a float32 mask with any query dtype
        mask4 = _as_batch_heads(attn_mask, q_lead, q_len, s_len)
    scale_value = float(scale) if scale is not None else 1.0 / math.sqrt(e) if e > 0 else 1.0
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    out, _ = _sdpa_op(q4, k4, v4, mask4, float(dropout_p), bool(is_causal), scale_value, left, right, seed)
    return out.reshape(*q_lead, q_len, ev)
