"""fusedlayers.nn.LSTM / LSTMCell and the `lstm_layer` op against torch.nn.LSTM / torch.nn.LSTMCell.

Every comparison runs both modules on the same weights (state_dict copied with strict=True) and the same inputs,
and compares outputs, final states and the gradients of the input, of (h0, c0) and of every parameter.

Tolerances (`TOL`):
  float64: rtol = atol = 1e-10. Both sides are exact to a few ulps of 1e-16 per step; 1e-10 leaves room for
           different summation orders in the GEMMs over a few layers and steps.
  float32: rtol = atol = 1e-5. The kernel's float32 gates use an exp accurate to about 20 ulps (~2.4e-6 relative)
           and torch's CPU path (oneDNN) sums in another order; on these small sizes (values O(1), a handful of
           steps) the largest differences measured are 2.4e-7 (outputs) and 1.2e-6 (gradients), so 1e-5 needs no
           loosening for gradients either.
  bfloat16: atol = rtol = 2e-2 against the float32 computation (bfloat16 has an 8-bit mantissa: ~4e-3 relative
           per rounding of the inputs, weights and outputs).
Sizes are small on purpose: the suite runs on 2 cores.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import fusedlayers
import fusedlayers.functional as FL
from fusedlayers.nn import LSTM, LSTMCell

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}
BF16_TOL = dict(rtol=2e-2, atol=2e-2)

INPUT_SIZE, HIDDEN, PROJ, STEPS, BATCH = 4, 5, 3, 5, 3


# ------------------------------------------------------------------------------------------------ helpers


def make_lstm_pair(*args, dtype=torch.float64, seed=0, **kwargs):
    """(torch.nn.LSTM, fusedlayers.nn.LSTM) with the same weights, copied with strict=True."""
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(*args, dtype=dtype, **kwargs)
    ours = LSTM(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_cell_pair(*args, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = torch.nn.LSTMCell(*args, dtype=dtype, **kwargs)
    ours = LSTMCell(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def flat_tensors(x):
    """The tensors of a nested output, in order (a PackedSequence contributes its data and index tensors)."""
    if isinstance(x, PackedSequence):
        return [t for t in (x.data, x.batch_sizes, x.sorted_indices, x.unsorted_indices) if t is not None]
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flat_tensors(item)]
    raise TypeError(type(x))


def assert_same_structure_and_values(ours, ref, tol):
    assert type(ours) is type(ref) or (isinstance(ours, tuple) and isinstance(ref, tuple))
    a, b = flat_tensors(ours), flat_tensors(ref)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, **tol)
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def weighted_loss(outputs, weights):
    """A loss whose gradient differs at every element (a plain sum would hide transposed or permuted grads)."""
    return sum((t * w).sum() for t, w in zip(outputs, weights))


def loss_weights(outputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in outputs]


def float_outputs(result):
    return [t for t in flat_tensors(result) if t.is_floating_point()]


def compare_forward_backward(ref, ours, make_args, tol):
    """Runs both modules on fresh copies of the same inputs; compares outputs, then the gradients (through one
    fixed weighted loss over every float output) of the inputs and of every parameter."""
    ref_leaves, ref_args = make_args()
    our_leaves, our_args = make_args()
    ref_out = ref(*ref_args)
    our_out = ours(*our_args)
    assert_same_structure_and_values(our_out, ref_out, tol)

    weights = loss_weights(float_outputs(ref_out))
    ref_params = dict(ref.named_parameters())
    our_params = dict(ours.named_parameters())
    assert list(ref_params) == list(our_params)
    ref_grads = torch.autograd.grad(weighted_loss(float_outputs(ref_out), weights),
                                    [*ref_leaves, *ref_params.values()])
    our_grads = torch.autograd.grad(weighted_loss(float_outputs(our_out), weights),
                                    [*our_leaves, *our_params.values()])
    names = [f"input[{k}]" for k in range(len(ref_leaves))] + list(ref_params)
    for name, g_ours, g_ref in zip(names, our_grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    return ref_out, our_out


def lstm_inputs(kind, *, dtype, batch_first, num_layers, bidirectional, proj_size, with_hx, seed=2):
    """A factory of (leaves, forward args) for one input kind; each call makes fresh leaf tensors with the same
    values. Kinds: padded, unbatched, packed_sorted (pack_padded_sequence, enforce_sorted=True), packed_unsorted
    (enforce_sorted=False), pack_sequence (a list of sequences of unsorted lengths)."""
    dirs = 2 if bidirectional else 1
    out_size = proj_size or HIDDEN

    def make():
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

        leaves = []
        if kind == "unbatched":
            x = randn(STEPS, INPUT_SIZE)
            leaves.append(x)
            inp = x
            state_shape = (num_layers * dirs,)
        elif kind == "pack_sequence":
            seqs = [randn(n, INPUT_SIZE) for n in (3, STEPS, 1)]
            leaves.extend(seqs)
            inp = pack_sequence(seqs, enforce_sorted=False)
            state_shape = (num_layers * dirs, BATCH)
        else:
            x = randn(BATCH, STEPS, INPUT_SIZE) if batch_first else randn(STEPS, BATCH, INPUT_SIZE)
            leaves.append(x)
            if kind == "padded":
                inp = x
            elif kind == "packed_sorted":
                inp = pack_padded_sequence(x, [STEPS, 3, 2], batch_first=batch_first, enforce_sorted=True)
            elif kind == "packed_unsorted":
                inp = pack_padded_sequence(x, [2, STEPS, 1], batch_first=batch_first, enforce_sorted=False)
            else:
                raise ValueError(kind)
            state_shape = (num_layers * dirs, BATCH)
        if not with_hx:
            return leaves, (inp,)
        h0 = randn(*state_shape, out_size)
        c0 = randn(*state_shape, HIDDEN)
        leaves.extend([h0, c0])
        return leaves, (inp, (h0, c0))

    return make


# -------------------------------------------------------------------------------------------- LSTM values and gradients

def output_dtype(output):
    return output.data.dtype if isinstance(output, PackedSequence) else output.dtype


INPUT_KINDS = ["padded", "unbatched", "packed_sorted", "packed_unsorted", "pack_sequence"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("proj_size", [0, PROJ], ids=["noproj", "proj"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tfirst", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
def test_lstm_matches_torch(num_layers, bidirectional, batch_first, proj_size, bias, kind, with_hx, dtype):
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=num_layers, bias=bias, batch_first=batch_first,
                               bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
    make = lstm_inputs(kind, dtype=dtype, batch_first=batch_first, num_layers=num_layers,
                       bidirectional=bidirectional, proj_size=proj_size, with_hx=with_hx)
    ref_out, our_out = compare_forward_backward(ref, ours, make, TOL[dtype])
    output, (h_n, c_n) = our_out
    dirs = 2 if bidirectional else 1
    if isinstance(output, PackedSequence):
        padded, lengths = pad_packed_sequence(output, batch_first=batch_first)
        ref_padded, ref_lengths = pad_packed_sequence(ref_out[0], batch_first=batch_first)
        torch.testing.assert_close(padded, ref_padded, **TOL[dtype])
        assert lengths.tolist() == ref_lengths.tolist()
    else:
        assert output.shape == ref_out[0].shape
        assert output.shape[-1] == dirs * (proj_size or HIDDEN)
    assert h_n.shape == ref_out[1][0].shape and c_n.shape == ref_out[1][1].shape
    assert h_n.dtype == c_n.dtype == output_dtype(output) == dtype


@pytest.mark.parametrize("hidden", [32, 264], ids=["h32", "h264_two_k_chunks"])
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
def test_lstm_float32_small_batches_match_torch(batch, hidden):
    # Float32 layers with hidden a multiple of 8 run the recurrent product on strip panels; at most 4 rows a
    # step run it row by row, every other step backwards (inner dimension and blocks reversed). Bidirectional,
    # so that both directions alternate; a float64 torch reference, so that only our rounding counts.
    torch.manual_seed(3)
    ref = torch.nn.LSTM(24, hidden, bidirectional=True, dtype=torch.float64)
    ours = LSTM(24, hidden, bidirectional=True, dtype=torch.float32)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(9, batch, 24, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = ours(x.float())
        ref_out, (ref_h, ref_c) = ref(x)
    for mine, theirs in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(mine.double(), theirs, **TOL[torch.float32])


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "eval_with_grad"])
def test_lstm_without_autograd_matches_torch(grad_mode):
    # The forward without saved state (train=False in the op) must compute the same values.
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    if grad_mode == "eval_with_grad":
        ref.eval(), ours.eval()
        ctx = torch.enable_grad()
    else:
        ctx = torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode()
    with ctx:
        assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float64])


def test_lstm_only_hx_requires_grad():
    # Frozen weights and an input without grad: the gradient must still flow into h0 and c0.
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, proj_size=PROJ)
    for m in (ref, ours):
        m.requires_grad_(False)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    grads = []
    for m in (ref, ours):
        h0 = torch.zeros(2, BATCH, PROJ, dtype=torch.float64, requires_grad=True)
        c0 = torch.ones(2, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True)
        out, (h, c) = m(x, (h0, c0))
        grads.append(torch.autograd.grad(out.sum() + h.sum() + 2 * c.sum(), [h0, c0]))
    for g_ours, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_ours, g_ref, **TOL[torch.float64])


def test_lstm_non_contiguous_inputs():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True)
    x = torch.randn(BATCH, STEPS, 2 * INPUT_SIZE, dtype=torch.float64)[:, :, ::2].transpose(0, 1)
    h0 = torch.randn(BATCH, 4, HIDDEN, dtype=torch.float64).transpose(0, 1)
    c0 = torch.randn(4, BATCH, 2 * HIDDEN, dtype=torch.float64)[..., 1::2]
    assert not (x.is_contiguous() or h0.is_contiguous() or c0.is_contiguous())
    assert_same_structure_and_values(ours(x, (h0, c0)), ref(x, (h0, c0)), TOL[torch.float64])


def test_lstm_zero_batch():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ)
    x = torch.randn(STEPS, 0, INPUT_SIZE, dtype=torch.float64)
    assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float64])


def test_lstm_hx_given_is_not_modified():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    h0 = torch.randn(2, BATCH, HIDDEN, dtype=torch.float64)
    c0 = torch.randn(2, BATCH, HIDDEN, dtype=torch.float64)
    saved = (h0.clone(), c0.clone(), x.clone())
    ours(x, (h0, c0))
    for a, b in zip((h0, c0, x), saved):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ LSTMCell


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lstm_cell_matches_torch(bias, batched, with_hx, dtype):
    ref, ours = make_cell_pair(INPUT_SIZE, HIDDEN, bias=bias, dtype=dtype)

    def make():
        g = torch.Generator().manual_seed(3)
        lead = (BATCH,) if batched else ()
        x = torch.randn(*lead, INPUT_SIZE, generator=g, dtype=dtype).requires_grad_()
        if not with_hx:
            return [x], (x,)
        h = torch.randn(*lead, HIDDEN, generator=g, dtype=dtype).requires_grad_()
        c = torch.randn(*lead, HIDDEN, generator=g, dtype=dtype).requires_grad_()
        return [x, h, c], (x, (h, c))

    compare_forward_backward(ref, ours, make, TOL[dtype])


def test_lstm_cell_unrolled_over_a_sequence():
    # The usual use of a cell: a Python loop, the gradient flowing through every step.
    ref, ours = make_cell_pair(INPUT_SIZE, HIDDEN)

    class Unrolled(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, xs):
            state = None
            outs = []
            for x in xs.unbind(0):
                state = self.cell(x, state)
                outs.append(state[0])
            return torch.stack(outs), state[1]

    def make():
        g = torch.Generator().manual_seed(4)
        xs = torch.randn(STEPS, BATCH, INPUT_SIZE, generator=g, dtype=torch.float64).requires_grad_()
        return [xs], (xs,)

    compare_forward_backward(Unrolled(ref), Unrolled(ours), make, TOL[torch.float64])


# ------------------------------------------------------------------------------------------------ state_dict, repr, API


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=PROJ, bias=False),
    dict(num_layers=3, bidirectional=True, proj_size=PROJ, batch_first=True, dropout=0.25),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_state_dict_keys_shapes_and_loading_both_ways(config):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(INPUT_SIZE, HIDDEN, **config)
    ours = LSTM(INPUT_SIZE, HIDDEN, **config)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours._flat_weights_names == ref._flat_weights_names
    # ours <- torch
    ours.load_state_dict(ref_sd, strict=True)
    for k in ref_sd:
        assert torch.equal(ours.state_dict()[k], ref_sd[k])
    # torch <- ours (fresh random weights on our side)
    torch.manual_seed(1)
    ours2 = LSTM(INPUT_SIZE, HIDDEN, **config)
    ref.load_state_dict(ours2.state_dict(), strict=True)
    ref.eval(), ours2.eval()
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    if config.get("batch_first"):
        x = x.transpose(0, 1)
    assert_same_structure_and_values(ours2(x), ref(x), TOL[torch.float32])


def test_lstm_cell_state_dict_both_ways():
    for bias in (True, False):
        torch.manual_seed(0)
        ref, ours = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN, bias=bias), LSTMCell(INPUT_SIZE, HIDDEN, bias=bias)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(BATCH, INPUT_SIZE)
        assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float32])


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_repr_equals_torch(config):
    assert repr(LSTM(INPUT_SIZE, HIDDEN, **config)) == repr(torch.nn.LSTM(INPUT_SIZE, HIDDEN, **config))


def test_cell_repr_equals_torch():
    for bias in (True, False):
        assert repr(LSTMCell(INPUT_SIZE, HIDDEN, bias=bias)) == repr(torch.nn.LSTMCell(INPUT_SIZE, HIDDEN, bias=bias))


def test_flatten_parameters_is_callable_and_harmless():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ)
    assert ours.flatten_parameters() is None
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float64])


def test_modules_are_drop_in_types():
    assert issubclass(LSTM, torch.nn.RNNBase)
    assert issubclass(LSTMCell, torch.nn.LSTMCell)
    m = LSTM(INPUT_SIZE, HIDDEN)
    assert m.mode == "LSTM"


def test_module_to_dtype_and_weight_update_are_seen():
    # .double() replaces the parameters; the forward must use the new ones (flat weights refreshed).
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, dtype=torch.float32)
    ref.double(), ours.double()
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float64])
    # Assigning a new Parameter (as torch.func / parametrizations do) is seen too.
    new = torch.nn.Parameter(torch.randn_like(ref.weight_hh_l1))
    ref.weight_hh_l1 = new
    ours.weight_hh_l1 = torch.nn.Parameter(new.detach().clone())
    assert_same_structure_and_values(ours(x), ref(x), TOL[torch.float64])


def test_functional_call_matches_torch():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, proj_size=PROJ)
    params = {k: torch.randn_like(v) for k, v in ref.named_parameters()}
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    a = torch.func.functional_call(ref, params, (x,))
    b = torch.func.functional_call(ours, params, (x,))
    assert_same_structure_and_values(b, a, TOL[torch.float64])


# ------------------------------------------------------------------------------------------------ gradcheck


def layer_args(batch_sizes, input_size, hidden, proj, bias, dtype=torch.float64, requires_grad=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = proj or hidden
    rows, batch = sum(batch_sizes), batch_sizes[0]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(
            requires_grad)

    return dict(
        input=randn(rows, input_size),
        batch_sizes=torch.tensor(batch_sizes, dtype=torch.int64),
        h0=randn(batch, out),
        c0=randn(batch, hidden),
        w_ih=randn(4 * hidden, input_size, scale=0.5),
        w_hh=randn(4 * hidden, out, scale=0.5),
        b_ih=randn(4 * hidden) if bias else None,
        b_hh=randn(4 * hidden) if bias else None,
        w_hr=randn(out, hidden, scale=0.5) if proj else None,
    )


@pytest.mark.parametrize("batch_sizes", [[3, 2, 2, 1], [2, 2, 2]], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("proj", [0, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck_lstm_layer(reverse, proj, bias, batch_sizes):
    args = layer_args(batch_sizes, 3, 4, proj, bias)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        kw = dict(args, **dict(zip(names, tensors)))
        return FL.lstm_layer(**kw, reverse=reverse)

    assert torch.autograd.gradcheck(fn, [args[k] for k in names])


def test_lstm_layer_matches_torch_per_sequence():
    # The packed layer against torch.nn.LSTM run on each sequence alone (the reference for packed semantics).
    batch_sizes = [3, 2, 2, 1]
    args = layer_args(batch_sizes, 3, 4, 2, True, requires_grad=False)
    for reverse in (False, True):
        out, h_n, c_n = FL.lstm_layer(**args, reverse=reverse)
        ref = torch.nn.LSTM(3, 4, proj_size=2, dtype=torch.float64)
        with torch.no_grad():
            ref.weight_ih_l0.copy_(args["w_ih"]), ref.weight_hh_l0.copy_(args["w_hh"])
            ref.bias_ih_l0.copy_(args["b_ih"]), ref.bias_hh_l0.copy_(args["b_hh"])
            ref.weight_hr_l0.copy_(args["w_hr"])
        lengths = [sum(1 for b in batch_sizes if b > k) for k in range(batch_sizes[0])]
        offsets = [sum(batch_sizes[:t]) for t in range(len(batch_sizes))]
        for k, n in enumerate(lengths):
            seq = torch.stack([args["input"][offsets[t] + k] for t in range(n)])
            if reverse:
                seq = seq.flip(0)
            o, (h, c) = ref(seq.unsqueeze(1), (args["h0"][k].view(1, 1, -1), args["c0"][k].view(1, 1, -1)))
            o = o.squeeze(1)
            if reverse:
                o = o.flip(0)
            mine = torch.stack([out[offsets[t] + k] for t in range(n)])
            torch.testing.assert_close(mine, o, **TOL[torch.float64])
            torch.testing.assert_close(h_n[k], h.view(-1), **TOL[torch.float64])
            torch.testing.assert_close(c_n[k], c.view(-1), **TOL[torch.float64])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_lstm_module(packed):
    _, ours = make_lstm_pair(3, 3, num_layers=2, bidirectional=True, proj_size=2)
    names = [n for n, _ in ours.named_parameters()]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def fn(x, h0, c0, *params):
        inp = pack_padded_sequence(x, [3, 1], enforce_sorted=False) if packed else x
        out, (h, c) = torch.func.functional_call(ours, dict(zip(names, params)), (inp, (h0, c0)))
        return (out.data if packed else out), h, c

    assert torch.autograd.gradcheck(fn, [x, h0, c0, *params])


def test_gradcheck_lstm_cell_module():
    _, ours = make_cell_pair(3, 4)
    names = [n for n, _ in ours.named_parameters()]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def fn(x, h, c, *params):
        return torch.func.functional_call(ours, dict(zip(names, params)), (x, (h, c)))

    assert torch.autograd.gradcheck(fn, [x, h, c, *params])


def test_double_backward_raises_informative_error():
    # Documented limitation: the fused backward is not itself differentiable (torch.nn.LSTM's is).
    args = layer_args([2, 1], 3, 4, 0, True)
    out, h, c = FL.lstm_layer(**args)
    (gx,) = torch.autograd.grad(out.sum() + c.sum(), [args["input"]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_backward_of_forward_without_saved_state_raises():
    # train=False keeps nothing for the backward; differentiating it must fail loudly, not return garbage.
    args = layer_args([2, 1], 3, 4, 0, True)
    out, *_ = torch.ops.fusedlayers.lstm_layer(*args.values(), False, False)
    with pytest.raises(RuntimeError, match="train=True"):
        out.sum().backward()


# ------------------------------------------------------------------------------------------------ opcheck


OPCHECK_CASES = [
    # (train, bias, proj, reverse, dtype, hidden)
    (True, True, 0, False, torch.float64, 4),
    (True, False, 2, True, torch.float64, 4),
    (True, True, 2, False, torch.float32, 4),
    (True, True, 0, True, torch.float32, 32),  # 4 * 32 * 4 B = 512 B: padded gate rows
    (True, False, 0, False, torch.float64, 16),  # 4 * 16 * 8 B = 512 B
    (False, True, 0, False, torch.float64, 4),
    (False, False, 2, True, torch.float64, 4),
    (False, True, 2, True, torch.float32, 32),  # padded width, zero rows: the fake's shape rule is still checked
    (False, True, 0, False, torch.float64, 16),
    (False, True, 0, False, torch.bfloat16, 4),
    (False, True, 2, False, torch.bfloat16, 32),
]


@pytest.mark.parametrize("train,bias,proj,reverse,dtype,hidden", OPCHECK_CASES, ids=str)
def test_opcheck_lstm_layer(train, bias, proj, reverse, dtype, hidden):
    # train=True runs the autograd tests of opcheck, so its inputs require grad; train=False returns no saved
    # state and is not differentiable, so its inputs do not.
    args = layer_args([3, 2, 2, 1], 3, hidden, proj, bias, dtype=dtype, requires_grad=train)
    torch.library.opcheck(torch.ops.fusedlayers.lstm_layer, (*args.values(), reverse, train))


# The saved gates have padded rows at these sizes: the padding must be deterministic (zeros) too.
@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 32), (torch.float64, 16)], ids=str)
def test_saved_gates_padding_is_deterministic(dtype, hidden):
    args = layer_args([3, 2, 2, 1], 3, hidden, 0, True, dtype=dtype, requires_grad=False)
    width = 4 * hidden + 64 // torch.empty((), dtype=dtype).element_size()
    saved = []
    for fill in range(1, 5):
        junk = torch.full((8 * width,), float(fill), dtype=dtype)  # leave a freed block of the gates' size behind
        del junk
        saved.append(torch.ops.fusedlayers.lstm_layer(*args.values(), False, True)[3])
    assert saved[0].shape == (8, width)
    for other in saved[1:]:
        assert torch.equal(other[:, :4 * hidden], saved[0][:, :4 * hidden])  # the real gates always agree
        assert torch.equal(other, saved[0])  # ... and the padding must too


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 32), (torch.float64, 16)], ids=str)
def test_padded_gate_rows_match_torch(dtype, hidden):
    # Hidden sizes whose gate rows are padded in the kernel's saved state: values and gradients as torch's.
    ref, ours = make_lstm_pair(3, hidden, num_layers=2, bidirectional=True, dtype=dtype)

    def make():
        g = torch.Generator().manual_seed(11)
        x = torch.randn(STEPS, BATCH, 3, generator=g, dtype=dtype).requires_grad_()
        return [x], (pack_padded_sequence(x, [2, STEPS, 1], enforce_sorted=False),)

    compare_forward_backward(ref, ours, make, TOL[dtype])


@pytest.mark.parametrize("proj,bias,reverse", [(0, True, False), (2, False, True)], ids=str)
def test_opcheck_lstm_layer_backward(proj, bias, reverse):
    args = layer_args([3, 2, 1], 3, 4, proj, bias, requires_grad=False)
    out, h_n, c_n, gates, cells, raw = torch.ops.fusedlayers.lstm_layer(*args.values(), reverse, True)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (out, h_n, c_n)]
    a = args
    torch.library.opcheck(torch.ops.fusedlayers.lstm_layer_backward,
                          (*grads, a["input"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["w_hr"],
                           bias, out, gates, cells, raw, reverse))


# ------------------------------------------------------------------------------------------------ torch.compile


class TinyModel(torch.nn.Module):
    def __init__(self, lstm_cls):
        super().__init__()
        self.lstm = lstm_cls(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True)
        self.head = torch.nn.Linear(2 * PROJ, 1)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out).squeeze(-1), c


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TinyModel(LSTM)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(BATCH, STEPS, INPUT_SIZE)
    y_eager, c_eager = eager(x)
    y_comp, c_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager, **TOL[torch.float32])
    torch.testing.assert_close(c_comp, c_eager, **TOL[torch.float32])
    (y_eager.square().sum() + c_eager.sum()).backward()
    (y_comp.square().sum() + c_comp.sum()).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=lambda m, n=name: f"{n}: {m}")
    # And both equal torch.nn.LSTM's model.
    torch.manual_seed(0)
    ref = TinyModel(torch.nn.LSTM)
    ref.load_state_dict(eager.state_dict(), strict=True)
    y_ref, _ = ref(x)
    torch.testing.assert_close(y_comp, y_ref, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dropout_training_equals_torch_with_same_seed(dtype, bidirectional, kind):
    # Checked: the masks are drawn with the same generator calls, in the same order and on tensors of the same
    # number of elements as torch's, so the same seed gives the same result (values and gradients).
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=3, dropout=0.5, bidirectional=bidirectional,
                               dtype=dtype)
    make = lstm_inputs(kind, dtype=dtype, batch_first=False, num_layers=3, bidirectional=bidirectional,
                       proj_size=0, with_hx=False)

    class Seeded(torch.nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            torch.manual_seed(1234)
            return self.lstm(x)

    ref_out, our_out = compare_forward_backward(Seeded(ref), Seeded(ours), make, TOL[dtype])
    # Dropout did act: without it the output differs.
    ref.eval()
    no_drop = ref(make()[1][0])
    a, b = flat_tensors(our_out)[0], flat_tensors(no_drop)[0]
    assert not torch.allclose(a, b)


def test_dropout_eval_mode_is_deterministic_and_ignores_dropout():
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=3, dropout=0.5)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    ours.eval(), ref.eval()
    first = ours(x)
    assert_same_structure_and_values(ours(x), first, dict(rtol=0, atol=0))
    assert_same_structure_and_values(first, ref(x), TOL[torch.float64])
    # The same weights without dropout at all give the same result.
    _, plain = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=3, dropout=0.0)
    plain.load_state_dict(ours.state_dict())
    assert_same_structure_and_values(plain(x), first, TOL[torch.float64])
    # And in training mode, the same seed gives the same result twice.
    ours.train()
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = ours(x)
    assert_same_structure_and_values(a, b, dict(rtol=0, atol=0))


# ------------------------------------------------------------------------------------------------ training run


def test_short_training_run_matches_torch():
    # 20 SGD steps on a toy regression (predict a scaled running sum of one input feature): the losses of the two
    # models, started from the same weights, must agree to 1e-4 relative (float32; differences grow a little per
    # step; measured: ~2e-7).
    def build(lstm_cls):
        torch.manual_seed(0)
        lstm = lstm_cls(3, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=4)
        head = torch.nn.Linear(8, 1)
        return torch.nn.ModuleDict(dict(lstm=lstm, head=head))

    ref, ours = build(torch.nn.LSTM), build(LSTM)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 6, 3, generator=g)
    y = x[..., 0].cumsum(1) / torch.arange(1, 7).sqrt()

    def run(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            out, _ = model["lstm"](x)
            loss = torch.nn.functional.mse_loss(model["head"](out).squeeze(-1), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    ref_losses, our_losses = run(ref), run(ours)
    assert our_losses[-1] < 0.9 * our_losses[0]  # it did learn
    torch.testing.assert_close(our_losses, ref_losses, rtol=1e-4, atol=0)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ convert


class HasRecurrentLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(INPUT_SIZE, INPUT_SIZE))
        self.lstm = torch.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.inner = torch.nn.ModuleDict(dict(cell=torch.nn.LSTMCell(2 * HIDDEN, HIDDEN, bias=False)))
        self.head = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x):
        out, _ = self.lstm(self.encoder(x))
        state = None
        for t in range(out.shape[1]):
            state = self.inner["cell"](out[:, t], state)
        return self.head(state[0])


def test_convert_swaps_types_and_keeps_outputs():
    torch.manual_seed(0)
    model = HasRecurrentLayers().double()
    model.eval()
    reference = copy.deepcopy(model)
    converted = fusedlayers.convert(model)
    assert converted is model
    assert type(converted.lstm) is LSTM and type(converted.inner["cell"]) is LSTMCell
    assert type(converted.encoder[0]) is torch.nn.Linear and type(converted.head) is torch.nn.Linear
    assert not converted.lstm.training and not converted.inner["cell"].training
    assert converted.lstm.weight_ih_l0.dtype == torch.float64
    assert list(converted.state_dict()) == list(reference.state_dict())
    for k, v in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v)
    x = torch.randn(BATCH, STEPS, INPUT_SIZE, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x), **TOL[torch.float64])


def test_convert_top_level_module_and_subclasses():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(INPUT_SIZE, HIDDEN, proj_size=PROJ, bias=False, dropout=0.0)
    new = fusedlayers.convert(lstm)
    assert type(new) is LSTM
    assert repr(new) == repr(lstm)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    assert_same_structure_and_values(new(x), lstm(x), TOL[torch.float32])
    cell = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN)
    assert type(fusedlayers.convert(cell)) is LSTMCell

    class MyLSTM(torch.nn.LSTM):  # a subclass may have its own forward: left alone
        pass

    mine = MyLSTM(INPUT_SIZE, HIDDEN)
    assert fusedlayers.convert(mine) is mine


def test_convert_replaces_a_shared_module_once():
    # A module held under several names (one parent, or several) becomes one new module held under all of them.
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.LSTM(INPUT_SIZE, HIDDEN)
            self.b = self.a
            cell = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN)
            self.seq = torch.nn.Sequential(cell)
            self.dict = torch.nn.ModuleDict({"cell": cell})

    torch.manual_seed(0)
    model = Shared()
    n_params = len(list(model.parameters()))
    converted = fusedlayers.convert(model)
    assert type(converted.a) is LSTM and converted.a is converted.b
    assert type(converted.seq[0]) is LSTMCell and converted.seq[0] is converted.dict["cell"]
    assert len(list(converted.parameters())) == n_params


# ------------------------------------------------------------------------------------------------ hypothesis


@settings(max_examples=15, deadline=None)
@given(
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    input_size=st.integers(1, 6),
    hidden=st.integers(1, 7),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    proj=st.integers(0, 3),
    data=st.data(),
)
def test_random_shapes_match_torch(steps, batch, input_size, hidden, num_layers, bidirectional, proj, data):
    proj = min(proj, hidden - 1)  # torch requires proj_size < hidden_size
    ref, ours = make_lstm_pair(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                               proj_size=proj)
    lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch), label="lengths")
    packed = data.draw(st.booleans(), label="packed")

    def make():
        g = torch.Generator().manual_seed(10)
        x = torch.randn(steps, batch, input_size, generator=g, dtype=torch.float64).requires_grad_()
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        return [x], (inp,)

    compare_forward_backward(ref, ours, make, TOL[torch.float64])


# ------------------------------------------------------------------------------------------------ bad input


def raises_like_torch(expected_type, match, call, ref, ours):
    """`call(module)` must raise `expected_type` for torch's module and for ours, ours with a message matching
    `match` (an informative message: it names what is wrong)."""
    with pytest.raises(expected_type):
        call(ref)
    with pytest.raises(expected_type, match=match):
        call(ours)


def f32(*shape):
    return torch.randn(*shape)


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


H0 = lambda *s: torch.zeros(*s)  # noqa: E731

LSTM_BAD_INPUTS = [
    # (id, constructor kwargs, expected type, message regex, call)
    ("feature_size", {}, RuntimeError, r"input_size. Expected 4, got 6", lambda m: m(f32(3, 2, 6))),
    ("feature_size_unbatched", {}, RuntimeError, r"Expected 4, got 6", lambda m: m(f32(3, 6))),
    ("feature_size_packed", {}, RuntimeError, r"6",
     lambda m: m(pack_padded_sequence(f32(3, 2, 6), [3, 2]))),
    ("h0_batch", {}, RuntimeError, re.escape("Expected hidden[0] size (1, 2, 5), got [1, 3, 5]"),
     lambda m: m(f32(3, 2, 4), (H0(1, 3, 5), H0(1, 2, 5)))),
    ("c0_hidden", {}, RuntimeError, re.escape("Expected hidden[1] size (1, 2, 5), got [1, 2, 6]"),
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(1, 2, 6)))),
    ("h0_layers", dict(num_layers=2), RuntimeError, re.escape("Expected hidden[0] size (2, 2, 5), got [1, 2, 5]"),
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(2, 2, 5)))),
    ("h0_proj", dict(proj_size=3), RuntimeError, re.escape("Expected hidden[0] size (1, 2, 3), got [1, 2, 5]"),
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(1, 2, 5)))),
    ("h0_bidirectional", dict(bidirectional=True), RuntimeError, re.escape("Expected hidden[0] size (2, 2, 5)"),
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(1, 2, 5)))),
    ("h0_unbatched_shape", {}, RuntimeError, re.escape("Expected hidden[0] size (1, 1, 5), got [1, 1, 6]"),
     lambda m: m(f32(3, 4), (H0(1, 6), H0(1, 5)))),
    ("h0_packed_batch", {}, RuntimeError, r"hidden\[0\] size \(1, 2, 5\), got \[1, 3, 5\]",
     lambda m: m(pack_padded_sequence(f32(3, 2, 4), [3, 2]), (H0(1, 3, 5), H0(1, 3, 5)))),
    ("hx_2d_for_batched", {}, RuntimeError, r"batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\)",
     lambda m: m(f32(3, 2, 4), (H0(2, 5), H0(2, 5)))),
    ("cx_2d_for_batched", {}, RuntimeError, r"should also be 3-D but got \(3-D, 2-D\)",
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(2, 5)))),
    ("hx_4d", {}, RuntimeError, r"should also be 3-D but got \(4-D, 4-D\)",
     lambda m: m(f32(3, 2, 4), (H0(1, 1, 2, 5), H0(1, 1, 2, 5)))),
    ("hx_3d_for_unbatched", {}, RuntimeError, r"unbatched 2-D input, hx and cx should also be 2-D",
     lambda m: m(f32(3, 4), (H0(1, 1, 5), H0(1, 1, 5)))),
    # torch's message here comes from deep inside (e.g. "get_mkldnn_dtype: unsupported data type"); ours names
    # the tensor and both dtypes.
    ("hx_float64_input_float32", {}, RuntimeError, r"hx dtype \(torch.float64\) does not match input dtype",
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5).double(), H0(1, 2, 5).double()))),
    ("cx_float64_input_float32", {}, RuntimeError, r"cx dtype \(torch.float64\) does not match input dtype",
     lambda m: m(f32(3, 2, 4), (H0(1, 2, 5), H0(1, 2, 5).double()))),
    ("hx_float32_module_float64", dict(dtype=torch.float64), RuntimeError,
     r"hx dtype \(torch.float32\) does not match input dtype \(torch.float64\)",
     lambda m: m(f64(3, 2, 4), (H0(1, 2, 5), H0(1, 2, 5)))),
    ("hx_float64_unbatched", {}, RuntimeError, r"hx dtype \(torch.float64\)",
     lambda m: m(f32(3, 4), (H0(1, 5).double(), H0(1, 5).double()))),
    ("hx_float64_packed", {}, RuntimeError, r"hx dtype \(torch.float64\)",
     lambda m: m(pack_padded_sequence(f32(3, 2, 4), [3, 2]), (H0(1, 2, 5).double(), H0(1, 2, 5).double()))),
    ("float16_input", {}, ValueError, r"RNN input dtype \(torch.float16\) does not match weight dtype",
     lambda m: m(f32(3, 2, 4).half())),
    ("float64_input", {}, ValueError, r"RNN input dtype \(torch.float64\) does not match weight dtype",
     lambda m: m(f64(3, 2, 4))),
    ("int64_input", {}, ValueError, r"RNN input dtype \(torch.int64\)", lambda m: m(torch.ones(3, 2, 4).long())),
    ("int32_input_unbatched", {}, ValueError, r"RNN input dtype \(torch.int32\)",
     lambda m: m(torch.ones(3, 4, dtype=torch.int32))),
    ("zero_length", {}, RuntimeError, r"sequence length to be larger than 0", lambda m: m(f32(0, 2, 4))),
    ("zero_length_batch_first", dict(batch_first=True), RuntimeError, r"sequence length to be larger than 0",
     lambda m: m(f32(2, 0, 4))),
    ("zero_length_unbatched", {}, RuntimeError, r"sequence length to be larger than 0", lambda m: m(f32(0, 4))),
    # Raised by torch's pack_padded_sequence itself, before either module runs.
    ("unsorted_enforce_sorted", {}, RuntimeError, r"must be sorted in decreasing order",
     lambda m: m(pack_padded_sequence(f32(3, 2, 4), [2, 3], enforce_sorted=True))),
    ("input_4d", {}, ValueError, r"Expected input to be 2D or 3D, got 4D", lambda m: m(f32(3, 2, 4, 1))),
    ("input_1d", {}, ValueError, r"Expected input to be 2D or 3D, got 1D", lambda m: m(f32(4))),
]


@pytest.mark.parametrize("case", LSTM_BAD_INPUTS, ids=[c[0] for c in LSTM_BAD_INPUTS])
def test_lstm_bad_input_raises_like_torch(case):
    _, kwargs, expected, match, call = case
    torch.manual_seed(0)
    raises_like_torch(expected, match, call, torch.nn.LSTM(4, 5, **kwargs), LSTM(4, 5, **kwargs))


# Packed input: torch's LSTM.forward does not call check_forward_args on a PackedSequence, so its errors come
# from deep inside (an IndexError, or a matmul's RuntimeError); ours raise the same exception types, with
# messages that name what is wrong.
PACKED = lambda dtype=torch.float32: pack_padded_sequence(torch.randn(3, 2, 4, dtype=dtype), [3, 2])  # noqa: E731
PACKED_BAD_INPUTS = [
    # 2-D states with packed input: torch raises IndexError ("Dimension out of range").
    ("hx_2d", IndexError, r"hx and cx should be 3-D but got \(2-D, 2-D\)", lambda m: m(PACKED(), (H0(2, 5), H0(2, 5)))),
    ("cx_2d", IndexError, r"hx and cx should be 3-D but got \(3-D, 2-D\)",
     lambda m: m(PACKED(), (H0(1, 2, 5), H0(2, 5)))),
    ("hx_2d_unsorted", IndexError, r"should be 3-D but got \(2-D, 2-D\)",
     lambda m: m(pack_padded_sequence(f32(3, 2, 4), [2, 3], enforce_sorted=False), (H0(2, 5), H0(2, 5)))),
    ("hx_1d", IndexError, r"should be 3-D but got \(1-D, 1-D\)", lambda m: m(PACKED(), (H0(5), H0(5)))),
    # Input dtype other than the weights': torch raises RuntimeError ("mat1 and mat2 must have the same dtype").
    ("float64_input", RuntimeError, r"RNN input dtype \(torch.float64\) does not match weight dtype",
     lambda m: m(PACKED(torch.float64))),
    ("float64_input_and_states", RuntimeError, r"RNN input dtype \(torch.float64\) does not match weight dtype",
     lambda m: m(PACKED(torch.float64), (H0(1, 2, 5).double(), H0(1, 2, 5).double()))),
    ("bfloat16_input", RuntimeError, r"RNN input dtype \(torch.bfloat16\)", lambda m: m(PACKED(torch.bfloat16))),
    ("int64_input", RuntimeError, r"RNN input dtype \(torch.int64\)",
     lambda m: m(pack_padded_sequence(torch.ones(3, 2, 4, dtype=torch.long), [3, 2]))),
]


@pytest.mark.parametrize("case", PACKED_BAD_INPUTS, ids=[c[0] for c in PACKED_BAD_INPUTS])
def test_packed_bad_input_raises_like_torch(case):
    _, expected, match, call = case
    torch.manual_seed(0)
    raises_like_torch(expected, match, call, torch.nn.LSTM(4, 5), LSTM(4, 5))


def test_float32_cx_with_float64_input_is_rejected():
    # torch's float64 path silently accepts a float32 c0 next to float64 input and h0 (its float32 path, through
    # oneDNN, rejects mixed states); ours rejects it in both, naming the tensor and the dtypes.
    torch.manual_seed(0)
    ref, ours = torch.nn.LSTM(4, 5, dtype=torch.float64), LSTM(4, 5, dtype=torch.float64)
    x, h0, c0 = f64(3, 2, 4), H0(1, 2, 5).double(), H0(1, 2, 5)
    assert ref(x, (h0, c0))[1][1].dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"cx dtype \(torch.float32\) does not match input dtype \(torch.float64"):
        ours(x, (h0, c0))


def test_jit_trace_with_its_check_and_training_after_a_no_grad_trace():
    # torch.jit.trace reruns the module without grad to check the graph: the traced path must not depend on the
    # grad mode, and a module traced under no_grad must still train, as torch's does.
    torch.manual_seed(0)
    ours = LSTM(4, 6, num_layers=2)
    x = f32(5, 3, 4)
    traced = torch.jit.trace(ours, (x,))
    x2 = f32(7, 2, 4)
    torch.testing.assert_close(traced(x2)[0], ours(x2)[0])
    with torch.no_grad():
        traced_without_grad = torch.jit.trace(ours, (x,))
    traced_without_grad(x2)[0].sum().backward()
    expected = torch.autograd.grad(ours(x2)[0].sum(), ours.weight_ih_l0)[0]
    torch.testing.assert_close(ours.weight_ih_l0.grad, expected)


CELL_BAD_INPUTS = [
    ("feature_size", RuntimeError, r"input has inconsistent input_size: got 6 expected 4",
     lambda m: m(f32(2, 6))),
    ("hx_batch", RuntimeError, r"Input batch size 2 doesn't match hidden0 batch size 3",
     lambda m: m(f32(2, 4), (H0(3, 5), H0(3, 5)))),
    ("hx_hidden", RuntimeError, r"hidden0 has inconsistent hidden_size: got 6, expected 5",
     lambda m: m(f32(2, 4), (H0(2, 6), H0(2, 5)))),
    ("cx_hidden", RuntimeError, r"hidden1 has inconsistent hidden_size: got 6, expected 5",
     lambda m: m(f32(2, 4), (H0(2, 5), H0(2, 6)))),
    ("hx_3d", ValueError, r"Expected hx\[0\] to be 1D or 2D, got 3D", lambda m: m(f32(2, 4), (H0(1, 2, 5),) * 2)),
    ("hx_2d_unbatched", RuntimeError, r"hidden0 has inconsistent hidden_size: got 1, expected 5",
     lambda m: m(f32(4), (H0(1, 5), H0(1, 5)))),
    ("input_3d", ValueError, r"Expected input to be 1D or 2D, got 3D", lambda m: m(f32(1, 2, 4))),
    ("hx_float64", RuntimeError, r"mat1 and mat2 must have the same dtype",  # torch's own cell raises it
     lambda m: m(f32(2, 4), (H0(2, 5).double(), H0(2, 5).double()))),
    ("float16_input", RuntimeError, r"input dtype \(torch.float16\) does not match weight dtype",
     lambda m: m(f32(2, 4).half())),
    ("int_input", RuntimeError, r"input dtype \(torch.int64\) does not match weight dtype",
     lambda m: m(torch.ones(2, 4).long())),
    ("float64_input", RuntimeError, r"input dtype \(torch.float64\) does not match weight dtype",
     lambda m: m(f64(2, 4))),
]


@pytest.mark.parametrize("cx_dtype", [torch.float64, torch.bfloat16])
def test_lstm_cell_cell_state_of_another_dtype_promotes_as_torch(cx_dtype):
    # torch's cell promotes the pointwise math with the cell state's dtype: a float64 c gives float64 h and c.
    torch.manual_seed(0)
    ref, ours = torch.nn.LSTMCell(4, 5), LSTMCell(4, 5)
    ours.load_state_dict(ref.state_dict())
    x, h = f32(2, 4), H0(2, 5)
    c = H0(2, 5).to(cx_dtype).requires_grad_()
    outs = [m(x, (h, c)) for m in (ref, ours)]
    (h_ref, c_ref), (h_ours, c_ours) = outs
    assert h_ours.dtype == h_ref.dtype and c_ours.dtype == c_ref.dtype
    torch.testing.assert_close((h_ours, c_ours), (h_ref, c_ref))
    grads = [torch.autograd.grad(out[0].sum() + out[1].sum(), c) for out in outs]
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("case", CELL_BAD_INPUTS, ids=[c[0] for c in CELL_BAD_INPUTS])
def test_lstm_cell_bad_input_raises_like_torch(case):
    _, expected, match, call = case
    torch.manual_seed(0)
    raises_like_torch(expected, match, call, torch.nn.LSTMCell(4, 5), LSTMCell(4, 5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=0), "hidden_size must be greater than zero"),
    (dict(num_layers=0), "num_layers must be greater than zero"),
    (dict(proj_size=5), "proj_size has to be smaller than hidden_size"),
    (dict(proj_size=-1), "proj_size should be a positive integer or zero"),
    (dict(dropout=1.5), "dropout should be a number in range"),
], ids=str)
def test_bad_constructor_arguments_raise_like_torch(kwargs, match):
    kwargs = dict(dict(input_size=4, hidden_size=5), **kwargs)
    with pytest.raises(ValueError, match=match):
        torch.nn.LSTM(**kwargs)
    with pytest.raises(ValueError, match=match):
        LSTM(**kwargs)


def test_lstm_layer_op_checks_its_arguments():
    # The op itself names the wrong argument and its expected shape/dtype.
    args = layer_args([3, 2, 1], 3, 4, 0, True, requires_grad=False)
    op = torch.ops.fusedlayers.lstm_layer

    def call(**changes):
        a = dict(args, **changes)
        return op(*a.values(), False, False)

    with pytest.raises(RuntimeError, match=r"h0 must have shape \[batch, proj_size or hidden_size\]"):
        call(h0=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="batch_sizes must sum to input.size"):
        call(batch_sizes=torch.tensor([3, 2]))
    with pytest.raises(RuntimeError, match="non-increasing"):
        call(batch_sizes=torch.tensor([2, 3, 1]))
    with pytest.raises(TypeError, match="c0 must have dtype"):
        call(c0=args["c0"].float())
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        call(input=args["input"].half())
    with pytest.raises(RuntimeError, match="b_ih and b_hh must be given together"):
        call(b_hh=None)


def test_lstm_layer_op_takes_states_with_a_leading_one():
    # A one-layer stack passes its [1, B, *] states as they are: h_n, c_n and their gradients keep that shape.
    args = layer_args([3, 2, 1], 3, 4, 2, True)
    flat = dict(args)
    stacked = dict(args, h0=args["h0"].detach().unsqueeze(0).requires_grad_(),
                   c0=args["c0"].detach().unsqueeze(0).requires_grad_())
    results = []
    for a in (flat, stacked):
        out, h_n, c_n = FL.lstm_layer(*a.values())
        grads = torch.autograd.grad(out.sum() + h_n.sum() + 2 * c_n.sum(), [a["h0"], a["c0"]])
        results.append((out, h_n, c_n, *grads))
        assert h_n.shape == a["h0"].shape and c_n.shape == a["c0"].shape
    for flat_t, stacked_t in zip(*results):
        torch.testing.assert_close(stacked_t.reshape(flat_t.shape), flat_t, rtol=0, atol=0)
    op = torch.ops.fusedlayers.lstm_layer
    torch.library.opcheck(op, (*stacked.values(), False, True))
    with pytest.raises(RuntimeError, match=r"h0 must have shape .*\(or \[1, 3, 2\]\), got \[2, 3, 2\]"):
        op(*dict(args, h0=torch.zeros(2, 3, 2, dtype=torch.float64)).values(), False, False)


# ------------------------------------------------------------------------------------------------ dtypes


# Without a projection, bf16 layers run natively where the CPU multiplies bf16 (forward products, and the
# backward's summed gradients with the gate gradients rounded to bf16); with one they compute in float32.
@pytest.mark.parametrize("proj", [PROJ, 0], ids=["proj", "no_proj"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_bfloat16_close_to_float32(kind, proj):
    _, ours32 = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=proj,
                               dtype=torch.float32)
    ours16 = copy.deepcopy(ours32).bfloat16()
    make32 = lstm_inputs(kind, dtype=torch.float32, batch_first=False, num_layers=2, bidirectional=True,
                         proj_size=proj, with_hx=True)
    leaves32, _ = make32()
    # The same (bf16-rounded) values in both computations, so only the arithmetic differs.
    leaves16 = [t.detach().bfloat16().requires_grad_() for t in leaves32]
    with torch.no_grad():
        for t32, t16 in zip(leaves32, leaves16):
            t32.copy_(t16.float())
        for p32, p16 in zip(ours32.parameters(), ours16.parameters()):
            p32.copy_(p16.float())

    def as_input(x):
        return x if kind == "padded" else pack_padded_sequence(x, [2, STEPS, 1], enforce_sorted=False)

    x16, x32 = as_input(leaves16[0]), as_input(leaves32[0])
    out16 = ours16(x16, (leaves16[1], leaves16[2]))
    out32 = ours32(x32, (leaves32[1], leaves32[2]))
    outs16, outs32 = float_outputs(out16), float_outputs(out32)
    for a, b in zip(outs16, outs32):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, **BF16_TOL)
    weights = loss_weights(outs32)
    g16 = torch.autograd.grad(weighted_loss([t.float() for t in outs16], weights), [*leaves16, *ours16.parameters()])
    g32 = torch.autograd.grad(weighted_loss(outs32, weights), [*leaves32, *ours32.parameters()])
    for a, b in zip(g16, g32):
        assert a.dtype == torch.bfloat16
        # Gradients accumulate over steps and rows: scale the tolerance by the gradient's size.
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()))
    # torch's own bfloat16 LSTM gives the same values within the same tolerance.
    ref16 = torch.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, proj_size=proj,
                          dtype=torch.bfloat16)
    ref16.load_state_dict(ours16.state_dict(), strict=True)
    with torch.no_grad():
        ref_out = ref16(x16, (leaves16[1], leaves16[2]))
    for a, b in zip(float_outputs(ref_out), outs32):
        torch.testing.assert_close(a.float(), b, **BF16_TOL)


def test_bfloat16_cell_close_to_float32():
    _, cell32 = make_cell_pair(INPUT_SIZE, HIDDEN, dtype=torch.float32)
    cell16 = copy.deepcopy(cell32).bfloat16()
    x = torch.randn(BATCH, INPUT_SIZE).bfloat16()
    hx = (torch.randn(BATCH, HIDDEN).bfloat16(), torch.randn(BATCH, HIDDEN).bfloat16())
    cell32.load_state_dict({k: v.float() for k, v in cell16.state_dict().items()})
    h16, c16 = cell16(x, hx)
    h32, c32 = cell32(x.float(), (hx[0].float(), hx[1].float()))
    assert h16.dtype == c16.dtype == torch.bfloat16
    torch.testing.assert_close(h16.float(), h32, **BF16_TOL)
    torch.testing.assert_close(c16.float(), c32, **BF16_TOL)


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_float16_module_like_torch(cls):
    """float16 runs in float32 inside (the kernels' types) and returns float16, as torch's layers return it."""
    if cls == "LSTM":
        ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, dtype=torch.float16)
        x = torch.randn(STEPS, BATCH, INPUT_SIZE).half()
    else:
        ref, ours = make_cell_pair(INPUT_SIZE, HIDDEN, dtype=torch.float16)
        x = torch.randn(BATCH, INPUT_SIZE).half()
    assert_same_structure_and_values(ours(x), ref(x), dict(rtol=2e-3, atol=2e-3))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16_autocast", "f16_autocast"])
@pytest.mark.parametrize("low_input", [False, True], ids=["f32_input", "low_input"])
def test_cpu_autocast_like_torch(low_input, autocast_dtype):
    ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, dtype=torch.float32)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    x = x.to(autocast_dtype) if low_input else x
    with torch.autocast("cpu", dtype=autocast_dtype):
        try:
            ref_out = ref(x)
        except RuntimeError as error:
            # On CPUs without AVX512-BF16 (AMD Zen 3) or float16 support, oneDNN cannot build torch's low-precision
            # LSTM primitive from a float32 input; autocast casts the input first, so the cast input is the same
            # reference.
            if "primitive descriptor" not in str(error):
                raise
            ref_out = ref(x.to(autocast_dtype))
        our_out = ours(x)
    for a, b in zip(float_outputs(our_out), float_outputs(ref_out)):
        assert a.dtype == b.dtype == autocast_dtype
        torch.testing.assert_close(a.float(), b.float(), **BF16_TOL)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16_autocast", "f16_autocast"])
@pytest.mark.parametrize("low_input", [False, True], ids=["f32_input", "low_input"])
@pytest.mark.parametrize("kind", ["cell", "packed"])
def test_cpu_autocast_cell_and_packed_dtypes_like_torch(kind, low_input, autocast_dtype):
    # torch autocasts neither its LSTM cell nor its packed LSTM: only their products run in the low precision, and
    # the results take the dtype of the cell state promoted with it (float32 for a float32 state or model).
    if kind == "cell":
        ref, ours = make_cell_pair(INPUT_SIZE, HIDDEN, dtype=torch.float32)
        x = torch.randn(BATCH, INPUT_SIZE)
    else:
        ref, ours = make_lstm_pair(INPUT_SIZE, HIDDEN, num_layers=2, dtype=torch.float32)
        x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    x = x.to(autocast_dtype) if low_input else x
    expected = autocast_dtype if low_input else torch.float32
    for hx in (None, "f32"):
        if kind == "cell":
            args = (x,) if hx is None else (x, (torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)))
        else:
            packed = pack_padded_sequence(x, [STEPS, STEPS - 1, 2])
            args = (packed,) if hx is None else (packed, (torch.randn(2, BATCH, HIDDEN), torch.randn(2, BATCH, HIDDEN)))
        with torch.autocast("cpu", dtype=autocast_dtype):
            ref_out, our_out = ref(*args), ours(*args)
        for a, b in zip(float_outputs(our_out), float_outputs(ref_out)):
            assert a.dtype == b.dtype == (torch.float32 if hx == "f32" else expected)
            torch.testing.assert_close(a.float(), b.float(), **BF16_TOL)


# Sizes where every product path of the float32 kernels is taken: inputs and hidden sizes above one K chunk (256)
# of the AVX2 strip panels, hidden sizes divisible by 4 (strip panels) or not (plain panels), batches of 1-4 rows
# (the few-row path) and of 5-13 (6-row tiles with a remainder).
LARGE_PRODUCT_CASES = [(300, 64, 13), (40, 260, 7), (300, 260, 1), (270, 36, 4), (257, 30, 9), (50, 80, 5)]


@pytest.mark.parametrize("input_size, hidden, batch", LARGE_PRODUCT_CASES)
def test_float32_large_products_match_torch(input_size, hidden, batch):
    ref, ours = make_lstm_pair(input_size, hidden, dtype=torch.float32)
    x = torch.randn(6, batch, input_size, requires_grad=True)
    out_ref, (h_ref, c_ref) = ref(x)
    out, (h, c) = ours(x)
    tol = dict(rtol=1e-4, atol=1e-5)
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **tol)
    grads_ref = torch.autograd.grad(out_ref.square().sum() + c_ref.sum(), [x, *ref.parameters()])
    grads = torch.autograd.grad(out.square().sum() + c.sum(), [x, *ours.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
