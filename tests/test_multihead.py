"""fusedlayers.nn.MultiheadAttention (and functional.multi_head_attention_forward) against torch's with the same
weights: every constructor option, masks, empty and unbatched shapes, train/eval, state_dict, torch's own
ModuleInfo samples, gradcheck, torch.compile and bad input.

need_weights=False runs our fused kernel; need_weights=True materialises the weights through torch's own path, so
those cases mostly check that the hand-over keeps torch's behaviour. Biases are randomised (torch zero-initialises
them, which would hide a bias that is dropped or added twice).
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fusedlayers

E, H = 8, 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
F64 = torch.float64


def _pair(dtype=F64, embed_dim=E, num_heads=H, **kw):
    """torch's layer with random biases, and ours loaded from its state_dict (strict)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ours = fusedlayers.nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _seq(length, batch, features, batch_first=False, dtype=F64):
    shape = (batch, length, features) if batch_first else (length, batch, features)
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _run(module, args, call):
    """Outputs and the gradients of a loss on them w.r.t. every input/mask that requires grad and every parameter."""
    leaves = list({id(t): t for t in (*args, *call.values())
                   if isinstance(t, torch.Tensor) and t.requires_grad}.values())
    out, weights = module(*args, **call)
    loss = out.square().sum() + (0 if weights is None else weights.square().sum())
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True) if loss.requires_grad else ()
    return out, weights, grads


def _check(ref, ours, args, tol, **call):
    ro, rw, rg = _run(ref, args, call)
    oo, ow, og = _run(ours, args, call)
    assert oo.shape == ro.shape and oo.dtype == ro.dtype
    torch.testing.assert_close(oo, ro, **tol)
    assert (ow is None) == (rw is None)
    if rw is not None:
        torch.testing.assert_close(ow, rw, **tol)
    assert len(og) == len(rg)
    for k, (a, b) in enumerate(zip(og, rg)):
        assert (a is None) == (b is None), k
        if b is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"gradient {k}: {m}")
    return oo, ro


# 1. Every constructor option ------------------------------------------------------------------------------------

CTOR_GRID = [pytest.param(dict(bias=b, add_bias_kv=bkv, add_zero_attn=z, kdim=kd, vdim=vd, batch_first=bf),
                          id=f"bias{int(b)}-biaskv{int(bkv)}-zero{int(z)}-kv{kd}x{vd}-bf{int(bf)}")
             for b, bkv, z, (kd, vd), bf in itertools.product([True, False], [False, True], [False, True],
                                                              [(None, None), (5, 7)], [False, True])]
# average_attn_weights only matters when the weights are returned
WEIGHT_MODES = [pytest.param(False, True, id="no_weights"), pytest.param(True, True, id="avg_weights"),
                pytest.param(True, False, id="head_weights")]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("need_weights,average", WEIGHT_MODES)
@pytest.mark.parametrize("kw", CTOR_GRID)
def test_matches_torch_for_every_option(kw, need_weights, average, dtype):
    ref, ours = _pair(dtype=dtype, **kw)
    bf, n, lq, lk = kw["batch_first"], 3, 4, 6
    q = _seq(lq, n, E, bf, dtype)
    k, v = _seq(lk, n, kw["kdim"] or E, bf, dtype), _seq(lk, n, kw["vdim"] or E, bf, dtype)
    cases = [(q, k, v)]
    if kw["kdim"] is None:  # self-attention and shared key/value take the packed projection's shared GEMMs
        cases += [(q, q, q), (q, k, k)]
    for args in cases:
        s = args[1].shape[1 if bf else 0]
        mask = torch.randn(lq, s, dtype=dtype, requires_grad=True)  # a float mask gets a gradient in torch too
        for extra in (dict(), dict(attn_mask=mask)):
            _check(ref, ours, args, TOL[dtype], need_weights=need_weights, average_attn_weights=average, **extra)


# 2. Masks -------------------------------------------------------------------------------------------------------

MASK_KINDS = ["kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float",
              "both_bool", "both_float", "causal", "causal_and_kpm"]


