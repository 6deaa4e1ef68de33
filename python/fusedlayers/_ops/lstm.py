"""Fake-tensor and autograd rules of the LSTM ops defined in csrc/lstm/lstm_ops.cpp."""

import torch

from ._common import block_double_backward, register_autocast_current_dtype

_layer = torch.ops.fusedlayers.lstm_layer
_layer_backward = torch.ops.fusedlayers.lstm_layer_backward


def _gates_stride(hidden: int, element_size: int) -> int:
    # The same rule as lstm_gates_stride in csrc/lstm/lstm_kernel.h: pad rows that are a multiple of 512 bytes.
    n = 4 * hidden
    return n + 64 // element_size if (n * element_size) % 512 == 0 else n


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # bfloat16 layers keep their gates and cell states in float32.
    return torch.float32 if dtype == torch.bfloat16 else dtype


@torch.library.register_fake("fusedlayers::lstm_layer")
def _lstm_layer_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
    torch._check(input.dim() == 2, lambda: f"lstm_layer: input must have 2 dimensions, got {input.dim()}")
    torch._check(w_ih.dim() == 2 and w_ih.shape[0] % 4 == 0,
                 lambda: "lstm_layer: w_ih must have shape [4 * hidden_size, input_size]")
    rows, hidden = input.shape[0], w_ih.shape[0] // 4
    out = w_hr.shape[0] if w_hr is not None else hidden
    kept = rows if train else 0
    state = _state_dtype(input.dtype)
    width = _gates_stride(hidden, torch.empty((), dtype=state).element_size())
    return (
        input.new_empty(rows, out),
        input.new_empty(h0.shape),  # [batch, size] or [1, batch, size], as given
        input.new_empty(c0.shape),
        input.new_empty(kept, width, dtype=state),
        input.new_empty(kept, hidden, dtype=state),
        input.new_empty(kept if w_hr is not None else 0, hidden, dtype=state),
    )


@torch.library.register_fake("fusedlayers::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                              has_bias, output, gates, cells, raw_hidden, reverse):
    hidden = w_ih.shape[0] // 4
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(4 * hidden if has_bias else 0),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else w_ih.new_empty(0, 0),
    )


def _setup_context(ctx, inputs, output):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train = inputs
    out, _, _, gates, cells, raw = output
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, raw)
    ctx.has_bias = b_ih is not None
    ctx.reverse = reverse
    ctx.train = train
    ctx.mark_non_differentiable(gates, cells, raw)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient as large as gates, cells and raw


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells, _grad_raw):
    input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, raw = ctx.saved_tensors
    if not ctx.train:
        raise RuntimeError("lstm_layer: call it with train=True to differentiate it (the forward kept no state)")
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    gi, gh0, gc0, gw_ih, gw_hh, gb, gw_hr = _layer_backward(
        grad_out, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ctx.has_bias, out, gates,
        cells, raw, ctx.reverse)
    gb_ih = gb if ctx.has_bias else None
    gb_hh = gb if ctx.has_bias else None
    gw_hr = gw_hr if w_hr is not None else None
    return gi, None, gh0, gc0, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, None, None


torch.library.register_autograd("fusedlayers::lstm_layer", _backward, setup_context=_setup_context)


block_double_backward("fusedlayers::lstm_layer_backward", "LSTM")


def _run_autocast(op, args, dtype):
    if dtype != torch.float16:
        return op(*args)
    # The kernels have no float16 type: float16 runs in float32 and returns float16 outputs, as
    # functional.lstm_packed does; the saved state stays float32.
    args = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]
    out, h_n, c_n, *saved = op(*args)
    return (out.half(), h_n.half(), c_n.half(), *saved)


# Under torch.autocast on the CPU, torch.nn.LSTM runs in the lower precision (the autocast dtype in effect,
# bfloat16 or float16): so does the fused layer.
register_autocast_current_dtype("fusedlayers::lstm_layer", "cpu", run=_run_autocast)
