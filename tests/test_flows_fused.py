"""The fused one-pass MADE inverse (C++ op made_inverse) against the composed one-pass inverse and nflows'
D-pass loop, for every MADE option it covers, and the cases it hands back to the composed path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fusedlayers import flows
from fusedlayers.flows import made_plan

TOL = dict(rtol=1e-9, atol=1e-9)


def make_transform(features, seed=0, **kwargs):
    torch.manual_seed(seed)
    t = flows.MaskedAffineAutoregressiveTransform(features, 16, **kwargs).double()
    with torch.no_grad():  # moderate, non-trivial weights (the residual blocks start near zero)
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return t.eval()


OPTIONS = [
    {}, {"use_residual_blocks": False}, {"use_residual_blocks": False, "random_mask": True},
    {"context_features": 3}, {"context_features": 3, "use_residual_blocks": False},
    {"use_batch_norm": True}, {"use_batch_norm": True, "use_residual_blocks": False, "context_features": 2},
    {"activation": torch.tanh}, {"activation": F.elu}, {"activation": F.gelu, "num_blocks": 3},
    {"num_blocks": 0}, {"dropout_probability": 0.3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("features", [1, 2, 7])
def test_fused_inverse_matches_composed_and_d_pass(options, features):
    t = make_transform(features, **options)
    batch = 70  # more than one slab of samples
    y = torch.randn(batch, features, dtype=torch.float64)
    context = torch.randn(batch, options["context_features"], dtype=torch.float64) if "context_features" in options else None
    with torch.no_grad():
        fused = made_plan.made_inverse(t.autoregressive_net, y, context, t._epsilon)
        assert fused is not None
        x, logdet = t.inverse(y, context)
        passes = t._inverse_by_passes(y, context)
    composed = t.inverse(y.clone().requires_grad_(), context)  # autograd recording: the composed path
    for ours in (fused, (x, logdet)):
        torch.testing.assert_close(ours[0], composed[0].detach(), **TOL)
        torch.testing.assert_close(ours[1], composed[1].detach(), **TOL)
        torch.testing.assert_close(ours[0], passes[0], **TOL)
        torch.testing.assert_close(ours[1], passes[1], **TOL)
    with torch.no_grad():
        back, forward_logdet = t(x, context)
    torch.testing.assert_close(back, y, **TOL)
    torch.testing.assert_close(forward_logdet, -logdet, **TOL)


def test_float32_matches_float64():
    t = make_transform(12)
    y = torch.randn(300, 12, dtype=torch.float64)
    with torch.no_grad():
        x64, l64 = t.inverse(y)
        x32, l32 = t.float().inverse(y.float())
    torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-4)


def test_gradients_take_the_composed_path():
    t = make_transform(4)
    y = torch.randn(5, 4, dtype=torch.float64)
    x, logdet = t.inverse(y)  # parameters require grad: differentiable
    assert x.requires_grad and logdet.requires_grad
    (x.sum() + logdet.sum()).backward()
    assert all(p.grad is not None for p in t.autoregressive_net.initial_layer.parameters())


def test_uncovered_cases_fall_back():
    t = make_transform(3, activation=torch.sigmoid)
    y = torch.randn(4, 3, dtype=torch.float64)
    assert made_plan.made_inverse(t.autoregressive_net, y, None, t._epsilon) is None
    with torch.no_grad():
        x, _ = t.inverse(y)
        back, _ = t(x)
    torch.testing.assert_close(back, y, **TOL)


def test_empty_batch():
    t = make_transform(3)
    with torch.no_grad():
        x, logdet = t.inverse(torch.zeros(0, 3, dtype=torch.float64))
    assert x.shape == (0, 3) and logdet.shape == (0,)


def op_arguments(name, run):
    """The arguments made_plan passes to its op `name` while `run` runs."""
    captured = []
    real_op = getattr(made_plan, name)
    setattr(made_plan, name, lambda *args: captured.append(args) or real_op(*args))
    try:
        run()
    finally:
        setattr(made_plan, name, real_op)
    return captured[0]


def test_opcheck():
    t = make_transform(3, context_features=2, use_batch_norm=True)
    y = torch.randn(6, 3, dtype=torch.float64)
    context = torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        captured = op_arguments("_op", lambda: made_plan.made_inverse(t.autoregressive_net, y, context, t._epsilon))
    args = tuple([a.detach() if isinstance(a, torch.Tensor) else
                  [x.detach() if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list) else a
                  for a in captured])
    torch.library.opcheck(torch.ops.fusedlayers.made_inverse.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_bad_stage_description():
    t = make_transform(3)
    y = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="targets must be float32 or float64"):
        torch.ops.fusedlayers.made_inverse(y.long(), [torch.zeros(6, 3, dtype=torch.float64)], [None], [None], [None],
                                           [None], torch.zeros(1, 5, dtype=torch.long),
                                           torch.zeros(1, 2, 5, dtype=torch.long), 0, 1e-3)
    with pytest.raises(RuntimeError, match="2 rows per feature"):
        torch.ops.fusedlayers.made_inverse(y, [torch.zeros(5, 3, dtype=torch.float64)], [None], [None], [None],
                                           [None], torch.tensor([[0, 1, -1, 0, 0]]),
                                           torch.zeros(1, 2, 5, dtype=torch.long), 0, 1e-3)
    del t


# ----------------------------------------------------------------------------------- the fused forward pass
FORWARD_OPTIONS = [o for o in OPTIONS if "use_batch_norm" not in o] + [{"dropout_probability": 0.3, "eval": True}]


@pytest.mark.parametrize("options", FORWARD_OPTIONS, ids=lambda o: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("features", [1, 2, 7])
def test_fused_forward_matches_composed(options, features):
    options = dict(options)
    evaluate = options.pop("eval", False)
    t = make_transform(features, **options)
    t.train(not evaluate and "dropout_probability" not in options)
    x = torch.randn(70, features, dtype=torch.float64, requires_grad=True)
    context = (torch.randn(70, options["context_features"], dtype=torch.float64, requires_grad=True)
               if "context_features" in options else None)
    fused = made_plan.made_forward(t.autoregressive_net, x, context, t._epsilon)
    assert fused is not None
    composed = t._forward_composed(x, context)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, **TOL)
    weights = (torch.randn_like(fused[0]), torch.randn_like(fused[1]))
    wrt = [x, *t.parameters()] + ([context] if context is not None else [])
    g1 = torch.autograd.grad((fused[0] * weights[0]).sum() + (fused[1] * weights[1]).sum(), wrt, allow_unused=True)
    g2 = torch.autograd.grad((composed[0] * weights[0]).sum() + (composed[1] * weights[1]).sum(), wrt,
                             allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None or not a.any()
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(a, b, **TOL)


def _rows_near_a_relu_kink(transform, x, c, margin=1e-5):
    """Rows of x for which some activation input lies within `margin` of zero (in float64): there float32
    rounding in a different summation order may put it on the other side of relu's kink, and that row's input
    gradient then differs by the unit's whole contribution (seen once: |z| = 9e-8 at hidden width 300)."""
    t64 = copy.deepcopy(transform).double()
    near = torch.zeros(x.shape[0], dtype=torch.bool)

    def recording(z, act):
        nonlocal near
        near |= (z.abs() < margin).any(dim=1)
        return act(z)

    for m in t64.modules():
        if hasattr(m, "activation"):
            m.activation = (lambda act: lambda z: recording(z, act))(m.activation)
    with torch.no_grad():
        t64._forward_composed(x.detach().double(), None if c is None else c.double())
    return near


