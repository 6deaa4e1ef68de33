"""Edge cases where a drop-in must behave as its reference does, found by an audit against torch and nflows:
convert() keeping parameters and hooks, torch's nested-tensor encoder path, empty batches, exception types."""

import pytest
import torch

import fusedlayers as fl
from fusedlayers import flows


def test_convert_keeps_parameter_objects_frozen_flags_and_hooks():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
                                torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=5), torch.nn.LSTMCell(3, 4))
    model[0].weight_ih_l0.requires_grad_(False)
    model[1].out_proj.weight.requires_grad_(False)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append("hook"))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fl.convert(model)
    assert [type(m) for m in model] == [fl.nn.LSTM, fl.nn.MultiheadAttention, fl.nn.LSTMCell]
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert not model[0].weight_ih_l0.requires_grad and not model[1].out_proj.weight.requires_grad
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    ref.load_state_dict(model[0].state_dict())
    x = torch.randn(5, 2, 3)
    out = model[0](x)[0]
    assert calls == ["hook"]
    torch.testing.assert_close(out, ref(x)[0])
    before = model[0].weight_hh_l0.detach().clone()
    out.sum().backward()
    optimizer.step()  # the optimizer built before the conversion still updates the layer
    assert not torch.equal(model[0].weight_hh_l0, before)


def test_encoder_nested_fast_path_with_padding_mask():
    torch.manual_seed(0)
    ours = fl.nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).eval()
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    padding = torch.tensor([[False, False, True], [False, False, False]])
    x = torch.randn(2, 3, 8)
    with torch.no_grad():  # torch.nn.TransformerEncoder hands the layers nested tensors here
        got = torch.nn.TransformerEncoder(ours, 2, enable_nested_tensor=True)(x, src_key_padding_mask=padding)
        want = torch.nn.TransformerEncoder(ref, 2, enable_nested_tensor=True)(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("query_len,batch", [(3, 0), (0, 2)])
def test_multihead_fused_path_with_empty_dims(query_len, batch):
    torch.manual_seed(0)
    ours, ref = fl.nn.MultiheadAttention(8, 2), torch.nn.MultiheadAttention(8, 2)
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(query_len, batch, 8), torch.randn(4, batch, 8)
    got = ours(q, kv, kv, need_weights=False)
    want = ref(q, kv, kv, need_weights=False)
    assert got[0].shape == want[0].shape and got[1] is None
    assert fl.nn.TransformerEncoderLayer(8, 2, 16)(torch.randn(3, 0, 8)).shape == (3, 0, 8)


def test_multihead_separate_projections_wrong_key_size_is_an_assertion():
    layer = fl.nn.MultiheadAttention(8, 2, kdim=6, vdim=6)
    for need_weights in (False, True):
        with pytest.raises(AssertionError, match="expecting key weights shape"):
            layer(torch.randn(3, 2, 8), torch.randn(4, 2, 7), torch.randn(4, 2, 6), need_weights=need_weights)


def test_lstm_states_that_are_not_a_pair():
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    cell = fl.nn.LSTMCell(3, 4)
    with pytest.raises(RuntimeError, match="two hidden states"):
        cell(x, (h,))
    with pytest.raises(RuntimeError, match="two hidden states"):
        cell(x, (h, h, h))
    with pytest.raises(TypeError, match="tuple of Tensors"):
        cell(x, h)
    with pytest.raises(RuntimeError, match="two hidden states"):
        fl.nn.LSTM(3, 4)(torch.randn(5, 2, 3), (h[None], h[None], h[None]))


def test_sdpa_is_causal_must_be_a_bool():
    q = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="is_causal"):
        fl.functional.scaled_dot_product_attention(q, q, q, is_causal=None)


