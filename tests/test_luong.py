"""LuongAttention (dot / general / concat scores; global, local-m, local-p) against the paper's formulas written
out naively here, over the whole source."""

import math

import pytest
import torch

import fusedlayers

TOL = dict(rtol=1e-9, atol=1e-10)


def naive_scores(m, query, source):
    if m.score == "dot":
        return query @ source.transpose(1, 2)
    if m.score == "general":
        return query @ m.W_a(source).transpose(1, 2)
    h = m.hidden_size
    both = torch.cat([query[:, :, None, :].expand(-1, -1, source.shape[1], -1),
                      source[:, None, :, :].expand(-1, query.shape[1], -1, -1)], dim=3)  # [b, t, s, 2h]
    assert both.shape[-1] == 2 * h
    return torch.tanh(m.W_a(both)) @ m.v_a


def naive_luong(m, query, source, source_mask=None):
    scores = naive_scores(m, query, source)  # [b, t, s]
    b, t_len, s_len = scores.shape
    t = torch.arange(t_len)[:, None].to(query.dtype)
    s = torch.arange(s_len)[None, :].to(query.dtype)
    allowed = torch.ones(b, t_len, s_len, dtype=torch.bool)
    if source_mask is not None:
        allowed = allowed & source_mask[:, None, :]
    if m.mode == "local-m":
        allowed = allowed & (s >= t - m.window) & (s <= t + m.window)
    gauss = 1.0
    if m.mode == "local-p":
        lengths = source_mask.sum(1).to(query.dtype) if source_mask is not None else torch.full((b,), float(s_len),
                                                                                                 dtype=query.dtype)
        p = lengths[:, None] * torch.sigmoid(torch.tanh(m.W_p(query)) @ m.v_p)  # [b, t]
        pos = s[None]  # [1, 1, s]
        allowed = allowed & (pos >= p[..., None] - m.window) & (pos <= p[..., None] + m.window)
        gauss = torch.exp(-(pos - p[..., None]) ** 2 / (2 * (m.window / 2) ** 2))
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0) * gauss
    context = weights @ source
    if m.W_c is None:
        return context, context
    return torch.tanh(m.W_c(torch.cat([context, query], dim=2))), context


def check_against_naive(m, query, source, mask):
    out, ctx = m(query, source, mask)
    ref_out, ref_ctx = naive_luong(m, query, source, mask)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(ctx, ref_ctx, **TOL)
    params = list(m.parameters())
    g1 = torch.autograd.grad(out.square().sum(), [query, source, *params])
    g2 = torch.autograd.grad(ref_out.square().sum(), [query, source, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("mode,window", [("global", 0), ("local-m", 0), ("local-m", 2), ("local-m", 50),
                                         ("local-p", 1), ("local-p", 3), ("local-p", 40)])
@pytest.mark.parametrize("attentional", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_luong_matches_naive_formula(score, mode, window, attentional, masked):
    torch.manual_seed(0)
    m = fusedlayers.nn.LuongAttention(6, score=score, mode=mode, window=window, attentional=attentional,
                                      dtype=torch.float64)
    query = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    source = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0] = False  # a sequence with no valid source position: zero context
        mask[1, 6:] = False  # a shorter, left-aligned sequence
        if mode != "local-p":
            mask[2] = torch.rand(9) > 0.3  # holes (local-p reads lengths from the mask: padding only)
    check_against_naive(m, query, source, mask)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_local_p_gradcheck(score):
    torch.manual_seed(1)
    m = fusedlayers.nn.LuongAttention(3, score=score, mode="local-p", window=2, dtype=torch.float64)
    query = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    source = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, s: m(q, s)[0], (query, source))


def test_local_p_gradient_reaches_the_predicted_position():
    torch.manual_seed(2)
    m = fusedlayers.nn.LuongAttention(4, score="dot", mode="local-p", window=3, dtype=torch.float64)
    out, _ = m(torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 12, 4, dtype=torch.float64))
    out.sum().backward()
    assert m.W_p.weight.grad.abs().sum() > 0 and m.v_p.grad.abs().sum() > 0


