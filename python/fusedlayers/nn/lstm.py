"""`LSTM` and `LSTMCell` with torch.nn's interface, running the fused kernels.

`LSTM` derives from `torch.nn.RNNBase` (not `torch.nn.LSTM`, which torch.compile refuses to trace), so its
parameters, `state_dict`, `flatten_parameters()` and repr are torch's own; `LSTMCell` derives from
`torch.nn.LSTMCell`. Only `forward` is ours.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import functional as FL
from ..functional.lstm import zero_states


def _permute(t: Tensor, permutation: Tensor | None) -> Tensor:
    return t if permutation is None else t.index_select(1, permutation)


class LSTM(torch.nn.RNNBase):
    """Drop-in for `torch.nn.LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)`: the same arguments, parameters
    (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `weight_hr_l0`, `..._reverse`), `state_dict`,
    inputs (padded, batch_first, unbatched or PackedSequence) and outputs `(output, (h_n, c_n))`.

    Each layer and direction runs its whole time loop in one fused C++ kernel; a PackedSequence costs work in
    proportion to the sum of its lengths. Dtypes: float32, float64, bfloat16 (and float16, computed in float32).
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Tensor | None) -> tuple[int, int, int]:
        batch = int(batch_sizes[0]) if batch_sizes is not None else input.size(0 if self.batch_first else 1)
        return (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)

    def check_forward_args(self, input: Tensor, hidden: tuple[Tensor, Tensor], batch_sizes: Tensor | None):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx: tuple[Tensor, Tensor], permutation: Tensor | None) -> tuple[Tensor, Tensor]:
        return _permute(hx[0], permutation), _permute(hx[1], permutation)

    def _zero_state(self, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return zero_states(((layers, batch, out_size), (layers, batch, self.hidden_size)), like)

    def _check_state_dims(self, hx, batched: bool) -> None:
        want = 3 if batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")

    def _check_state_dtypes(self, input: Tensor, hx: tuple[Tensor, Tensor]) -> None:
        autocast = torch.is_autocast_enabled("cpu")  # autocast casts every input to one dtype
        for name, t in (("hx", hx[0]), ("cx", hx[1])):
            if t.dtype != input.dtype and not autocast:
                raise RuntimeError(f"LSTM: {name} dtype ({t.dtype}) does not match input dtype ({input.dtype})")
            if t.device != input.device:
                raise RuntimeError(f"LSTM: {name} is on {t.device} but input is on {input.device}")

    def _current_weights(self) -> list[Tensor]:
        """`_flat_weights` after torch's `_update_flat_weights()`; checked by identity against the registered
        parameters first (a microsecond), since torch's own check costs several of a small call."""
        flat, params = self._flat_weights, self._parameters
        for name, weight in zip(self._flat_weights_names, flat):
            if params.get(name) is not weight:
                self._update_flat_weights()
                return self._flat_weights
        return flat

    def forward(self, input, hx=None):
        weights = self._current_weights()
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, weights)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None and not isinstance(hx, Tensor) and len(hx) > 2:  # torch's check (fewer: IndexError)
            raise RuntimeError("lstm expects two hidden states")
        if hx is None:  # a state made to measure: only the input needs checking
            self.check_input(input, None)
            hx = self._zero_state(input.size(batch_dim), input)
        else:
            self._check_state_dims(hx, batched)
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, None)
            self._check_state_dtypes(input, hx)
        if input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError("LSTM: Expected sequence length to be larger than 0 in RNN")
        output, h_n, c_n = FL.lstm(input, hx, weights, self.bias, self.num_layers,
                                   float(self.dropout), self.training, self.bidirectional, self.batch_first)
        if not batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx, weights: list[Tensor]):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        # torch checks nothing of a packed input before its kernel, whose errors are an IndexError for states
        # that are not 3-D and a RuntimeError for an input dtype other than the weights': the same types here.
        if hx is not None and (hx[0].dim() != 3 or hx[1].dim() != 3):
            raise IndexError(f"For packed input, hx and cx should be 3-D but got ({hx[0].dim()}-D, "
                             f"{hx[1].dim()}-D) tensors")
        if data.dtype != weights[0].dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(f"RNN input dtype ({data.dtype}) does not match weight dtype ({weights[0].dtype}). "
                               f"Convert input: input.to({weights[0].dtype}), or convert model: "
                               f"model.to({data.dtype})")
        if hx is None:
            hx = self._zero_state(int(batch_sizes[0]), data)
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        self._check_state_dtypes(data, hx)
        output, h_n, c_n = FL.lstm_packed(data, batch_sizes, hx[0], hx[1], weights, self.bias,
                                          self.num_layers, float(self.dropout), self.training, self.bidirectional)
        out = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return out, self.permute_hidden((h_n, c_n), unsorted_indices)


class LSTMCell(torch.nn.LSTMCell):
    """Drop-in for `torch.nn.LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)`: one fused
    step, `forward(input, hx=None) -> (h_1, c_1)`, batched [B, I] or unbatched [I] input."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if isinstance(hx, Tensor):  # torch's types and messages for a state that is not a pair
                raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor")
            if len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
            for k, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{k}] to be 1D or 2D, got {state.dim()}D instead")
            # States of another dtype than the input: torch promotes the pointwise math (a float64 cell state gives
            # float64 outputs) or raises in its products; its own cell gives exactly that.
            if any(state.dtype != input.dtype for state in hx) and not torch.is_autocast_enabled("cpu"):
                return super().forward(input, hx)
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = zero_states(((input.size(0), self.hidden_size),) * 2, input)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_cell_args(input, hx)
        h, c = FL.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_cell_args(self, input: Tensor, hx: tuple[Tensor, Tensor]) -> None:
        # The checks (and messages) of torch's own LSTM cell.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for k, state in enumerate(hx):
            if input.size(0) != state.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size "
                                   f"{state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {state.size(1)}, expected "
                                   f"{self.hidden_size}")
        if self.weight_ih.dtype != input.dtype and not torch.is_autocast_enabled("cpu"):
            raise RuntimeError(f"LSTMCell: input dtype ({input.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
