"""Fake-tensor and autograd rules of fusedlayers::linear (csrc/common/linear_ops.cpp)."""

import torch

from ._common import block_double_backward


@torch.library.register_fake("fusedlayers::linear")
def _linear_fake(input, weight, bias):
    torch._check(input.shape[-1] == weight.shape[1], lambda: "linear: input's last dim must equal in_features")
    return input.new_empty(*input.shape[:-1], weight.shape[0])


@torch.library.register_fake("fusedlayers::linear_backward")
def _linear_backward_fake(grad_out, input, weight, bias_grad, input_grad=True):
    bias_size = weight.shape[0] if bias_grad else 0
    grad_input = input.new_empty(input.shape) if input_grad else input.new_empty(0, weight.shape[1])
    return grad_input, weight.new_empty(weight.shape), weight.new_empty(bias_size)


def _setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    input, weight = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    gi, gw, gb = torch.ops.fusedlayers.linear_backward(grad_out, input, weight, ctx.has_bias, input_grad)
    return gi if input_grad else None, gw, gb if ctx.has_bias else None


torch.library.register_autograd("fusedlayers::linear", _backward, setup_context=_setup_context)


block_double_backward("fusedlayers::linear_backward", "linear")
