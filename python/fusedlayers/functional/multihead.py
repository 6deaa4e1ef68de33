"""Multi-head attention forward on the fused scaled-dot-product attention.

Argument handling (shape checks, mask canonicalisation) reuses torch's own helpers from torch.nn.functional, so
that shapes, errors and mask semantics are torch's; the projections (GEMM engine) and the attention are ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import scaled_dot_product_attention
from .linear import linear


def _in_projection_packed(q: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Tensor | None):
    """q, k, v projections by one packed [3E, E] weight, sharing one GEMM where the inputs are the same tensor."""
    e = q.size(-1)
    if k is v:
        if q is k:  # self-attention: one product, split into views (split: its backward is one concatenation,
            return tuple(linear(q, w, b).split(e, dim=-1))  # where three slices each zero-fill a full gradient)
        w_q, w_kv = w.split([e, 2 * e])
        b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
        k_proj, v_proj = linear(k, w_kv, b_kv).split(e, dim=-1)
        return linear(q, w_q, b_q), k_proj, v_proj
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


def multi_head_attention_forward(query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int,
                                 num_heads: int, in_proj_weight: Tensor | None, in_proj_bias: Tensor | None,
                                 bias_k: Tensor | None, bias_v: Tensor | None, add_zero_attn: bool,
                                 dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Tensor | None,
                                 training: bool = True, key_padding_mask: Tensor | None = None,
                                 need_weights: bool = True, attn_mask: Tensor | None = None,
                                 use_separate_proj_weight: bool = False, q_proj_weight: Tensor | None = None,
                                 k_proj_weight: Tensor | None = None, v_proj_weight: Tensor | None = None,
                                 static_k: Tensor | None = None, static_v: Tensor | None = None,
                                 average_attn_weights: bool = True, is_causal: bool = False
                                 ) -> tuple[Tensor, Tensor | None]:
    """Drop-in for `torch.nn.functional.multi_head_attention_forward`. With need_weights=True the attention
    weights must be materialised, so torch's own function runs; otherwise the fused attention does."""
    if need_weights:
        return F.multi_head_attention_forward(
            query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=training,
            key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
            use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
            average_attn_weights=average_attn_weights, is_causal=is_causal)

    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None:
        attn_mask = None  # the hint says attn_mask is the causal mask: the fused kernel builds it itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")

    if not use_separate_proj_weight:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        for name, weight, inputs in (("query", q_proj_weight, query), ("key", k_proj_weight, key),
                                     ("value", v_proj_weight, value)):
            if tuple(weight.shape) != (embed_dim, inputs.shape[-1]):  # torch's own check, type and wording
                raise AssertionError(f"expecting {name} weights shape of {(embed_dim, inputs.shape[-1])}, but got "
                                     f"{weight.shape}")
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = linear(query, q_proj_weight, b_q), linear(key, k_proj_weight, b_k), linear(value, v_proj_weight, b_v)

    if attn_mask is not None:
        expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
        if attn_mask.dim() not in (2, 3):
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if tuple(attn_mask.shape) != expected:
            raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be "
                               f"{expected}.")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise AssertionError("bias cannot be added to static key.")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    elif bias_k is not None or bias_v is not None:
        raise AssertionError("bias_k and bias_v must be given together")

    for name, static in (("static_k", static_k), ("static_v", static_v)):  # torch's checks, type and wording
        if static is not None:
            if static.size(0) != bsz * num_heads:
                raise AssertionError(f"expecting {name}.size(0) of {bsz * num_heads}, but got {static.size(0)}")
            if static.size(2) != head_dim:
                raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.size(2)}")

    # [len, batch, embed] -> [batch, heads, len, head_dim]
    q = q.view(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = (static_k.view(bsz, num_heads, -1, head_dim) if static_k is not None
         else k.view(k.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3))
    v = (static_v.view(bsz, num_heads, -1, head_dim) if static_v is not None
         else v.view(v.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3))
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[2]
    if key_padding_mask is not None:
        # torch's F._check_key_padding_mask, as plain raises: its torch._check_with message closures stop
        # torch.compile(fullgraph=True) here
        for dim, want in ((0, bsz), (1, src_len)):
            if key_padding_mask.shape[dim] != want:
                raise AssertionError(f"Expected key_padded_mask.shape[{dim}] to be {want}, but got "
                                     f"{key_padding_mask.shape[dim]}")
        padding = key_padding_mask.view(bsz, 1, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask.view(-1, num_heads if attn_mask.shape[0] != 1 else 1,
                                                                      tgt_len, src_len) + padding
    elif attn_mask is not None:
        attn_mask = attn_mask.view(-1, num_heads if attn_mask.shape[0] != 1 else 1, tgt_len, src_len)
    if not training:
        dropout_p = 0.0

    out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    # The output is laid out as q (sdpa_ops.cpp): [len, batch, ...] in memory for seq-first inputs, [batch, len,
    # ...] for batch-first ones (the module's transposed view); either folds into the output projection's rows
    # without a copy.
    if out.permute(0, 2, 1, 3).is_contiguous():
        out = out.permute(0, 2, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = linear(out, out_proj_weight, out_proj_bias).view(bsz, tgt_len, embed_dim).transpose(0, 1)
    else:
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        out = linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, embed_dim)  # also when a size is 0
    if not batched:
        out = out.squeeze(1)
    return out, None
