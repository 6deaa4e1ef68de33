"""Drop-in replacements for torch.nn layers: same constructor arguments, parameter names and state_dict."""

from .attention import MultiheadAttention
from .lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention"]
