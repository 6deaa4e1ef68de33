"""`TransformerEncoderLayer` and `TransformerDecoderLayer` with torch's constructors, forward signatures and
state_dicts, running their attention on the fused kernel and their feed-forward products on the GEMM engine.

The layers are built by torch's own constructors (so parameters and their initialisation are torch's, draw for
draw) and their attention and linear submodules then become the fusedlayers subclasses of the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import MultiheadAttention
from .linear import Linear


def _adopt(layer: torch.nn.Module) -> None:
    """Turns the layer's attention and linear submodules into ours in place: our classes only override forward,
    so the parameters, buffers and state_dict keys stay exactly as torch created them."""
    for name, child in layer.named_children():
        if type(child) is torch.nn.MultiheadAttention:
            child.__class__ = MultiheadAttention
        elif type(child) is torch.nn.Linear:
            child.__class__ = Linear


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in for `torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None,
    dtype=None)`, `forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`.

    torch's inference fast path (a native fused kernel that bypasses the submodules) is not taken: every call runs
    the fused attention."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)

    _adopt_children = staticmethod(_adopt)

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:  # torch.nn.TransformerEncoder's inference fast path packs padded batches as nested
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)  # tensors: torch's kernel
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for `torch.nn.TransformerDecoderLayer` (same constructor), `forward(tgt, memory, tgt_mask=None,
    memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False,
    memory_is_causal=False)`: torch's forward, with both attentions fused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)

    _adopt_children = staticmethod(_adopt)
