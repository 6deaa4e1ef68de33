"""Luong et al. (2015) attention of decoder states over encoder states: dot, general and concat scores; global,
local-m and local-p attention; the attentional hidden state."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional.additive import additive_attention
from ..functional.attention import scaled_dot_product_attention
from ..functional.linear import linear

_SCORES = ("dot", "general", "concat")
_MODES = ("global", "local-m", "local-p")


class LuongAttention(nn.Module):
    """Luong et al. (2015) attention, on the fused kernels.

        score(h_t, h_s) = h_t . h_s                 ("dot")
                        = h_t . (W_a h_s)           ("general")
                        = v_a . tanh(W_a [h_t; h_s]) ("concat", the additive kernel)
        global:  a_t = softmax over every source position
        local-m: a_t = softmax over s in [t - D, t + D]  (monotonic alignment p_t = t)
        local-p: p_t = S_b * sigmoid(v_p . tanh(W_p h_t)) (S_b: the source's length, from source_mask), and
                 a_t(s) = softmax over the integer s in [p_t - D, p_t + D] of score, times
                 exp(-(s - p_t)^2 / (2 (D/2)^2)); gradients flow into p_t through the Gaussian
        c_t = sum_s a_t(s) h_s
        out = tanh(W_c [c_t; h_t])                  (the attentional hidden state; attentional=False: out = c_t)

    forward(query [batch, T, hidden], source [batch, S, hidden], source_mask=None [batch, S], True = may attend;
    a padded source must be left-aligned) -> (out [batch, T, hidden], context [batch, T, hidden]).
    Local attention only touches its window: O(D) per query, not O(S). A query whose window holds no valid
    source position gets a zero context.
    """

    def __init__(self, hidden_size: int, score: str = "general", mode: str = "global", window: int = 10,
                 attentional: bool = True, device=None, dtype=None):
        super().__init__()
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode != "global" and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
            raise ValueError(f"window must be an int >= 0 for local attention, got {window!r}")
        if mode == "local-p" and window < 1:
            raise ValueError(f"window must be >= 1 for local-p (the Gaussian's width is window / 2), got {window}")
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.score, self.mode, self.window = hidden_size, score, mode, window
        self.attentional = attentional
        self.W_a = None
        if score == "general":
            self.W_a = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        elif score == "concat":
            self.W_a = nn.Linear(2 * hidden_size, hidden_size, bias=False, **kw)
            self.v_a = nn.Parameter(torch.empty(hidden_size, **kw))
            nn.init.uniform_(self.v_a, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        if mode == "local-p":
            self.W_p = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
            self.v_p = nn.Parameter(torch.empty(hidden_size, **kw))
            nn.init.uniform_(self.v_p, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        self.W_c = nn.Linear(2 * hidden_size, hidden_size, bias=False, **kw) if attentional else None

    def _check(self, query: Tensor, source: Tensor, source_mask: Tensor | None) -> None:
        for name, t in (("query", query), ("source", source)):
            if t.dim() != 3 or t.shape[2] != self.hidden_size:
                raise ValueError(f"LuongAttention: {name} must have shape [batch, length, {self.hidden_size}], "
                                 f"got {list(t.shape)}")
        if query.shape[0] != source.shape[0]:
            raise ValueError(f"LuongAttention: query and source batch sizes differ ({query.shape[0]} and "
                             f"{source.shape[0]})")
        if source_mask is not None and (source_mask.dtype != torch.bool or
                                        tuple(source_mask.shape) != (source.shape[0], source.shape[1])):
            raise ValueError(f"LuongAttention: source_mask must be a bool tensor of shape "
                             f"[{source.shape[0]}, {source.shape[1]}], got {source_mask.dtype} "
                             f"{list(source_mask.shape)}")

    def _concat_halves(self) -> tuple[Tensor, Tensor]:
        h = self.hidden_size
        return self.W_a.weight[:, :h], self.W_a.weight[:, h:]

    def forward(self, query: Tensor, source: Tensor, source_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(query, source, source_mask)
        if self.mode == "local-p":
            context = self._local_p(query, source, source_mask)
        else:
            context = self._global_or_monotonic(query, source, source_mask)
        if self.W_c is None:
            return context, context
        return torch.tanh(linear(torch.cat([context, query], dim=2), self.W_c.weight)), context

    def _global_or_monotonic(self, query: Tensor, source: Tensor, source_mask: Tensor | None) -> Tensor:
        window = None
        if self.mode == "local-m":  # no query sees past position T - 1 + D: project and attend only up to it
            end = min(source.shape[1], query.shape[1] + self.window)
            source = source[:, :end]
            source_mask = source_mask[:, :end] if source_mask is not None else None
            window = (self.window, self.window)
        mask = source_mask[:, None, :] if source_mask is not None else None
        if self.score == "concat":
            w_query, w_source = self._concat_halves()
            context, _ = additive_attention(linear(query, w_query.contiguous()), linear(source, w_source.contiguous()),
                                            source, self.v_a, attn_mask=mask, window=window)
            return context
        if self.W_a is not None and query.shape[1] < source.shape[1]:
            # h_t . (W_a h_s) = (W_a^T h_t) . h_s: project the T queries instead of the S source rows.
            query = linear(query, self.W_a.weight.t().contiguous())
            return scaled_dot_product_attention(query, source, source, attn_mask=mask, scale=1.0, window=window)
        keys = source if self.W_a is None else linear(source, self.W_a.weight)
        return scaled_dot_product_attention(query, keys, source, attn_mask=mask, scale=1.0, window=window)

    def _local_p(self, query: Tensor, source: Tensor, source_mask: Tensor | None) -> Tensor:
        batch, steps, hidden = query.shape
        length = source.shape[1]
        d = self.window
        lengths = (source_mask.sum(1) if source_mask is not None
                   else torch.full((batch,), length, device=query.device)).to(query.dtype)
        centre = lengths[:, None] * torch.sigmoid(linear(torch.tanh(linear(query, self.W_p.weight)), self.v_p[None])
                                                  .squeeze(-1))  # p_t [batch, T]
        # The integer positions in [p_t - D, p_t + D]: at most 2D + 1, from ceil(p_t - D).
        first = torch.ceil(centre.detach() - d).long()
        positions = first[..., None] + torch.arange(2 * d + 1, device=query.device)  # [batch, T, 2D+1]
        valid = (positions >= 0) & (positions < lengths.long()[:, None, None]) & (positions <= centre.detach()[..., None] + d)
        if length == 0:
            return query.new_zeros(batch, steps, hidden)
        if source_mask is not None:
            index = (positions.clamp(0, length - 1) + torch.arange(batch, device=query.device)[:, None, None]
                     * length)
            valid = valid & source_mask.flatten()[index.flatten()].view_as(valid)
        sigma = d / 2
        gauss = torch.exp(-(positions.to(query.dtype) - centre[..., None]) ** 2 / (2 * sigma * sigma))
        if self.score != "concat" and query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64):
            # The fused kernel reads each window's rows in place: general scores h_t . (W_a h_s) are
            # (W_a^T h_t) . h_s, so only the T queries are projected, never the S source rows.
            scoring = query if self.W_a is None else linear(query, self.W_a.weight.t().contiguous())
            context, _ = torch.ops.fusedlayers.window_attention(scoring, source, gauss, first, valid)
            return context
        index = positions.clamp(0, max(length - 1, 0))
        flat = (index + torch.arange(batch, device=query.device)[:, None, None] * length).flatten()
        window_rows = source.reshape(batch * length, hidden).index_select(0, flat).view(batch, steps, 2 * d + 1, hidden)
        scores = self._window_scores(query, source, window_rows, flat)
        # Rows with no valid position get a finite softmax (then zeroed), so their gradients stay finite.
        fill = torch.where(valid.any(-1, keepdim=True), float("-inf"), 0.0)
        probs = torch.softmax(torch.where(valid, scores, fill), dim=-1) * valid
        return torch.einsum("btw,btwh->bth", probs * gauss, window_rows)

    def _window_scores(self, query: Tensor, source: Tensor, window_rows: Tensor, flat: Tensor) -> Tensor:
        """Scores [batch, T, 2D+1] of each query against its window's source rows."""
        if self.score == "dot":
            return torch.einsum("bth,btwh->btw", query, window_rows)
        if self.score == "general":  # h_t . (W_a h_s) = (W_a^T h_t) . h_s: project the T queries, not the S rows
            return torch.einsum("bth,btwh->btw", linear(query, self.W_a.weight.t().contiguous()), window_rows)
        w_query, w_source = self._concat_halves()
        batch, steps, width, hidden = window_rows.shape
        if steps * width < source.shape[1]:  # fewer window rows than source rows: project only those
            keys = linear(window_rows, w_source.contiguous())
        else:
            keys = linear(source, w_source.contiguous()).reshape(-1, hidden).index_select(0, flat).view_as(window_rows)
        return torch.tanh(linear(query, w_query.contiguous())[:, :, None, :] + keys) @ self.v_a