@settings(max_examples=25, deadline=None)
@given(features=st.integers(1, 70), hidden=st.sampled_from([5, 16, 20, 48, 300]), batch=st.integers(1, 140),
       residual=st.booleans(), context=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_forward_float32_shapes(features, hidden, batch, residual, context, seed):
    """float32 runs its own product kernels (16-unit strips on AVX2 CPUs): partial and empty strips, hidden
    widths past one K chunk (256) and row counts that leave tile tails, against the composed torch path."""
    torch.manual_seed(seed)
    t = flows.MaskedAffineAutoregressiveTransform(features, hidden, context_features=3 if context else None,
                                                  use_residual_blocks=residual)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(batch, features, requires_grad=True)
    c = torch.randn(batch, 3) if context else None
    fused = made_plan.made_forward(t.autoregressive_net, x, c, t._epsilon)
    composed = t._forward_composed(x, c)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Gradients of a loss over the rows that no relu kink makes ambiguous (rows are independent here).
    keep = ~_rows_near_a_relu_kink(t, x, c)
    g1 = torch.autograd.grad(fused[0][keep].sum() + fused[1][keep].sum(), [x, *t.parameters()], allow_unused=True)
    g2 = torch.autograd.grad(composed[0][keep].sum() + composed[1][keep].sum(), [x, *t.parameters()],
                             allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_fused_forward_float32_logdet_over_a_wide_range_of_scales():
    """The float32 kernels take their own vectorised log: scales from the epsilon floor (1e-3) to 1e4 against
    float64, and NaN scales (those lanes take the library log) where the composed path gives NaN."""
    torch.manual_seed(0)
    t = flows.MaskedAffineAutoregressiveTransform(24, 32, use_residual_blocks=False)
    with torch.no_grad():
        final = t.autoregressive_net.final_layer
        final.weight.zero_()
        final.bias.copy_(torch.linspace(-40, 1e4, final.bias.numel()))
    x = torch.randn(300, 24)
    fused = made_plan.made_forward(t.autoregressive_net, x, None, t._epsilon)
    reference = copy.deepcopy(t).double()._forward_composed(x.double(), None)
    torch.testing.assert_close(fused[1].double(), reference[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused[0].double(), reference[0], rtol=1e-5, atol=1e-3)  # outputs up to 1e4
    with torch.no_grad():
        final.bias[4] = float("nan")  # feature 3's scale
    fused = made_plan.made_forward(t.autoregressive_net, x, None, t._epsilon)
    composed = t._forward_composed(x, None)
    assert fused[1].isnan().all() and composed[1].isnan().all()
    with pytest.raises(ValueError, match="inputs contains NaN or infinite values"):
        x[3, 0] = float("inf")  # the op checks its inputs in its own pass
        made_plan.made_forward(t.autoregressive_net, x, None, t._epsilon)


def test_fused_forward_gradcheck():
    t = make_transform(3, context_features=2)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    context = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: t(a, c), (x, context))
    t2 = make_transform(4, use_residual_blocks=False, activation=F.gelu)
    assert torch.autograd.gradcheck(lambda a: t2(a), (torch.randn(6, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compiled", [False, True])
def test_parameter_gradients_without_an_input_gradient(dtype, compiled):
    # x that needs no gradient: the backward skips the first layer's dA; the parameters' gradients are those of
    # a call where x needs one, and x's gradient there is still right.
    t = make_transform(5, context_features=2).to(dtype)
    x = torch.randn(40, 5, dtype=dtype)
    context = torch.randn(40, 2, dtype=dtype, requires_grad=True)
    run = torch.compile(t, fullgraph=True, backend="aot_eager") if compiled else t

    def grads(inputs):
        y, lad = run(inputs, context)
        loss = (y.pow(2).sum(1) - lad).sum()
        wanted = [p for p in t.parameters()] + [context] + ([inputs] if inputs.requires_grad else [])
        return torch.autograd.grad(loss, wanted)

    without = grads(x)
    with_x = grads(x.clone().requires_grad_())
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(without, with_x):
        torch.testing.assert_close(a, b, **tol)


def test_saved_activations_are_not_reused_while_a_graph_holds_them():
    # The forward's saved activations come from a pool that hands memory out again only once nothing refers to
    # it: graphs alive at once, a retained graph, and a saved tensor kept by the user each keep theirs.
    t = make_transform(6, use_residual_blocks=False).float()
    xs = [torch.randn(300, 6) for _ in range(3)]

    def param_grads(loss):
        return torch.autograd.grad(loss, list(t.parameters()), retain_graph=True)

    alone = [param_grads(sum(v.sum() for v in t(x))) for x in xs]
    losses = [sum(v.sum() for v in t(x)) for x in xs]  # three graphs alive together
    for loss, expected in zip(reversed(losses), reversed(alone)):
        for a, b in zip(param_grads(loss), expected):
            torch.testing.assert_close(a, b)
    for loss, expected in zip(losses, alone):  # the retained graphs again, after the others ran
        for a, b in zip(param_grads(loss), expected):
            torch.testing.assert_close(a, b)
    del losses
    for x, expected in zip(xs, alone):  # and the freed memory in use again
        for a, b in zip(param_grads(sum(v.sum() for v in t(x))), expected):
            torch.testing.assert_close(a, b)


def test_scratch_kept_by_threads_gives_the_same_results_everywhere():
    """The kernels keep their slab buffers and weight-gradient sums per thread from call to call: results must
    not depend on the thread count (one thread runs every worker's share), on a differently shaped network run
    in between, or on calls from several Python threads at once."""
    import concurrent.futures

    torch.manual_seed(0)
    t = make_transform(20, use_residual_blocks=True).float()
    other = make_transform(7, use_residual_blocks=False).float()
    x = torch.randn(700, 20)  # several slabs per worker

    def run(transform=t, inputs=x):
        y, logdet = transform(inputs)
        grads = torch.autograd.grad(y.square().sum() + logdet.sum(), list(transform.parameters()))
        return [y.detach(), logdet.detach(), *grads]

    def same(results, expected):
        for a, b in zip(results, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    expected = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        same(run(), expected)
    finally:
        torch.set_num_threads(threads)
    run(other, torch.randn(50, 7))  # another shape through the same threads' buffers
    same(run(), expected)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for results in pool.map(lambda _: run(), range(4)):
            same(results, expected)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads_freed", "grads_accumulated"])
def test_pooled_weight_gradients_are_never_shared(set_to_none):
    # The weight gradients come from the pool too: each step's .grad (taken over by autograd, or added into)
    # must hold that step's values, whatever the other transform of the same shapes does in between, and
    # gradients a user keeps must not change afterwards.
    torch.manual_seed(0)
    a, b = (make_transform(6).float() for _ in range(2))
    kept = []
    for step in range(4):
        for t in (a, b):
            x = torch.randn(200, 6)
            expected = torch.autograd.grad(sum(v.sum() for v in t(x)), list(t.parameters()))
            if set_to_none:
                t.zero_grad(set_to_none=True)
            before = [None if p.grad is None else p.grad.clone() for p in t.parameters()]
            sum(v.sum() for v in t(x)).backward()
            for p, old, e in zip(t.parameters(), before, expected):
                torch.testing.assert_close(p.grad, e if old is None else old + e)
            kept.append([(p.grad, p.grad.clone()) for p in t.parameters()] if set_to_none else [])
    for grads in kept:  # freed by zero_grad only: the user's references kept their values
        for g, copy in grads:
            torch.testing.assert_close(g, copy, rtol=0, atol=0)


def test_saved_activation_pool_stays_bounded():
    # Batch sizes that come and go (a last smaller batch, variable batches): the pool drops free buffers of
    # shapes no longer used and holds at most 256 MiB; clear_weight_cache empties it.
    import fusedlayers
    t = flows.MaskedAffineAutoregressiveTransform(16, 256, use_residual_blocks=False).double()
    for n in range(1000, 1040):
        y, lad = t(torch.randn(n, 16, dtype=torch.float64))
        (y.sum() + lad.sum()).backward()
        assert fusedlayers._C._pooled_bytes() <= 256 << 20
    assert fusedlayers._C._pooled_bytes() > 0
    fusedlayers.clear_weight_cache()
    assert fusedlayers._C._pooled_bytes() == 0


def test_fused_forward_is_taken_and_falls_back():
    t = make_transform(3)
    calls = []
    real_op = made_plan._forward_op
    made_plan._forward_op = lambda *a: calls.append(1) or real_op(*a)
    try:
        t(torch.randn(4, 3, dtype=torch.float64))
        assert calls == [1]
        bn = make_transform(3, use_batch_norm=True)
        assert made_plan.made_forward(bn.autoregressive_net, torch.randn(4, 3, dtype=torch.float64), None, 1e-3) is None
        dropout = make_transform(3, dropout_probability=0.5).train()
        assert made_plan.made_forward(dropout.autoregressive_net, torch.randn(4, 3, dtype=torch.float64), None,
                                      1e-3) is None
    finally:
        made_plan._forward_op = real_op


def test_fused_forward_opcheck_and_compile():
    t = make_transform(3, context_features=2)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    context = torch.randn(6, 2, dtype=torch.float64)
    captured = op_arguments("_forward_op", lambda: t(x, context))
    torch.library.opcheck(torch.ops.fusedlayers.made_forward.default, captured)
    compiled = torch.compile(lambda a, c: t(a, c), fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, context), t(x, context)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("module", [torch.nn.ReLU, torch.nn.Tanh, torch.nn.ELU, torch.nn.GELU])
def test_zuko_style_activation_modules_take_the_fused_ops(module):
    t = make_transform(4, activation=module(), use_residual_blocks=False)
    y = torch.randn(9, 4, dtype=torch.float64)
    with torch.no_grad():
        assert made_plan.made_inverse(t.autoregressive_net, y, None, t._epsilon) is not None
        assert made_plan.made_forward(t.autoregressive_net, y, None, t._epsilon) is not None
        x, _ = t.inverse(y)
        torch.testing.assert_close(t._forward_composed(x, None)[0], y, **TOL)
    assert made_plan.activation_code(torch.nn.ELU(alpha=0.5)) is None


def test_sorted_weights_follow_a_mask_changed_through_data():
    t = make_transform(4)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        t(x)  # caches the sorted weights
        t.autoregressive_net.initial_layer.mask.data.mul_(0.5)  # bumps no version counter
        torch.testing.assert_close(t(x)[0], t._forward_composed(x, None)[0], **TOL)


@pytest.mark.parametrize("replace", ["weight", "bias", "mask", "dtype"])
def test_layer_lists_follow_replaced_tensors(replace):
    """The op's layer lists are kept between calls: a parameter or buffer replaced afterwards (or the module
    moved to another dtype) must be seen by the next call."""
    t = make_transform(4, use_residual_blocks=False)
    x = torch.randn(5, 4, dtype=torch.float64)
    layer = t.autoregressive_net.blocks[0].linear
    with torch.no_grad():
        t(x)
        if replace == "weight":
            layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))
        elif replace == "bias":
            layer.bias = torch.nn.Parameter(torch.randn_like(layer.bias))
        elif replace == "mask":  # a new tensor (of a valid MADE mask: the same one)
            layer.mask = layer.mask.clone()
        else:
            t.float()
            x = x.float()
        tol = TOL if replace != "dtype" else dict(rtol=1e-5, atol=1e-5)
        for ours, composed in zip(t(x), t._forward_composed(x, None)):
            torch.testing.assert_close(ours, composed, **tol)
        lists = made_plan._ForwardPlan.of(t.autoregressive_net).layers_without_context
        assert any(m is layer.mask for m in lists.masks) and any(w is layer.weight for w in lists.weights)


def test_relu_keeps_nan_as_torch_does():
    t = make_transform(3, use_residual_blocks=False)
    with torch.no_grad():
        t.autoregressive_net.initial_layer.bias.fill_(float("nan"))
        x = torch.randn(2, 3, dtype=torch.float64)
        assert torch.isnan(t(x)[0][:, 1:]).all()  # feature 1 reads no hidden unit
        assert torch.isnan(t._forward_composed(x, None)[0][:, 1:]).all()


# ------------------------------------------------------------------------------- the affine coupling map
def coupling_reference(x, params, inverse):
    half = x.shape[1]
    shift, scale = params[:, :half], torch.sigmoid(params[:, half:] + 2) + 1e-3
    log_scale = torch.log(scale).flatten(1).sum(1)
    return ((x - shift) / scale, -log_scale) if inverse else (x * scale + shift, log_scale)


@pytest.mark.parametrize("shape", [(5, 3), (4, 7, 2, 3), (3, 37), (0, 4)])
@pytest.mark.parametrize("inverse", [False, True])
def test_coupling_op_matches_formula(shape, inverse):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = torch.randn(shape[0], 2 * shape[1], *shape[2:], dtype=torch.float64, requires_grad=True)
    ours = torch.ops.fusedlayers.coupling_affine(x, params, inverse)
    ref = coupling_reference(x, params, inverse)
    weights = (torch.randn_like(ours[0]), torch.randn_like(ours[1]))
    g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights)), (x, params))
    g2 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, weights)), (x, params))
    for a, b in zip((*ours, *g1), (*ref, *g2)):
        torch.testing.assert_close(a, b, **TOL)
    if shape[0]:
        assert torch.autograd.gradcheck(lambda a, p: torch.ops.fusedlayers.coupling_affine(a, p, inverse), (x, params))
        torch.library.opcheck(torch.ops.fusedlayers.coupling_affine.default, (x, params, inverse))