def _masks(kind, lq, lk, n, mask_grad, dtype=F64):
    """Random masks (True / -inf = may not attend) that leave key 0 visible, so no query row is fully masked."""
    g = torch.Generator().manual_seed(1)

    def mask(*shape, float_):
        hide = torch.rand(*shape, generator=g) < 0.35
        hide[..., 0] = False
        if not float_:
            return hide
        m = torch.randn(*shape, generator=g, dtype=dtype).masked_fill(hide, float("-inf"))
        return m.requires_grad_(mask_grad)

    float_ = kind.endswith("float") or kind.startswith("causal")  # causal: a float kpm, like the float causal mask
    call = {}
    if kind.startswith(("kpm", "both")) or kind == "causal_and_kpm":
        call["key_padding_mask"] = mask(n, lk, float_=float_)
    if kind.startswith(("attn2d", "both")):
        call["attn_mask"] = mask(lq, lk, float_=float_)
    if kind.startswith("attn3d"):
        call["attn_mask"] = mask(n * H, lq, lk, float_=float_)
    if kind.startswith("causal"):
        call["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(lq, dtype=dtype)
        call["is_causal"] = True
    return call


MASK_CASES = [pytest.param(kind, grad, id=f"{kind}{'-grad' if grad else ''}")
              for kind in MASK_KINDS for grad in ([False, True] if kind.endswith("float") else [False])]
MASK_CTORS = [pytest.param(dict(), id="plain"), pytest.param(dict(add_bias_kv=True), id="biaskv"),
              pytest.param(dict(add_zero_attn=True), id="zero"), pytest.param(dict(kdim=5, vdim=7), id="kvdim"),
              pytest.param(dict(batch_first=True), id="bf")]


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("kw", MASK_CTORS)
@pytest.mark.parametrize("kind,mask_grad", MASK_CASES)
def test_masks_match_torch(kind, mask_grad, kw, need_weights):
    # float masks without grad take torch's fused SDPA kernel, with grad its math path: both are compared
    ref, ours = _pair(**kw)
    bf, n = kw.get("batch_first", False), 2
    lq = lk = 5  # is_causal is a self-attention hint: square masks
    q = _seq(lq, n, E, bf)
    k, v = _seq(lk, n, kw.get("kdim") or E, bf), _seq(lk, n, kw.get("vdim") or E, bf)
    _check(ref, ours, (q, k, v), TOL[F64], need_weights=need_weights, **_masks(kind, lq, lk, n, mask_grad))
    if "kdim" not in kw:
        _check(ref, ours, (q, q, q), TOL[F64], need_weights=need_weights, **_masks(kind, lq, lq, n, mask_grad))


def _fully_masked(n=3, lq=4, lk=5):
    padding = torch.zeros(n, lk, dtype=torch.bool)
    padding[1] = True  # batch element 1: every key padded
    attn = torch.zeros(lq, lk, dtype=torch.bool)
    attn[2] = True  # query 2: every key masked
    return padding, attn


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_fully_masked_rows_match_torch(need_weights):
    """In training with autograd, torch 2.13's SDPA returns zeros (finite, like ours) for a query that may attend
    to no key, so ours must equal it, gradients included. With need_weights=True torch's softmax gives NaN there;
    ours runs torch's path then and gives the same NaN."""
    ref, ours = _pair()
    q, k = _seq(4, 3, E), _seq(5, 3, E)
    padding, attn = _fully_masked()
    for call in (dict(key_padding_mask=padding), dict(attn_mask=attn),
                 dict(key_padding_mask=padding.double().masked_fill(padding, float("-inf")))):
        ro, rw = ref(q, k, k, need_weights=need_weights, **call)
        oo, ow = ours(q, k, k, need_weights=need_weights, **call)
        if need_weights:
            assert ro.isnan().any()
            torch.testing.assert_close(oo, ro, **TOL[F64], equal_nan=True)
            torch.testing.assert_close(ow, rw, **TOL[F64], equal_nan=True)
        else:
            assert ro.isfinite().all()
            _check(ref, ours, (q, k, k), TOL[F64], need_weights=False, **call)


def test_fully_masked_rows_eval_fast_path_nan_vs_zeros():
    """torch's eval fast path (self-attention, batch_first, no grad) gives NaN for a fully masked query; ours
    gives zero attention there, so the row is out_proj's bias. Every other row equals torch's."""
    ref, ours = _pair(batch_first=True)
    ref.eval(), ours.eval()
    x = torch.randn(3, 5, E, dtype=F64)
    padding, _ = _fully_masked(lk=5)
    with torch.no_grad():
        ro, _ = ref(x, x, x, key_padding_mask=padding, need_weights=False)
        oo, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    nan = ro.isnan()
    assert nan[1].all() and not nan[[0, 2]].any()  # the fast path was taken and masked batch 1 entirely
    torch.testing.assert_close(oo[[0, 2]], ro[[0, 2]], **TOL[F64])
    torch.testing.assert_close(oo[1], ours.out_proj.bias.detach().expand(5, E), **TOL[F64])


# 3. Shapes and modes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True), dict(kdim=5, vdim=7, add_bias_kv=True),
                                dict(add_zero_attn=True)], ids=["plain", "bf", "kvdim-biaskv", "zero"])
