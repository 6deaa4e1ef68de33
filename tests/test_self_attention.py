"""SelfAttention2d (SAGAN) and AttentionBlock (SNAIL) against naive torch formulas written here."""

import math

import pytest
import torch

import fusedlayers
from fusedlayers.nn import AttentionBlock, SelfAttention2d

TOL = dict(rtol=1e-9, atol=1e-10)


def naive_sagan(m: SelfAttention2d, x):
    b, c, h, w = x.shape
    f = torch.nn.functional.conv2d(x, m.f.weight, m.f.bias).flatten(2)  # [b, c', n]
    g = torch.nn.functional.conv2d(x, m.g.weight, m.g.bias).flatten(2)
    v = torch.nn.functional.conv2d(x, m.h.weight, m.h.bias).flatten(2)  # [b, c, n]
    beta = torch.softmax(f.transpose(1, 2) @ g, dim=-1)  # [b, n(query), n(key)]
    o = (beta @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
    return m.gamma * o + x


def naive_snail(m: AttentionBlock, x):
    q, k, v = m.query(x), m.key(x), m.value(x)
    scores = q @ k.transpose(1, 2) / math.sqrt(m.key_size)
    t = x.shape[1]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.cat([x, torch.softmax(scores, dim=-1) @ v], dim=2)


@pytest.mark.parametrize("channels,height,width,reduction", [(16, 4, 5, 8), (8, 1, 1, 8), (24, 7, 3, 4), (3, 2, 2, 8)])
def test_sagan_matches_naive_formula(channels, height, width, reduction):
    torch.manual_seed(0)
    m = SelfAttention2d(channels, reduction=reduction, dtype=torch.float64)
    assert m.gamma.item() == 0.0
    with torch.no_grad():
        m.gamma.fill_(0.7)  # gamma starts at 0, which would hide the attention branch
    x = torch.randn(2, channels, height, width, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), naive_sagan(m, x)
    torch.testing.assert_close(out, ref, **TOL)
    params = list(m.parameters())
    g1 = torch.autograd.grad(out.square().sum(), [x, *params])
    g2 = torch.autograd.grad(ref.square().sum(), [x, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)


def test_sagan_gradcheck_and_bad_input():
    torch.manual_seed(0)
    m = SelfAttention2d(8, dtype=torch.float64)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    with pytest.raises(ValueError, match=r"\[batch, 8, height, width\]"):
        m(torch.randn(1, 7, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("batch,time", [(1, 1), (2, 9), (3, 130)])
def test_snail_block_matches_naive_formula(batch, time):
    torch.manual_seed(0)
    m = AttentionBlock(6, key_size=5, value_size=4, dtype=torch.float64)
    x = torch.randn(batch, time, 6, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), naive_snail(m, x)
    assert out.shape == (batch, time, 10)
    torch.testing.assert_close(out, ref, **TOL)
    params = list(m.parameters())
    for a, b in zip(torch.autograd.grad(out.sum(), [x, *params]), torch.autograd.grad(ref.sum(), [x, *params])):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match=r"\[batch, time, 6\]"):
        m(torch.randn(2, 3, 5, dtype=torch.float64))


def test_layers_compile_and_run_in_float32():
    torch.manual_seed(0)
    m = fusedlayers.nn.SelfAttention2d(16)
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x))
