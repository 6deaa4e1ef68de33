"""The fused LSTM as functions: one layer (`lstm_layer`), a whole stack (`lstm`, like torch's `_VF.lstm`) and one
step (`lstm_cell`, like `torch._VF.lstm_cell`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._kept import kept, memo, memo_allowed

_layer_op = torch.ops.fusedlayers.lstm_layer


def _needs_grad(*tensors) -> bool:
    # A trace records one path for every later call (and torch.jit.trace's check reruns it without grad): the
    # differentiable one wherever an input could require grad, whatever the grad mode at trace time.
    if not torch.is_grad_enabled() and not torch.jit.is_tracing():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def lstm_layer(input: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
               reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a packed sequence, with the whole time loop fused in C++.

    input: [N, input_size], the rows of every step stacked as in a PackedSequence (step t has batch_sizes[t]
    rows, non-increasing). h0: [B, proj_size or hidden_size], c0: [B, hidden_size] (either may have a leading
    dimension of 1); weights in torch's layout and gate order (i, f, g, o). Returns (output [N, proj_size or
    hidden_size], h_n, c_n), where h_n and c_n hold each sequence's state after its own last step, in the shapes
    of h0 and c0.
    """
    train = _needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    args = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train)
    if train or torch.compiler.is_compiling():
        output, h_n, c_n, *_ = _layer_op(*args)
    else:  # nothing to differentiate: past the autograd wrapper's Python layer (a few us of a small step)
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, *_ = _layer_op(*args)
    return output, h_n, c_n


def _split_params(params, has_biases: bool, num_layers: int, num_directions: int):
    per_layer = len(params) // (num_layers * num_directions)
    expected = 2 + (2 if has_biases else 0)
    if per_layer not in (expected, expected + 1):
        raise ValueError(f"lstm: expected {expected} or {expected + 1} tensors per layer and direction, "
                         f"got {len(params)} for {num_layers * num_directions} layer-directions")
    groups = []
    for k in range(num_layers * num_directions):
        p = params[k * per_layer:(k + 1) * per_layer]
        b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
        w_hr = p[-1] if per_layer == expected + 1 else None
        groups.append((p[0], p[1], b_ih, b_hh, w_hr))
    return groups


def _autocast_result_dtype(input: Tensor, c: Tensor) -> torch.dtype | None:
    """Under CPU autocast, the dtype of torch's packed LSTM and LSTM cell results (None outside autocast).

    torch lists neither among its autocast ops: only their matrix products run in the autocast dtype, and the
    cell update promotes those gates with the cell state, so the results take promote(autocast dtype, c.dtype)
    (float32 for a float32 state, as torch.nn.LSTMCell returns)."""
    if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    return torch.promote_types(torch.get_autocast_dtype("cpu"), c.dtype)


def _cast_optional(tensors, dtype: torch.dtype) -> list:
    return [None if t is None else t.to(dtype) for t in tensors]


