"""`convert(model)`: swap the torch layers we replace for ours, in place, keeping their weights."""

from __future__ import annotations

import torch

from . import nn as fnn


def _lstm_from(m: torch.nn.LSTM) -> fnn.LSTM:
    w = m.weight_ih_l0
    new = fnn.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                   dropout=m.dropout, bidirectional=m.bidirectional, proj_size=m.proj_size, device=w.device,
                   dtype=w.dtype)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def _lstm_cell_from(m: torch.nn.LSTMCell) -> fnn.LSTMCell:
    w = m.weight_ih
    new = fnn.LSTMCell(m.input_size, m.hidden_size, bias=m.bias, device=w.device, dtype=w.dtype)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def _mha_from(m: torch.nn.MultiheadAttention) -> fnn.MultiheadAttention:
    w = m.out_proj.weight
    new = fnn.MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                                 add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim,
                                 vdim=m.vdim, batch_first=m.batch_first, device=w.device, dtype=w.dtype)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def _adopting(cls):
    """Replacement by class change: for layers whose fusedlayers class only overrides forward (and adopts its
    submodules), the module keeps its parameters and identity."""
    def replace(m):
        m.__class__ = cls
        if hasattr(cls, "_adopt_children"):
            cls._adopt_children(m)
        return m
    return replace


# The exact torch class (not subclasses, whose forward may differ) -> a factory of our equivalent.
_REPLACEMENTS = {
    torch.nn.LSTM: _lstm_from,
    torch.nn.LSTMCell: _lstm_cell_from,
    torch.nn.MultiheadAttention: _mha_from,
    torch.nn.TransformerEncoderLayer: _adopting(fnn.TransformerEncoderLayer),
    torch.nn.TransformerDecoderLayer: _adopting(fnn.TransformerDecoderLayer),
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces, in place, every `torch.nn.LSTM`, `LSTMCell`, `MultiheadAttention`, `TransformerEncoderLayer` and
    `TransformerDecoderLayer` inside `model` (and `model` itself) by
    the fusedlayers equivalent with the same weights, and returns the model. Parameters are copied, so an
    optimizer built before the conversion must be rebuilt."""
    factory = _REPLACEMENTS.get(type(model))
    if factory is not None:
        return factory(model)
    for name, child in model.named_children():
        setattr(model, name, convert(child))
    return model