def test_unbatched_inputs_match_torch(kw, need_weights):
    ref, ours = _pair(**kw)
    q = torch.randn(4, E, dtype=F64, requires_grad=True)
    k = torch.randn(6, kw.get("kdim") or E, dtype=F64, requires_grad=True)
    v = torch.randn(6, kw.get("vdim") or E, dtype=F64, requires_grad=True)
    padding = torch.tensor([False, False, True, False, True, False])
    float_mask = torch.randn(H, 4, 6, dtype=F64, requires_grad=True)
    for call in (dict(), dict(key_padding_mask=padding), dict(attn_mask=float_mask[0]), dict(attn_mask=float_mask),
                 dict(attn_mask=float_mask[0] > 0.5, key_padding_mask=padding)):
        _check(ref, ours, (q, k, v), TOL[F64], need_weights=need_weights, **call)
    if "kdim" not in kw:
        _check(ref, ours, (q, q, q), TOL[F64], need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("lq,lk,n", [(4, 5, 0), (0, 5, 3), (4, 0, 3), (0, 0, 0)])
def test_empty_batch_and_lengths_match_torch(lq, lk, n, need_weights):
    """Empty batch, zero-length query, zero-length key (torch's SDPA gives zeros there, finite): shapes, values
    and (all-zero) gradients as torch's."""
    ref, ours = _pair()
    q, k = _seq(lq, n, E), _seq(lk, n, E)
    oo, _ = _check(ref, ours, (q, k, k), TOL[F64], need_weights=need_weights)
    assert oo.shape == (lq, n, E)


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True), dict(add_bias_kv=True, kdim=5, vdim=5)],
                         ids=["plain", "bf", "biaskv-kvdim"])
def test_train_and_eval_modes_match_torch(kw):
    """dropout=0 in train mode and eval mode, with grad and under no_grad (where torch may take its fast path)."""
    ref, ours = _pair(**kw)
    bf = kw.get("batch_first", False)
    x = _seq(5, 3, E, bf)
    k = _seq(6, 3, kw.get("kdim") or E, bf)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    for training in (True, False):
        ref.train(training), ours.train(training)
        for nw in (False, True):
            _check(ref, ours, (x, k, k), TOL[F64], need_weights=nw)
            if "kdim" not in kw:
                _check(ref, ours, (x, x, x), TOL[F64], need_weights=nw, key_padding_mask=padding)
                with torch.no_grad():
                    torch.testing.assert_close(ours(x, x, x, need_weights=nw, key_padding_mask=padding)[0],
                                               ref(x, x, x, need_weights=nw, key_padding_mask=padding)[0],
                                               **TOL[F64])


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_dropout_is_deterministic_under_manual_seed(need_weights):
    """Dropout masks are not torch's draws (need_weights=False), so only shapes, reproducibility under
    torch.manual_seed and that dropout acts at all are checked."""
    ref, ours = _pair(dropout=0.5)
    q, k = _seq(4, 3, E), _seq(6, 3, E)

    def run(seed):
        torch.manual_seed(seed)
        out, w = ours(q, k, k, need_weights=need_weights)
        (grad,) = torch.autograd.grad(out.square().sum(), q)
        return out, w, grad

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    ref_out, ref_w = ref(q, k, k, need_weights=need_weights)
    assert a[0].shape == ref_out.shape and (a[1] is None) == (ref_w is None)
    assert a[2].isfinite().all()
    ours.eval()
    assert not torch.equal(a[0], ours(q, k, k, need_weights=need_weights)[0])  # dropout did something in training


