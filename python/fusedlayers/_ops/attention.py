"""Fake-tensor and autograd rules of the attention ops defined in csrc/attention/sdpa_ops.cpp."""

import torch

from ._common import block_double_backward, register_autocast_current_dtype

_backward_op = torch.ops.fusedlayers.sdpa_backward


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _empty_in_query_layout(query, v_dim):
    """[batch, heads, q_len, v_dim] laid out as the query (its first three dims by stride, largest first, ties in
    dim order): the rule of sdpa_ops.cpp's empty_in_query_layout."""
    order = sorted(range(3), key=lambda d: -query.stride(d))  # stable: ties keep dim order
    physical = query.new_empty([query.shape[d] for d in order] + [v_dim])
    back = [order.index(d) for d in range(3)] + [3]
    return physical.permute(back)


@torch.library.register_fake("fusedlayers::sdpa")
def _sdpa_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, window_left, window_right, seed):
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
                 lambda: "sdpa: query, key and value must be 4-D")
    batch, heads, q_len, _ = query.shape
    out = _empty_in_query_layout(query, value.shape[-1])
    lse = query.new_empty(batch, heads, q_len, 2, dtype=_compute_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("fusedlayers::sdpa_backward")
def _sdpa_backward_fake(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, window_left,
                        window_right, seed, mask_grad):
    wants_mask = mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    grad_mask = (query.new_empty(query.shape[0], query.shape[1], query.shape[2], key.shape[2]) if wants_mask
                 else query.new_empty(0))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_mask


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, window_left, window_right, seed = inputs
    out, lse = output
    ctx.mask_grad = attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)
    ctx.params = (dropout_p, is_causal, scale, window_left, window_right, seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    dropout_p, is_causal, scale, window_left, window_right, seed = ctx.params
    gq, gk, gv, gmask = _backward_op(grad_out, query, key, value, attn_mask, out, lse, dropout_p,
                                     is_causal, scale, window_left, window_right, seed, ctx.mask_grad)
    return gq, gk, gv, (gmask if ctx.mask_grad else None), None, None, None, None, None, None


torch.library.register_autograd("fusedlayers::sdpa", _backward, setup_context=_setup_context)


block_double_backward("fusedlayers::sdpa_backward", "attention")


# torch autocasts scaled_dot_product_attention to the lower precision on the CPU: the autocast dtype in effect
# (bfloat16 or float16), as torch does.
register_autocast_current_dtype("fusedlayers::sdpa", "cpu")