def lstm_packed(data: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, params, has_biases: bool,
                num_layers: int, dropout: float, train: bool, bidirectional: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A stack of LSTM layers over packed rows; see `lstm`. Returns (output rows, h_n, c_n).

    Under CPU autocast the results take torch's dtypes for a packed input (see `_autocast_result_dtype`)."""
    dtype = _autocast_result_dtype(data, c0)
    if dtype is not None:
        with torch.autocast("cpu", enabled=False):
            data, h0, c0 = _cast_optional((data, h0, c0), dtype)
            return _lstm_packed(data, batch_sizes, h0, c0, _cast_optional(params, dtype), has_biases, num_layers,
                                dropout, train, bidirectional)
    return _lstm_packed(data, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional)


def _lstm_packed(data: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, params, has_biases: bool,
                 num_layers: int, dropout: float, train: bool, bidirectional: bool) -> tuple[Tensor, Tensor, Tensor]:
    # Padded inputs (`lstm`) come here directly: torch autocasts its padded LSTM, as the lstm_layer op does.
    if data.dtype == torch.float16:  # the kernels' types are float32/64 and bfloat16: computed in float32
        out, h_n, c_n = _lstm_packed(data.float(), batch_sizes, h0.float(), c0.float(), [p.float() for p in params],
                                     has_biases, num_layers, dropout, train, bidirectional)
        return out.half(), h_n.half(), c_n.half()
    num_directions = 2 if bidirectional else 1
    groups = _split_params(params, has_biases, num_layers, num_directions)
    if len(groups) == 1:  # one layer, one direction: the op takes and returns [1, B, *] states (no slices, no stack)
        return lstm_layer(data, batch_sizes, h0, c0, *groups[0])
    layer_input = data
    h_last, c_last = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = groups[k]
            out, h_n, c_n = lstm_layer(layer_input, batch_sizes, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                       reverse=direction == 1)
            outputs.append(out)
            h_last.append(h_n)
            c_last.append(c_n)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, torch.stack(h_last), torch.stack(c_last)


def lstm(input: Tensor, hx: tuple[Tensor, Tensor], params, has_biases: bool, num_layers: int, dropout: float,
         train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM stack on a padded [T, B, I] (or [B, T, I] with batch_first) input, with the arguments of
    torch's `_VF.lstm`: hx = (h0, c0) of shape [num_layers * num_directions, B, *], params = the flat weights
    (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction). Returns (output, h_n, c_n)."""
    if batch_first:
        input = input.transpose(0, 1)
    steps, batch = input.shape[0], input.shape[1]
    batch_sizes = _constant_batch_sizes(steps, batch)
    rows = input.contiguous().view(steps * batch, input.shape[2])
    out, h_n, c_n = _lstm_packed(rows, batch_sizes, hx[0], hx[1], params, has_biases, num_layers, dropout, train,
                                 bidirectional)
    out = out.view(steps, batch, out.shape[-1])
    if batch_first:
        out = out.transpose(0, 1)
    return out, h_n, c_n


_BATCH_SIZES: dict[tuple[int, int], Tensor] = memo({})
_ZERO_STATES: dict[tuple, tuple[Tensor, ...]] = memo({})
_ZERO_STATE_BYTES = 64 << 10  # larger states are the allocator's: a small call is where zeros cost a share


def zero_states(shapes: tuple[tuple[int, ...], ...], like: Tensor) -> tuple[Tensor, ...]:
    """Zero tensors of the given shapes with `like`'s dtype and device: the initial states when none are given.

    The op only reads its initial states, so small ones for plain tensors are made once per shape (torch.zeros
    costs a few us of a small call); traced, fake or subclassed inputs, and calls under a mode or transform
    (`memo_allowed`), get fresh zeros, as the trace, subclass or mode expects."""
    elements = sum(math.prod(shape) for shape in shapes)
    if (type(like) is not Tensor or elements * like.element_size() > _ZERO_STATE_BYTES or not memo_allowed()):
        return tuple(like.new_zeros(shape) for shape in shapes)
    key = (shapes, like.dtype, like.device)
    zeros = _ZERO_STATES.get(key)
    if zeros is None:
        if len(_ZERO_STATES) >= 64:  # many batch sizes: keep the memo small
            _ZERO_STATES.clear()
        zeros = _ZERO_STATES[key] = kept(lambda: tuple(torch.zeros(shape, dtype=like.dtype, device=like.device)
                                                       for shape in shapes))
    return zeros


def _constant_batch_sizes(steps: int, batch: int) -> Tensor:
    """batch_sizes of a padded sequence, made once per shape (the op only reads it)."""
    if not memo_allowed():
        return torch.full((steps,), batch, dtype=torch.int64, device="cpu")
    key = (steps, batch)
    sizes = _BATCH_SIZES.get(key)
    if sizes is None:
        if len(_BATCH_SIZES) >= 256:  # many shapes (varying sequence lengths): keep the memo small
            _BATCH_SIZES.clear()
        sizes = _BATCH_SIZES[key] = kept(lambda: torch.full((steps,), batch, dtype=torch.int64, device="cpu"))
    return sizes


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One fused LSTM step, as torch's `_VF.lstm_cell`: input [B, I], hx = (h [B, H], c [B, H]) -> (h', c').

    Under CPU autocast the results take torch's dtypes (see `_autocast_result_dtype`)."""
    dtype = _autocast_result_dtype(input, hx[1])
    if dtype is not None:
        with torch.autocast("cpu", enabled=False):
            input, h, c, w_ih, w_hh, b_ih, b_hh = _cast_optional((input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh), dtype)
            return lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    if input.dtype == torch.float16:  # computed in float32, as lstm_packed does
        h, c = lstm_cell(input.float(), (hx[0].float(), hx[1].float()), w_ih.float(), w_hh.float(),
                         None if b_ih is None else b_ih.float(), None if b_hh is None else b_hh.float())
        return h.half(), c.half()
    batch_sizes = _constant_batch_sizes(1, input.shape[0])
    h, _, c = lstm_layer(input, batch_sizes, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
    return h, c
