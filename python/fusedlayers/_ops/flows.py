"""Fake-tensor and autograd rules of the MADE ops (csrc/flows/made_ops.cpp). made_inverse and
made_coupling_forward have no autograd rule: they are called only when nothing needs gradients."""

import torch

from ._common import block_double_backward


@torch.library.register_fake("fusedlayers::made_inverse")
def _made_inverse_fake(targets, weights, biases, in_affine, out_affine, contexts, stage_info, offsets, activation,
                       epsilon):
    return targets.new_empty(targets.shape), targets.new_empty(targets.shape[0])


@torch.library.register_fake("fusedlayers::made_forward")
def _made_forward_fake(inputs, weights, masks, in_perms, out_perms, biases, contexts, layer_info, activation, epsilon,
                       save):
    batch = inputs.shape[0] if save else 0
    saved = []
    for n, w in enumerate(weights):
        residual, act_out = layer_info[4 * n + 1], layer_info[4 * n + 3]
        pre = act_out and not (activation == 0 and residual < 0)  # relu' of a plain relu layer: from its output
        saved += [inputs.new_empty(batch, w.shape[0]), inputs.new_empty(batch if pre else 0, w.shape[0])]
    return inputs.new_empty(inputs.shape), inputs.new_empty(inputs.shape[0]), saved


@torch.library.register_fake("fusedlayers::made_coupling_forward")
def _made_coupling_forward_fake(inputs, identity_index, moving_index, weights, biases, layer_info, activation, epsilon,
                                inverse):
    return inputs.new_empty(inputs.shape), inputs.new_empty(inputs.shape[0])


@torch.library.register_fake("fusedlayers::made_backward")
def _made_backward_fake(grad_outputs, grad_logabsdet, inputs, weights, masks, in_perms, out_perms, biases, contexts,
                        layer_info, saved, activation, epsilon, input_grad=True):
    grad_inputs = inputs.new_empty(inputs.shape) if input_grad else inputs.new_empty(0, inputs.shape[1])
    return (grad_inputs, [w.new_empty(w.shape) for w in weights],
            [inputs.new_empty(b.shape) for b in biases], [inputs.new_empty(c.shape) for c in contexts])


def _forward_setup_context(ctx, inputs, output):
    x, weights, masks, in_perms, out_perms, biases, contexts, layer_info, activation, epsilon, save = inputs
    ctx.layer_count = len(weights)
    ctx.save_for_backward(x, *weights, *masks, *in_perms, *out_perms, *biases, *contexts, *output[2])
    ctx.params = (list(layer_info), activation, epsilon)
    ctx.mark_non_differentiable(*output[2])
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for every saved activation


def _forward_backward(ctx, grad_outputs, grad_logabsdet, _grad_saved):
    tensors = list(ctx.saved_tensors)
    n = ctx.layer_count
    x = tensors[0]
    groups = [tensors[1 + k * n:1 + (k + 1) * n] for k in range(6)]  # weights, masks, perms, biases, contexts
    saved = tensors[1 + 6 * n:]
    layer_info, activation, epsilon = ctx.params
    if grad_outputs is None:
        grad_outputs = torch.zeros_like(x)
    if grad_logabsdet is None:
        grad_logabsdet = x.new_zeros(x.shape[0])
    input_grad = ctx.needs_input_grad[0]
    gx, gw, gb, gc = torch.ops.fusedlayers.made_backward(grad_outputs.contiguous(), grad_logabsdet.contiguous(), x,
                                                        *groups, layer_info, saved, activation, epsilon, input_grad)
    # Each Tensor[] argument takes a list of gradients (empty ones for absent biases and contexts).
    return gx if input_grad else None, gw, [None] * n, [None] * n, [None] * n, gb, gc, None, None, None, None


torch.library.register_autograd("fusedlayers::made_forward", _forward_backward,
                                setup_context=_forward_setup_context)

block_double_backward("fusedlayers::made_backward", "MADE")


# ---- the affine coupling map (csrc/flows/coupling_ops.cpp)
@torch.library.register_fake("fusedlayers::coupling_affine")
def _coupling_fake(inputs, params, inverse):
    return inputs.new_empty(inputs.shape), inputs.new_empty(inputs.shape[0])


@torch.library.register_fake("fusedlayers::coupling_affine_backward")
def _coupling_backward_fake(grad_outputs, grad_logabsdet, inputs, params, inverse):
    return inputs.new_empty(inputs.shape), params.new_empty(params.shape)


def _coupling_setup_context(ctx, inputs, output):
    x, params, inverse = inputs
    ctx.save_for_backward(x, params)
    ctx.inverse = inverse
    ctx.set_materialize_grads(False)


def _coupling_backward(ctx, grad_outputs, grad_logabsdet):
    x, params = ctx.saved_tensors
    grad_outputs = torch.zeros_like(x) if grad_outputs is None else grad_outputs
    grad_logabsdet = x.new_zeros(x.shape[0]) if grad_logabsdet is None else grad_logabsdet
    gx, gp = torch.ops.fusedlayers.coupling_affine_backward(grad_outputs, grad_logabsdet, x, params, ctx.inverse)
    return gx, gp, None


torch.library.register_autograd("fusedlayers::coupling_affine", _coupling_backward,
                                setup_context=_coupling_setup_context)

block_double_backward("fusedlayers::coupling_affine_backward", "affine coupling")


@torch.library.register_fake("fusedlayers::made_sorted_weight")
def _made_sorted_weight_fake(weight, mask, out_perm, in_perm):
    return weight.new_empty(weight.shape)
