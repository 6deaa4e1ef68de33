"""fusedlayers.nn.TransformerEncoderLayer / TransformerDecoderLayer / Linear against torch's with the same weights
(dropout 0 or eval mode: in training, attention dropout draws its mask from our own counter-based stream)."""

import itertools

import pytest
import torch

import fusedlayers

TOL = dict(rtol=1e-5, atol=1e-5)
OPTIONS = [dict(norm_first=nf, batch_first=bf, bias=b, activation=act, dropout=0.0, dim_feedforward=48)
           for nf, bf, b, act in itertools.product([False, True], [False, True], [True, False], ["relu", "gelu"])]


def _pair(cls_name, seed=0, **kw):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cls_name)(16, 4, **kw).double()
    torch.manual_seed(seed)
    ours = getattr(fusedlayers.nn, cls_name)(16, 4, **kw).double()
    return ref, ours


def _grads(module, inputs, out):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(out.square().sum(), [*inputs, *params])


@pytest.mark.parametrize("kw", OPTIONS, ids=str)
def test_encoder_layer_matches_torch(kw):
    ref, ours = _pair("TransformerEncoderLayer", **kw)
    for a, b in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])  # same names, same initial values
    shape = (3, 5, 16) if kw["batch_first"] else (5, 3, 16)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    for call in (dict(), dict(src_mask=mask), dict(src_mask=mask, is_causal=True),
                 dict(src_key_padding_mask=padding)):
        o1, o2 = ref(x, **call), ours(x, **call)
        torch.testing.assert_close(o2, o1, **TOL)
        for g1, g2 in zip(_grads(ref, [x], o1), _grads(ours, [x], o2)):
            torch.testing.assert_close(g2, g1, **TOL)
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("kw", OPTIONS[::3], ids=str)
def test_decoder_layer_matches_torch(kw):
    ref, ours = _pair("TransformerDecoderLayer", **kw)
    tgt_shape, mem_shape = ((3, 5, 16), (3, 7, 16)) if kw["batch_first"] else ((5, 3, 16), (7, 3, 16))
    tgt = torch.randn(*tgt_shape, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(*mem_shape, dtype=torch.float64, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    mem_padding = torch.zeros(3, 7, dtype=torch.bool)
    mem_padding[1, 5:] = True
    for call in (dict(), dict(tgt_mask=mask, tgt_is_causal=True), dict(memory_key_padding_mask=mem_padding)):
        o1, o2 = ref(tgt, mem, **call), ours(tgt, mem, **call)
        torch.testing.assert_close(o2, o1, **TOL)
        for g1, g2 in zip(_grads(ref, [tgt, mem], o1), _grads(ours, [tgt, mem], o2)):
            torch.testing.assert_close(g2, g1, **TOL)


def test_state_dicts_load_both_ways_and_convert_swaps_layers():
    ref = torch.nn.TransformerEncoderLayer(16, 4)
    ours = fusedlayers.nn.TransformerEncoderLayer(16, 4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 4), torch.nn.TransformerDecoderLayer(16, 4))
    x = torch.randn(4, 2, 16)
    model.eval()
    before = model[0](x), model[1](x, x)
    fusedlayers.convert(model)
    assert type(model[0]) is fusedlayers.nn.TransformerEncoderLayer
    assert type(model[1]) is fusedlayers.nn.TransformerDecoderLayer
    assert type(model[1].multihead_attn) is fusedlayers.nn.MultiheadAttention
    assert type(model[0].linear1) is fusedlayers.nn.Linear
    torch.testing.assert_close(model[0](x), before[0], **TOL)
    torch.testing.assert_close(model[1](x, x), before[1], **TOL)


def test_compiled_encoder_layer_full_graph():
    _, ours = _pair("TransformerEncoderLayer", batch_first=True, dropout=0.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, ours(x), **TOL)
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_and_passes_checks(dtype, bias):
    torch.manual_seed(0)
    ref = torch.nn.Linear(7, 9, bias=bias, dtype=dtype)
    ours = fusedlayers.nn.Linear(7, 9, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 7, dtype=dtype, requires_grad=True)
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    o1, o2 = ref(x), ours(x)
    torch.testing.assert_close(o2, o1, **tol)
    for g1, g2 in zip(_grads(ref, [x], o1), _grads(ours, [x], o2)):
        torch.testing.assert_close(g2, g1, **tol)
    args = (torch.randn(4, 7, dtype=dtype, requires_grad=True), ours.weight.detach().requires_grad_(),
            ours.bias.detach().requires_grad_() if bias else None)
    torch.library.opcheck(torch.ops.fusedlayers.linear, args)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fusedlayers.functional.linear, args)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_without_input_gradient(bias):
    # An input that needs no gradient (a first layer's): the backward skips its product, weight and bias
    # gradients as torch's.
    torch.manual_seed(0)
    ref = torch.nn.Linear(33, 70, bias=bias, dtype=torch.float64)
    ours = fusedlayers.nn.Linear(33, 70, bias=bias, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 40, 33, dtype=torch.float64)
    g = torch.randn(5, 40, 70, dtype=torch.float64)
    expected = torch.autograd.grad(ref(x), list(ref.parameters()), g)
    actual = torch.autograd.grad(ours(x), list(ours.parameters()), g)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)
    gi, gw, gb = torch.ops.fusedlayers.linear_backward(g, x, ours.weight.detach(), bias, False)
    assert gi.numel() == 0
    torch.testing.assert_close(gw, expected[0], **TOL)
    torch.library.opcheck(torch.ops.fusedlayers.linear_backward, (g, x, ours.weight.detach(), bias, False))


