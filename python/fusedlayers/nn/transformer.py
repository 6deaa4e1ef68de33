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
        # torch.nn.TransformerEncoder's inference fast path packs padded batches as nested tensors, and torch's
        # native layer rejects a padding mask of the wrong shape with its own error: both go to torch's forward.
        wrong_padding = (src_key_padding_mask is not None and not src.is_nested
                         and tuple(src_key_padding_mask.shape) != tuple(src.shape[:2]))
        if src.is_nested or (wrong_padding and self._torch_takes_fast_path(src)):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        if is_causal and src_mask is None and self._torch_takes_fast_path(src):
            is_causal = False  # torch's inference fast path ignores a causal hint that comes without its mask
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


    def _torch_takes_fast_path(self, src: Tensor) -> bool:
        """Whether torch.nn.TransformerEncoderLayer.forward (torch 2.13) would run its fused inference path here
        (its why_not_sparsity_fast_path checks, for an input without src_mask)."""
        attn = self.self_attn
        tensors = (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                   self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias, self.linear1.weight,
                   self.linear1.bias, self.linear2.weight, self.linear2.bias)
        return (torch.backends.mha.get_fastpath_enabled() and src.dim() == 3 and not self.training
                and attn.batch_first and attn.in_proj_bias is not None and attn._qkv_same_embed_dim
                and bool(self.activation_relu_or_gelu) and self.norm1.eps == self.norm2.eps
                and attn.num_heads % 2 == 0 and not torch.is_autocast_enabled()
                and not any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules())
                and not torch.overrides.has_torch_function(tensors)
                and all(t.device.type in ("cpu", "cuda", "xpu") for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for `torch.nn.TransformerDecoderLayer` (same constructor), `forward(tgt, memory, tgt_mask=None,
    memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False,
    memory_is_causal=False)`: torch's forward, with both attentions fused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)

    _adopt_children = staticmethod(_adopt)
