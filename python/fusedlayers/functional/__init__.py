"""Fused ops as functions (autograd, torch.compile and fake tensors supported)."""

from .lstm import lstm, lstm_cell, lstm_layer, lstm_packed

__all__ = ["lstm", "lstm_cell", "lstm_layer", "lstm_packed"]
