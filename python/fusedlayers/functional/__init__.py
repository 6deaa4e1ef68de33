"""Fused ops as functions (autograd, torch.compile and fake tensors supported)."""

from .additive import additive_attention
from .attention import scaled_dot_product_attention
from .linear import linear
from .lstm import lstm, lstm_cell, lstm_layer, lstm_packed
from .multihead import multi_head_attention_forward

__all__ = ["additive_attention", "linear", "lstm", "lstm_cell", "lstm_layer", "lstm_packed", "multi_head_attention_forward", "scaled_dot_product_attention"]