# 4. state_dict and attributes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(add_bias_kv=True), dict(kdim=5, vdim=5),
                                dict(kdim=E, vdim=6), dict(kdim=E, vdim=E)], ids=str)
def test_state_dict_and_attributes_like_torch(kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **kw)
    ours = fusedlayers.nn.MultiheadAttention(E, H, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    other = fusedlayers.nn.MultiheadAttention(E, H, **kw)
    ref.load_state_dict(other.state_dict(), strict=True)
    for (n, a), b in zip(other.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v"):
        assert (getattr(ours, name) is None) == (getattr(ref, name) is None), name
    assert (ours.in_proj_weight is None) == (kw.get("kdim", E) != E or kw.get("vdim", E) != E)
    assert (ours.kdim, ours.vdim, ours.head_dim, ours.batch_first) == (ref.kdim, ref.vdim, ref.head_dim,
                                                                       ref.batch_first)


# 5. torch's ModuleInfo samples ----------------------------------------------------------------------------------

MODULE_INFOS = [info for info in module_db if info.module_cls is torch.nn.MultiheadAttention]


def test_module_db_has_multihead_attention():
    assert len(MODULE_INFOS) == 1


def _module_db_samples():
    params = []
    for info in MODULE_INFOS:
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=training)
            assert inputs
            for k, sample in enumerate(inputs):
                for nw in (True, False):  # the samples leave need_weights at True: torch's path; False: ours
                    mode = "train" if training else "eval"
                    params.append(pytest.param(info, training, sample, nw, id=f"{mode}-{k}-nw{int(nw)}"))
    return params


def _copy_inputs(args, kwargs):
    """Deep copies with fresh leaves, so the two modules' gradients stay apart."""
    args, kwargs = copy.deepcopy((args, kwargs))
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    return args, kwargs, leaves


@pytest.mark.parametrize("info,training,sample,need_weights", _module_db_samples())
def test_module_db_sample_matches_torch(info, training, sample, need_weights):
    ctor, fwd = sample.constructor_input, sample.forward_input
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(*ctor.args, **ctor.kwargs).to(F64)
    ours = fusedlayers.nn.MultiheadAttention(*ctor.args, **ctor.kwargs).to(F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(training), ours.train(training)
    results = []
    for module in (ref, ours):
        args, kwargs, leaves = _copy_inputs(fwd.args, {**fwd.kwargs, "need_weights": need_weights})
        out, weights = module(*args, **kwargs)
        loss = out.sum() + (0 if weights is None else weights.sum())
        results.append((out, weights, torch.autograd.grad(loss, [*leaves, *module.parameters()])))
    (ro, rw, rg), (oo, ow, og) = results
    torch.testing.assert_close(oo, ro, **TOL[F64])
    assert (ow is None) == (rw is None) == (not need_weights)
    if rw is not None:
        torch.testing.assert_close(ow, rw, **TOL[F64])
    for k, (a, b) in enumerate(zip(og, rg)):
        torch.testing.assert_close(a, b, **TOL[F64], msg=lambda m, k=k: f"gradient {k}: {m}")


def test_module_db_error_inputs_raise_like_torch():
    """torch 2.13's ModuleInfo for MultiheadAttention has no error inputs; if a later torch adds some, they run
    here (ours must raise what torch's raises)."""
    for info in MODULE_INFOS:
        if info.module_error_inputs_func is None:
            continue
        for error in info.module_error_inputs_func(info, device="cpu", dtype=F64, requires_grad=True,
                                                   training=True):
            sample = error.module_error_input
            for cls in (torch.nn.MultiheadAttention, fusedlayers.nn.MultiheadAttention):
                with pytest.raises(error.error_type, match=error.error_regex):
                    m = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
                    if error.error_on != ModuleErrorEnum.CONSTRUCTION_ERROR:
                        args, kwargs, _ = _copy_inputs(sample.forward_input.args, sample.forward_input.kwargs)
                        m.to(F64)(*args, **kwargs)


# 6. gradcheck, torch.compile, functional, bad input -------------------------------------------------------------

@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_gradcheck(need_weights):
    """Inputs, a float mask and every parameter (through torch.func.functional_call) in float64."""
    _, ours = _pair(embed_dim=4, num_heads=2, add_bias_kv=True)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    q, k = torch.randn(2, 2, 4, dtype=F64, requires_grad=True), torch.randn(3, 2, 4, dtype=F64, requires_grad=True)
    mask = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def f(q, k, mask, *params):
        out, w = torch.func.functional_call(ours, dict(zip(names, params)), (q, k, k),
                                            dict(attn_mask=mask, need_weights=need_weights))
        return out if w is None else (out, w)

    assert torch.autograd.gradcheck(f, (q, k, mask, *params))


@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
def test_compiled_model_full_graph_matches_eager(padding):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = fusedlayers.nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
            self.head = torch.nn.Linear(E, 3, dtype=F64)

        def forward(self, x, mask, padding):
            return self.head(self.attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0])

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 5, E, dtype=F64, requires_grad=True)
    mask = torch.randn(5, 5, dtype=F64)
    pad = torch.zeros(2, 5, dtype=F64).index_fill_(1, torch.tensor([3, 4]), float("-inf")) if padding else None
    torch._dynamo.reset()
    try:
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, mask, pad)
        want = model(x, mask, pad)
        torch.testing.assert_close(out, want, **TOL[F64])
        got_grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        want_grads = torch.autograd.grad(want.square().sum(), [x, *model.parameters()])
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, **TOL[F64])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate"])
def test_functional_with_static_kv_matches_torch(separate):
    """static_k/static_v (only reachable through the functional) and explicit projection weights."""
    torch.manual_seed(0)
    lq, lk, n, hd = 4, 5, 3, E // H
    q, k = _seq(lq, n, E), _seq(lk, n, E)
    w = torch.randn(3 * E, E, dtype=F64, requires_grad=True)
    b = torch.randn(3 * E, dtype=F64, requires_grad=True)
    ow, ob = torch.randn(E, E, dtype=F64, requires_grad=True), torch.randn(E, dtype=F64, requires_grad=True)
    static_k = torch.randn(n * H, lk, hd, dtype=F64, requires_grad=True)
    static_v = torch.randn(n * H, lk, hd, dtype=F64, requires_grad=True)
    padding = torch.zeros(n, lk, dtype=torch.bool)
    padding[1, 3:] = True
    wq, wk, wv = w.chunk(3) if separate else (None, None, None)
    leaves = [q, k, w, b, ow, ob, static_k, static_v]
    outs = []
    for fn in (torch.nn.functional.multi_head_attention_forward,
               fusedlayers.functional.multi_head_attention_forward):
        out, weights = fn(q, k, k, E, H, None if separate else w, b, None, None, False, 0.0, ow, ob,
                          key_padding_mask=padding, need_weights=False, use_separate_proj_weight=separate,
                          q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv, static_k=static_k,
                          static_v=static_v)
        assert weights is None
        outs.append((out, torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)))
    (ro, rg), (oo, og) = outs
    torch.testing.assert_close(oo, ro, **TOL[F64])
    for a, b_ in zip(og, rg):
        assert (a is None) == (b_ is None)
        if b_ is not None:
            torch.testing.assert_close(a, b_, **TOL[F64])


