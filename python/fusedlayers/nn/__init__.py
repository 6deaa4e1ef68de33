"""Drop-in replacements for torch.nn layers: same constructor arguments, parameter names and state_dict."""

from .attention import MultiheadAttention
from .linear import Linear
from .lstm import LSTM, LSTMCell
from .additive import AdditiveAttention, BahdanauAttention
from .luong import LuongAttention
from .self_attention import AttentionBlock, SelfAttention2d
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "AdditiveAttention", "AttentionBlock", "BahdanauAttention", "LSTM", "LSTMCell", "Linear", "LuongAttention", "MultiheadAttention", "SelfAttention2d", "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]
