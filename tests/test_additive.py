"""Additive (Bahdanau) attention: the fused op and AdditiveAttention against the naive formula written here,
which builds the [batch, queries, keys, hidden] tanh tensor."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fusedlayers
from fusedlayers.functional import additive_attention

TOL64 = dict(rtol=1e-9, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=2e-4)  # sums over thousands of terms, fast tanh (2e-6)


def naive(query, key, value, score, allowed=None):
    scores = torch.tanh(query[:, :, None, :] + key[:, None, :, :]) @ score  # [b, q, k]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: zeros, as ours
    return weights @ value, weights


def window_mask(q_len, kv_len, left, right):
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    return (j >= i - left) & (j <= i + right)


def inputs(b, q_len, kv_len, hidden, v_dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(b, q_len, hidden), make(b, kv_len, hidden), make(b, kv_len, v_dim), make(hidden)


def check(args, allowed=None, window=None, tol=TOL64, weights_grad=True):
    ctx, w = additive_attention(*args, attn_mask=allowed, window=window)
    full = allowed
    if window is not None:
        band = window_mask(args[0].shape[1], args[1].shape[1], *window)
        full = band if full is None else full & band
    ref_ctx, ref_w = naive(*args, allowed=full)
    torch.testing.assert_close(ctx, ref_ctx, **tol)
    torch.testing.assert_close(w, ref_w, **tol)
    g_ctx = torch.randn_like(ctx)
    g_w = torch.randn_like(w) if weights_grad else torch.zeros_like(w)
    ours = torch.autograd.grad((ctx * g_ctx).sum() + (w * g_w).sum(), args)
    ref = torch.autograd.grad((ref_ctx * g_ctx).sum() + (ref_w * g_w).sum(), args)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 3), (1, 1, 1, 1, 1), (3, 40, 33, 16, 8), (2, 70, 300, 37, 5),
                                   (1, 2, 9, 17, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive(shape, dtype):
    check(inputs(*shape, dtype=dtype), tol=TOL64 if dtype == torch.float64 else TOL32)


@pytest.mark.parametrize("mask_shape", ["key padding", "full"])
def test_masks_and_empty_rows(mask_shape):
    args = inputs(3, 6, 11, 8, 4)
    g = torch.Generator().manual_seed(1)
    if mask_shape == "key padding":
        allowed = torch.rand(3, 1, 11, generator=g) > 0.4
        allowed[1] = False  # a batch with no key at all: zero weights and context
    else:
        allowed = torch.rand(3, 6, 11, generator=g) > 0.6
        allowed[0, 2] = False
    check(args, allowed=allowed)
    ctx, w = additive_attention(*args, attn_mask=allowed)
    empty = ~allowed.expand(3, 6, 11).any(-1)
    assert empty.any() and (ctx[empty] == 0).all() and (w[empty] == 0).all()


@pytest.mark.parametrize("window", [(0, 0), (2, 1), (None, 0), (3, None), (50, 50)])
def test_window(window):
    bounds = tuple(10**6 if b is None else b for b in window)
    args = inputs(2, 9, 13, 5, 3)
    ctx, w = additive_attention(*args, window=window)
    ref_ctx, ref_w = naive(*args, allowed=window_mask(9, 13, *bounds))
    torch.testing.assert_close(ctx, ref_ctx, **TOL64)
    torch.testing.assert_close(w, ref_w, **TOL64)
    check(args, window=bounds)


def test_gradcheck():
    args = inputs(2, 3, 5, 4, 2)
    allowed = torch.tensor([[True, False, True, True, False]]).expand(2, 1, 5)
    assert torch.autograd.gradcheck(lambda *a: additive_attention(*a, attn_mask=allowed), args)
    assert torch.autograd.gradcheck(lambda *a: additive_attention(*a, window=(1, 0)), args)


def test_opcheck():
    q, k, v, s = inputs(2, 4, 6, 5, 3)
    mask = (torch.rand(2, 1, 6) > 0.3).expand(2, 4, 6)
    torch.library.opcheck(torch.ops.fusedlayers.additive_attention.default, (q, k, s, v, mask, -1, -1))
    torch.library.opcheck(torch.ops.fusedlayers.additive_attention.default, (q, k, s, v, None, 1, 2))
    q, k, v, s = (t.detach().float() for t in (q, k, v, s))
    torch.library.opcheck(torch.ops.fusedlayers.additive_attention.default, (q, k, s, v, None, -1, -1))


def test_compile_fullgraph():
    q, k, v, s = (t.detach().float() for t in inputs(2, 4, 6, 5, 3))
    fn = torch.compile(lambda *a: additive_attention(*a), fullgraph=True, backend="aot_eager")
    for a, b in zip(fn(q, k, v, s), additive_attention(q, k, v, s)):
        torch.testing.assert_close(a, b)


def test_bfloat16_runs_in_float32():
    q, k, v, s = (t.detach().bfloat16() for t in inputs(2, 4, 6, 8, 3))
    ctx, w = additive_attention(q, k, v, s)
    assert ctx.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    ref_ctx, _ = naive(*(t.float() for t in (q, k, v, s)))
    torch.testing.assert_close(ctx.float(), ref_ctx, rtol=2e-2, atol=2e-2)


def test_bad_input():
    q, k, v, s = (t.detach() for t in inputs(2, 4, 6, 5, 3))
    with pytest.raises(ValueError, match="query must be 3-D"):
        additive_attention(q[0], k, v, s)
    with pytest.raises(ValueError, match=r"score must have shape \[5\]"):
        additive_attention(q, k, v, s[:4])
    with pytest.raises(ValueError, match="key must have the queries' hidden size 5"):
        additive_attention(q, k[..., :4], v, s)
    with pytest.raises(ValueError, match="value"):
        additive_attention(q, k, v[:, :5], s)
    with pytest.raises(TypeError, match="one dtype"):
        additive_attention(q, k.float(), v, s)
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        additive_attention(q, k, v, s, attn_mask=torch.ones(2, 4, 6))
    with pytest.raises(ValueError, match="does not broadcast"):
        additive_attention(q, k, v, s, attn_mask=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="window"):
        additive_attention(q, k, v, s, window=(-1, 2))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), q_len=st.integers(1, 20), kv_len=st.integers(1, 40), hidden=st.integers(1, 40),
       v_dim=st.integers(1, 9), masked=st.booleans(), window=st.sampled_from([None, (0, 0), (3, 1), (1, 5)]),
       seed=st.integers(0, 2**16))
def test_hypothesis_against_naive(b, q_len, kv_len, hidden, v_dim, masked, window, seed):
    args = inputs(b, q_len, kv_len, hidden, v_dim, seed=seed)
    allowed = None
    if masked:
        allowed = torch.rand(b, 1, kv_len, generator=torch.Generator().manual_seed(seed)) > 0.3
    check(args, allowed=allowed, window=window)


# ------------------------------------------------------------------------------------------- the module
def naive_module(m, query, key, value, key_padding_mask=None):
    allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, :]
    return naive(m.query_proj(query), m.key_proj(key), value, m.v, allowed)


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_naive(bias):
    torch.manual_seed(0)
    m = fusedlayers.nn.AdditiveAttention(6, 5, 7, bias=bias, dtype=torch.float64)
    query = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    key = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    value = torch.randn(3, 8, 2, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[1, 5:] = True
    ctx, w = m(query, key, value, key_padding_mask=padding)
    ref_ctx, ref_w = naive_module(m, query, key, value, padding)
    torch.testing.assert_close(ctx, ref_ctx, **TOL64)
    torch.testing.assert_close(w, ref_w, **TOL64)
    params = [query, key, value, *m.parameters()]
    for a, b in zip(torch.autograd.grad(ctx.square().sum(), params), torch.autograd.grad(ref_ctx.square().sum(), params)):
        torch.testing.assert_close(a, b, **TOL64)


def test_module_decoder_step_and_default_value():
    torch.manual_seed(0)
    m = fusedlayers.nn.AdditiveAttention(6, 5, 7, dtype=torch.float64)
    assert fusedlayers.nn.BahdanauAttention is fusedlayers.nn.AdditiveAttention
    query, key = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 8, 5, dtype=torch.float64)
    ctx, w = m(query, key)  # one decoder step, batch of one; value defaults to key
    assert ctx.shape == (1, 5) and w.shape == (1, 8)
    ref_ctx, ref_w = naive_module(m, query[:, None], key, key)
    torch.testing.assert_close(ctx, ref_ctx[:, 0], **TOL64)
    assert set(m.state_dict()) == {"query_proj.weight", "query_proj.bias", "key_proj.weight", "v"}


def test_module_bad_input():
    m = fusedlayers.nn.AdditiveAttention(6, 5, 7)
    with pytest.raises(ValueError, match=r"query must have shape \[batch, q_len, 6\]"):
        m(torch.randn(2, 3, 4), torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"key must have shape \[2, kv_len, 5\]"):
        m(torch.randn(2, 3, 6), torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="value must have shape"):
        m(torch.randn(2, 3, 6), torch.randn(2, 8, 5), torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        m(torch.randn(2, 3, 6), torch.randn(2, 8, 5), key_padding_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        fusedlayers.nn.AdditiveAttention(6, 5, 0)


def test_empty_batch_and_unbounded_windows():
    q, k, v, s = inputs(0, 5, 6, 8, 3)
    additive_attention(q, k, v, s)[0].sum().backward()
    assert s.grad is not None and not s.grad.any()
    args = tuple(t.detach() for t in inputs(2, 5, 7, 4, 3))
    for window in ((None, 2**63 - 1), (2**63 - 1, 2**63 - 1)):  # bounds near the int64 limit must not overflow
        torch.testing.assert_close(additive_attention(*args, window=window)[0], additive_attention(*args)[0])
