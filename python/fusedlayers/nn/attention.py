"""`MultiheadAttention` with torch.nn's interface on the fused attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional.multihead import multi_head_attention_forward


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None)`: the same
    parameters and state_dict, `forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights)`.

    With need_weights=False (the fast case) the attention runs in the fused kernel; need_weights=True has to
    materialise the weights and runs torch's path. A query that may attend to no key (every key masked)
    gives zeros where torch gives NaN.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        # Where torch's inference fast path takes the call, it accepts nested tensors and rejects a padding mask
        # of the wrong shape with its own error: torch's forward does both. It also ignores a causal hint that
        # comes without its mask (elsewhere torch raises for it): so do we.
        if (query.is_nested or key_padding_mask is not None or is_causal) and self._torch_takes_fast_path(
                query, key, value, key_padding_mask, attn_mask):
            wrong_padding = key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(query.shape[:2])
            if query.is_nested or wrong_padding:
                return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                                       attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                       is_causal=is_causal)
            if attn_mask is None:
                is_causal = False
        batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and batched:
            # [batch, len, embed] -> [len, batch, embed], keeping the identities torch's packed projection uses
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, _ = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k,
            self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
            use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, None

    def _torch_takes_fast_path(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                               attn_mask: Tensor | None) -> bool:
        """Whether torch.nn.MultiheadAttention.forward (torch 2.13) would run its native inference kernel here
        (its why_not_fast_path checks, in its order)."""
        if any(m is not None and torch.is_floating_point(m) for m in (attn_mask, key_padding_mask)):
            return False
        tensors = (query, key, value, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                   self.out_proj.bias)
        return (torch.backends.mha.get_fastpath_enabled() and query.dim() == 3 and query is key and key is value
                and self.in_proj_weight is not None and self.in_proj_bias is not None
                and query.dtype == self.in_proj_weight.dtype and not self.training and self.num_heads % 2 == 0
                and self.batch_first and self.bias_k is None and self.bias_v is None and not self.add_zero_attn
                and self._qkv_same_embed_dim
                and not (query.is_nested and (key_padding_mask is not None or attn_mask is not None))
                and not torch.is_autocast_enabled() and not torch.overrides.has_torch_function(tensors)
                and all(t is None or t.device.type in ("cpu", "cuda", "xpu") for t in tensors)
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
                and not _make_fx_tracing())


def _make_fx_tracing() -> bool:
    """torch's own test (a private helper of torch.nn.modules.activation), False where it is missing."""
    check = getattr(torch.nn.modules.activation, "_is_make_fx_tracing", None)
    return bool(check()) if check is not None else False
