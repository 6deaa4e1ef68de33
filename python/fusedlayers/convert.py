"""`convert(model)`: swap the torch layers we replace for ours, in place, keeping their weights."""

from __future__ import annotations

import torch

from . import nn as fnn


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _take_over(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """new takes old's own parameter and buffer objects (so an optimizer built before the conversion, frozen
    parameters and shared weights keep working), its submodules, its hooks and its train/eval mode."""
    for name, param in old._parameters.items():
        setattr(new, name, param)  # through __setattr__: RNNBase refreshes its flat weight list
    for name, buffer in old._buffers.items():
        new._buffers[name] = buffer
    for name, child in old._modules.items():
        new._modules[name] = child
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))
    new.train(old.training)
    left = [name for name, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left:  # built on the meta device: every tensor must have come from old
        raise RuntimeError(f"convert: {type(old).__name__} has no tensors for {left}")
    return new


def _lstm_from(m: torch.nn.LSTM) -> fnn.LSTM:
    new = fnn.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                   dropout=m.dropout, bidirectional=m.bidirectional, proj_size=m.proj_size, device="meta")
    return _take_over(new, m)


def _lstm_cell_from(m: torch.nn.LSTMCell) -> fnn.LSTMCell:
    return _take_over(fnn.LSTMCell(m.input_size, m.hidden_size, bias=m.bias, device="meta"), m)


def _mha_from(m: torch.nn.MultiheadAttention) -> fnn.MultiheadAttention:
    new = fnn.MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                                 add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim,
                                 vdim=m.vdim, batch_first=m.batch_first, device="meta")
    return _take_over(new, m)


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
    the fusedlayers equivalent, and returns the model. The new layers hold the very same parameter and buffer
    objects (an optimizer built before the conversion keeps working; frozen parameters stay frozen), submodules
    and hooks. A module held under several names (in one parent or in several) is replaced once: every name
    then holds the one new module, as every name held the old one."""
    return _convert(model, {})


def _convert(module: torch.nn.Module, done: dict[int, torch.nn.Module]) -> torch.nn.Module:
    # done: id of each module seen -> what replaces it (itself if nothing does).
    seen = done.get(id(module))
    if seen is not None:
        return seen
    factory = _REPLACEMENTS.get(type(module))
    if factory is not None:
        done[id(module)] = new = factory(module)
        return new
    done[id(module)] = module
    # _modules, not named_children(), which yields a module held under two names only once.
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _convert(child, done)
            if new is not child:
                setattr(module, name, new)
    return module