def test_local_attention_touches_only_its_window():
    """Source rows outside every window get exactly zero gradient (they are never read)."""
    torch.manual_seed(3)
    for mode in ("local-m", "local-p"):
        m = fusedlayers.nn.LuongAttention(4, score="concat", mode=mode, window=1, dtype=torch.float64)
        source = torch.randn(1, 40, 4, dtype=torch.float64, requires_grad=True)
        out, _ = m(torch.randn(1, 2, 4, dtype=torch.float64), source)
        out.sum().backward()
        touched = (source.grad.abs().sum(-1) > 0).sum().item()
        assert touched <= 2 * 3, (mode, touched)


def test_concat_global_compiles():
    torch.manual_seed(0)
    m = fusedlayers.nn.LuongAttention(8, score="concat", mode="global")
    q, s = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, s), m(q, s)):
        torch.testing.assert_close(a, b)


def test_luong_bad_arguments():
    with pytest.raises(ValueError, match="score must be one of"):
        fusedlayers.nn.LuongAttention(4, score="additive")
    with pytest.raises(ValueError, match="mode must be one of"):
        fusedlayers.nn.LuongAttention(4, mode="local")
    with pytest.raises(ValueError, match="window must be >= 1 for local-p"):
        fusedlayers.nn.LuongAttention(4, mode="local-p", window=0)
    with pytest.raises(ValueError, match="window must be an int"):
        fusedlayers.nn.LuongAttention(4, mode="local-m", window=-1)
    m = fusedlayers.nn.LuongAttention(4)
    with pytest.raises(ValueError, match=r"query must have shape \[batch, length, 4\]"):
        m(torch.randn(2, 3, 5), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="source_mask must be a bool tensor"):
        m(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(torch.randn(2, 3, 4), torch.randn(3, 5, 4))


def _window_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 5, generator=g, dtype=dtype, requires_grad=True)
    source = torch.randn(2, 8, 5, generator=g, dtype=dtype, requires_grad=True)
    factor = torch.rand(2, 3, 4, generator=g, dtype=dtype, requires_grad=True)
    first = torch.tensor([[-2, 0, 5], [1, 4, 6]])
    positions = first[..., None] + torch.arange(4)
    valid = (positions >= 0) & (positions < 8)
    valid[1, 1] = False  # a window with nothing valid
    return query, source, factor, first, valid


def test_window_op_opcheck_and_gradcheck():
    args = _window_args()
    torch.library.opcheck(torch.ops.fusedlayers.window_attention.default, args)
    torch.library.opcheck(torch.ops.fusedlayers.window_attention.default,
                          tuple(a.detach().float() if a.is_floating_point() else a for a in args))
    assert torch.autograd.gradcheck(lambda q, s, f: torch.ops.fusedlayers.window_attention(q, s, f, *args[3:])[0],
                                    args[:3])


def test_window_op_refuses_positions_outside_the_source():
    query, source, factor, first, valid = _window_args()
    valid = torch.ones_like(valid)
    with pytest.raises(RuntimeError, match="outside the source"):
        torch.ops.fusedlayers.window_attention(query, source, factor, first, valid)


@pytest.mark.parametrize("mode,window", [("global", 0), ("local-m", 1), ("local-p", 2)])
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_batch_of_one_and_windows_at_the_edges(mode, window, score):
    """One sequence; a one-row source (every window spills over both edges) and a source shorter than a window."""
    torch.manual_seed(5)
    m = fusedlayers.nn.LuongAttention(4, score=score, mode=mode, window=window, dtype=torch.float64)
    for source_len in (1, 3):
        query = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
        source = torch.randn(1, source_len, 4, dtype=torch.float64, requires_grad=True)
        check_against_naive(m, query, source, None)


@pytest.mark.parametrize("mode", ["global", "local-m", "local-p"])
def test_empty_source(mode):
    m = fusedlayers.nn.LuongAttention(4, mode=mode, window=2, attentional=False)
    out, _ = m(torch.randn(2, 3, 4), torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 3, 4) and not out.any()
