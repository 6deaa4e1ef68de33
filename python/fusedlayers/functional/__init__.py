"""Fused ops as functions (autograd, torch.compile and fake tensors supported)."""

from .attention import scaled_dot_product_attention
from .lstm import lstm, lstm_cell, lstm_layer, lstm_packed

__all__ = ["lstm", "lstm_cell", "lstm_layer", "lstm_packed", "scaled_dot_product_attention"]