@pytest.mark.parametrize("bad_k, bad_v, message", [
    ((3, 5, 4), None, "expecting static_k.size(0) of 6, but got 3"),
    ((6, 5, 3), None, "expecting static_k.size(2) of 4, but got 3"),
    (None, (4, 5, 4), "expecting static_v.size(0) of 6, but got 4"),
    (None, (6, 5, 2), "expecting static_v.size(2) of 4, but got 2"),
    ((3, 5, 4), (4, 5, 4), "expecting static_k.size(0) of 6, but got 3"),
], ids=["k_size0", "k_size2", "v_size0", "v_size2", "both"])
def test_functional_wrong_static_kv_raises_like_torch(bad_k, bad_v, message):
    torch.manual_seed(0)
    n, hd = 3, E // H
    q, k = _seq(4, n, E), _seq(5, n, E)
    w, b = torch.randn(3 * E, E, dtype=F64), torch.randn(3 * E, dtype=F64)
    ow, ob = torch.randn(E, E, dtype=F64), torch.randn(E, dtype=F64)
    static_k = torch.randn(*(bad_k or (n * H, 5, hd)), dtype=F64)
    static_v = torch.randn(*(bad_v or (n * H, 5, hd)), dtype=F64)
    for fn in (torch.nn.functional.multi_head_attention_forward,
               fusedlayers.functional.multi_head_attention_forward):
        with pytest.raises(AssertionError, match=re.escape(message)):
            fn(q, k, k, E, H, w, b, None, None, False, 0.0, ow, ob, need_weights=False, static_k=static_k,
               static_v=static_v)