@pytest.mark.parametrize("layout", ["transposed", "4d_permuted", "size_one_dims", "sliced"])
def test_linear_on_strided_inputs(layout):
    # A permuted view of a contiguous tensor (a batch-first input transposed to sequence-first) is multiplied in
    # memory order and handed back as the same view; other strides are copied. Values and gradients as torch's.
    torch.manual_seed(0)
    base = {"transposed": torch.randn(3, 5, 7), "4d_permuted": torch.randn(2, 3, 4, 7),
            "size_one_dims": torch.randn(1, 5, 1, 7), "sliced": torch.randn(5, 6, 7)}[layout]
    base = base.double().requires_grad_()
    view = {"transposed": lambda t: t.transpose(0, 1), "4d_permuted": lambda t: t.permute(2, 0, 1, 3),
            "size_one_dims": lambda t: t.permute(2, 1, 0, 3), "sliced": lambda t: t[:, ::2]}[layout]
    x = view(base)
    weight = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ours = fusedlayers.functional.linear(x, weight, bias)
    ref = torch.nn.functional.linear(x, weight, bias)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL)
    g = torch.randn(ref.shape, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(ours, [base, weight, bias], g), torch.autograd.grad(ref, [base, weight, bias], g)):
        torch.testing.assert_close(a, e, **TOL)
    assert torch.autograd.gradcheck(lambda t, w, b: fusedlayers.functional.linear(view(t), w, b),
                                    (base.detach().requires_grad_(), weight, bias))


@pytest.mark.parametrize("in_features, out_features, shape", [(0, 4, (3, 0)), (0, 4, (2, 3, 0)), (0, 4, (0,)),
                                                              (5, 0, (3, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_zero_features_matches_torch(in_features, out_features, shape, bias):
    # No input features: torch returns the bias broadcast (zeros without one); the bias gradient sums the rows.
    torch.manual_seed(0)
    ref = torch.nn.Linear(in_features, out_features, bias=bias)
    ours = fusedlayers.nn.Linear(in_features, out_features, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    o1, o2 = ref(x), ours(x)
    assert o2.shape == o1.shape
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    g = torch.randn(o1.shape)
    for g1, g2 in zip(torch.autograd.grad(o1, [x, *ref.parameters()], g),
                      torch.autograd.grad(o2, [x, *ours.parameters()], g)):
        torch.testing.assert_close(g2, g1, **TOL)
    args = (x, ref.weight, ref.bias)
    torch.testing.assert_close(fusedlayers.functional.linear(*args), torch.nn.functional.linear(*args))


def test_linear_bad_input_and_fallbacks():
    layer = fusedlayers.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match=r"last dimension \(5\) must equal weight's in_features \(4\)"):
        layer(torch.randn(2, 5))  # torch raises RuntimeError too ("mat1 and mat2 shapes cannot be multiplied")
    # dtypes the engine does not take run through torch
    half = fusedlayers.nn.Linear(4, 3).to(torch.bfloat16)
    assert half(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
