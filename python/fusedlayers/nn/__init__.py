"""Drop-in replacements for torch.nn layers: same constructor arguments, parameter names and state_dict."""

from .attention import MultiheadAttention
from .linear import Linear
from .lstm import LSTM, LSTMCell
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["LSTM", "LSTMCell", "Linear", "MultiheadAttention", "TransformerDecoderLayer", "TransformerEncoderLayer"]