def _bad_calls():
    """(name, constructor kwargs, forward args/kwargs builder) of inputs torch rejects."""
    x, k6 = torch.randn(4, 3, E), torch.randn(6, 3, E)
    return [
        ("wrong_embed_dim", dict(), lambda: ((torch.randn(4, 3, E + 2),) * 3, {})),
        ("wrong_attn_mask_2d", dict(), lambda: ((x, k6, k6), dict(attn_mask=torch.zeros(4, 7)))),
        ("wrong_attn_mask_3d", dict(), lambda: ((x, k6, k6), dict(attn_mask=torch.zeros(3 * H + 1, 4, 6)))),
        ("attn_mask_1d", dict(), lambda: ((x, k6, k6), dict(attn_mask=torch.zeros(6)))),
        ("wrong_padding_shape", dict(), lambda: ((x, k6, k6), dict(key_padding_mask=torch.zeros(3, 7).bool()))),
        ("int_padding", dict(), lambda: ((x, k6, k6), dict(key_padding_mask=torch.zeros(3, 6, dtype=torch.int)))),
        ("key_value_lengths", dict(), lambda: ((x, k6, torch.randn(7, 3, E)), {})),
        ("key_value_lengths_kvdim", dict(kdim=5, vdim=5),
         lambda: ((x, torch.randn(6, 3, 5), torch.randn(7, 3, 5)), {})),
        ("wrong_kdim_size", dict(kdim=5, vdim=5), lambda: ((x, torch.randn(6, 3, 6), torch.randn(6, 3, 5)), {})),
        ("wrong_vdim_size", dict(kdim=5, vdim=5), lambda: ((x, torch.randn(6, 3, 5), torch.randn(6, 3, 4)), {})),
        ("causal_without_mask", dict(), lambda: ((x, x, x), dict(is_causal=True))),
        ("unbatched_query_batched_key", dict(), lambda: ((torch.randn(4, E), k6, k6), {})),
        ("dtype_mismatch", dict(), lambda: ((x.double(),) * 3, {})),
    ]


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("name,kw,build", [pytest.param(*c, id=c[0]) for c in _bad_calls()])
def test_bad_input_raises_like_torch(name, kw, build, need_weights):
    def raised(cls):
        torch.manual_seed(0)
        module = cls(E, H, **kw)
        args, call = build()
        try:
            module(*args, need_weights=need_weights, **call)
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return type(e)
        return None

    want = raised(torch.nn.MultiheadAttention)
    assert want is not None, f"torch accepts {name}"
    assert raised(fusedlayers.nn.MultiheadAttention) is want


def test_embed_dim_not_divisible_by_heads_raises_like_torch():
    with pytest.raises(AssertionError):
        torch.nn.MultiheadAttention(9, 2)
    with pytest.raises(AssertionError):
        fusedlayers.nn.MultiheadAttention(9, 2)
