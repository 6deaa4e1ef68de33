"""Fake-tensor and autograd rules of the additive-attention ops defined in csrc/attention/additive_ops.cpp."""

import torch

from ._common import block_double_backward

_backward_op = torch.ops.fusedlayers.additive_attention_backward


@torch.library.register_fake("fusedlayers::additive_attention")
def _additive_fake(query, key, score, value, mask, window_left, window_right):
    torch._check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3,
                 lambda: "additive_attention: query, key and value must be 3-D")
    batch, q_len, _ = query.shape
    return query.new_empty(batch, q_len, value.shape[2]), query.new_empty(batch, q_len, key.shape[1])


@torch.library.register_fake("fusedlayers::additive_attention_backward")
def _additive_backward_fake(grad_context, grad_weights, query, key, score, value, mask, weights, window_left,
                            window_right):
    return (query.new_empty(query.shape), key.new_empty(key.shape), score.new_empty(score.shape),
            value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    query, key, score, value, mask, window_left, window_right = inputs
    ctx.save_for_backward(query, key, score, value, mask, output[1])
    ctx.window = (window_left, window_right)


def _backward(ctx, grad_context, grad_weights):
    query, key, score, value, mask, weights = ctx.saved_tensors
    if grad_context is None:
        grad_context = torch.zeros(query.shape[0], query.shape[1], value.shape[2], dtype=query.dtype,
                                   device=query.device)
    gq, gk, gs, gv = _backward_op(grad_context, grad_weights, query, key, score, value, mask, weights, *ctx.window)
    return gq, gk, gs, gv, None, None, None


torch.library.register_autograd("fusedlayers::additive_attention", _backward, setup_context=_setup_context)

block_double_backward("fusedlayers::additive_attention_backward", "additive attention")


# ---- windowed attention (Luong local-p), csrc/attention/window_ops.cpp
_window_backward_op = torch.ops.fusedlayers.window_attention_backward


@torch.library.register_fake("fusedlayers::window_attention")
def _window_fake(query, source, factor, first, valid):
    return query.new_empty(query.shape), factor.new_empty(factor.shape)


@torch.library.register_fake("fusedlayers::window_attention_backward")
def _window_backward_fake(grad_context, query, source, factor, first, valid, probs):
    return query.new_empty(query.shape), source.new_empty(source.shape), factor.new_empty(factor.shape)


def _window_setup_context(ctx, inputs, output):
    query, source, factor, first, valid = inputs
    ctx.save_for_backward(query, source, factor, first, valid, output[1])
    ctx.mark_non_differentiable(output[1])


def _window_backward(ctx, grad_context, _grad_probs):
    query, source, factor, first, valid, probs = ctx.saved_tensors
    gq, gs, gf = _window_backward_op(grad_context, query, source, factor, first, valid, probs)
    return gq, gs, gf, None, None


torch.library.register_autograd("fusedlayers::window_attention", _window_backward,
                                setup_context=_window_setup_context)

block_double_backward("fusedlayers::window_attention_backward", "windowed attention")