def _outcome(call):
    """call()'s result, or its exception as (type name, message): what a drop-in must match."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 (the type and message are what is compared)
        return type(error).__name__, str(error)


@pytest.mark.parametrize("case", ["0-D mask", "1-D mask", "1-D mask, dropout", "1-D mask, 3-D", "gqa 2-D",
                                  "gqa 3-D query 2-D key", "gqa not bool", "gqa 3-D", "2-D with 2-D mask"])
def test_sdpa_shape_and_flag_errors_as_torch(case):
    # torch's fused path indexes the mask's dim -2 (its math path broadcasts a shorter mask) and every path, with
    # enable_gqa, the inputs' dim -3: the same IndexError (type and message) where they have fewer dims; its
    # parser takes only a bool for enable_gqa.
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    mask = torch.ones(7, dtype=torch.bool)
    args, kwargs = {
        "0-D mask": ((q, k, k), dict(attn_mask=torch.tensor(True))),
        "1-D mask": ((q, k, k), dict(attn_mask=mask)),
        "1-D mask, dropout": ((q, k, k), dict(attn_mask=mask, dropout_p=0.5)),
        "1-D mask, 3-D": ((q[0], k[0], k[0]), dict(attn_mask=mask)),
        "gqa 2-D": ((q[0, 0], k[0, 0], k[0, 0]), dict(enable_gqa=True)),
        "gqa 3-D query 2-D key": ((q[0], k[0, 0], k[0, 0]), dict(enable_gqa=True)),
        "gqa not bool": ((q, k, k), dict(enable_gqa=1)),
        "gqa 3-D": ((q[0], k[0], k[0]), dict(enable_gqa=True)),
        "2-D with 2-D mask": ((q[0, 0], k[0, 0], k[0, 0]), dict(attn_mask=torch.ones(5, 7, dtype=torch.bool))),
    }[case]
    outcomes = [_outcome(lambda: tuple(fn(*args, **kwargs).shape)) for fn in (
        fl.functional.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)]
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("case", ["causal hint alone", "nested", "padding mask (B, L + 1)", "padding mask 1-D",
                                  "padding mask", "causal hint, grad"])
def test_multihead_inference_fast_path_cases_as_torch(case):
    # Where torch's MultiheadAttention takes its native inference path (eval, no grad, batch_first, self-attention,
    # even heads) it ignores a causal hint without a mask, takes nested tensors and raises its own errors for a
    # padding mask of the wrong shape; elsewhere (grad enabled) the hint without a mask raises.
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = fl.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8)
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    padding = torch.tensor([[False, False, True, True], [False] * 4])
    args, kwargs = {
        "causal hint alone": ((x, x, x), dict(is_causal=True)),
        "nested": ((nested, nested, nested), {}),
        "padding mask (B, L + 1)": ((x, x, x), dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
        "padding mask 1-D": ((x, x, x), dict(key_padding_mask=torch.zeros(8, dtype=torch.bool))),
        "padding mask": ((x, x, x), dict(key_padding_mask=padding)),
        "causal hint, grad": ((x, x, x), dict(is_causal=True)),
    }[case]
    def output(module):
        with torch.set_grad_enabled(case.endswith("grad")):
            out = module(*args, need_weights=False, **kwargs)[0]
        return out.to_padded_tensor(0.0) if out.is_nested else out

    outcomes = [_outcome(lambda: output(module)) for module in (ref, ours)]
    if isinstance(outcomes[0], tuple):
        assert outcomes[1] == outcomes[0]
    else:
        torch.testing.assert_close(outcomes[1], outcomes[0])


@pytest.mark.parametrize("shape", [(2, 5), (8,), (2, 4, 4), (3, 4)], ids=str)
def test_encoder_layer_fast_path_padding_mask_shape_errors_as_torch(shape):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    ours = fl.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x, mask = torch.randn(2, 4, 8), torch.zeros(shape, dtype=torch.bool)
    outcomes = []
    for module in (ref, ours):
        with torch.no_grad(), pytest.raises(RuntimeError) as error:
            module(x, src_key_padding_mask=mask)
        outcomes.append(str(error.value))
    assert outcomes[1] == outcomes[0]


def test_flow_shape_errors_are_also_runtime_errors_as_in_nflows():
    maf = flows.MaskedAffineAutoregressiveTransform(4, 8, context_features=3)
    for call in (lambda: maf(torch.randn(5, 3), torch.randn(5, 3)),
                 lambda: maf(torch.randn(5, 4), torch.randn(5, 2))):
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("training,grad", [(False, False), (False, True), (True, False)])
def test_encoder_causal_hint_without_mask_as_torch(training, grad):
    """torch's inference fast path ignores is_causal without src_mask; its other path refuses the call."""
    torch.manual_seed(0)
    ours = fl.nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).train(training)
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).train(training)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8)
    with torch.set_grad_enabled(grad):
        try:
            want = ref(x, is_causal=True)
        except RuntimeError:
            with pytest.raises(RuntimeError, match="is_causal"):
                ours(x, is_causal=True)
            return
        torch.testing.assert_close(ours(x, is_causal=True), want)


def test_flow_counts_means_and_base_sampling_as_nflows():
    from nflows.distributions import StandardNormal as TheirNormal
    flow = flows.Flow(flows.ReversePermutation(3), flows.StandardNormal([3]))
    for bad in (2.0, -1, True):
        with pytest.raises(TypeError):  # nflows' type; also a ValueError, as before
            flow.sample(bad)
        with pytest.raises(ValueError):
            flow.sample(bad)
    with pytest.raises(flows.NoMeanException):
        flow.mean()
    ours, theirs = flows.StandardNormal([3]), TheirNormal([3])
    assert ours.mean().dtype == theirs.mean().dtype and ours.mean().shape == theirs.mean().shape
    context = torch.randn(2, 5)
    assert ours.mean(context).shape == theirs.mean(context).shape
    torch.manual_seed(0)
    a = ours.sample(7, batch_size=3)
    torch.manual_seed(0)
    torch.testing.assert_close(a, theirs.sample(7, batch_size=3))