def test_coupling_op_bad_input():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="params must have shape"):
        torch.ops.fusedlayers.coupling_affine(x, torch.randn(4, 5, dtype=torch.float64), False)
    with pytest.raises(TypeError, match="float32 or both float64"):
        torch.ops.fusedlayers.coupling_affine(x, torch.randn(4, 6), False)


def test_sorted_weight_op():
    torch.manual_seed(0)
    weight = torch.randn(5, 4, dtype=torch.float64)
    mask = (torch.rand(5, 4) > 0.5).double()
    out_perm, in_perm = torch.tensor([4, 2, 0, 1, 3]), torch.tensor([1, 3, 0, 2])
    op = torch.ops.fusedlayers.made_sorted_weight
    expected = (weight * mask)[out_perm][:, in_perm]
    torch.testing.assert_close(op(weight, mask, out_perm, in_perm), expected, rtol=0, atol=0)
    with torch.no_grad():
        weight.mul_(2)  # a changed weight is sorted again, not served from the cache
    torch.testing.assert_close(op(weight, mask, out_perm, in_perm), 2 * expected, rtol=0, atol=0)
    torch.library.opcheck(op.default, (weight, mask, out_perm, in_perm),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="repeating an index"):
        op(weight, mask, torch.tensor([0, 0, 1, 2, 3]), in_perm)
