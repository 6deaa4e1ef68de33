"""Affine coupling with its conditioner fused (flows/conditioner_plan.py, the made_coupling_forward op): which
conditioners compile, and that the fused pass gives nflows' values in both directions, for every activation,
residual blocks, bias-free layers, float32 and float64, random shapes, NaN inputs; that anything else (context,
batch norm, active dropout, hooks, gradients, other ops) runs the network as built; and opcheck."""

import copy

import nflows.transforms as nt
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from nflows.nn.nets import ResidualNet
from torch import nn

from fusedlayers import flows as fl
from fusedlayers.flows.conditioner_plan import plan_of


class Unconditional(nn.Module):
    """nflows calls a conditioner as net(inputs, context): the usual wrapper around a plain network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, context=None):
        return self.net(x)


class Functional(nn.Module):
    """Activations as functions and a residual addition written out, as users write them."""

    def __init__(self, i, o, hidden=16):
        super().__init__()
        self.first, self.inner, self.last = nn.Linear(i, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, o)

    def forward(self, x, context=None):
        h = F.relu(self.first(x))
        h = h + self.inner(h)
        return self.last(torch.relu(h))


def sequential(activation, hidden=16, layers=2, bias=True):
    def make(i, o):
        mods, width = [], i
        for _ in range(layers):
            mods += [nn.Linear(width, hidden, bias=bias), activation()]
            width = hidden
        return Unconditional(nn.Sequential(*mods, nn.Linear(width, o, bias=bias)))
    return make


CONDITIONERS = {
    "relu": sequential(nn.ReLU),
    "tanh": sequential(nn.Tanh),
    "elu": sequential(nn.ELU),
    "gelu": sequential(nn.GELU),
    "no-bias": sequential(nn.ReLU, bias=False),
    "one-hidden-layer": sequential(nn.ReLU, layers=1),
    "dropout-eval": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.ReLU(), nn.Dropout(0.3),
                                                             nn.Linear(16, o))),
    "tanh-twice": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.Tanh(), nn.Tanh(),
                                                           nn.Linear(16, o))),
    "resnet": lambda i, o: ResidualNet(i, o, hidden_features=16, num_blocks=2),
    "resnet-dropout-eval": lambda i, o: ResidualNet(i, o, hidden_features=16, num_blocks=2, dropout_probability=0.2),
    "functional": Functional,
}


def pair(mask, create, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nt.AffineCouplingTransform(mask, create)
    ours = fl.AffineCouplingTransform(mask, create)
    with torch.no_grad():  # move the last layer off nflows' near-zero start, so the scales vary
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype).eval(), ours.to(dtype).eval()


def assert_same(ref, ours, x, dtype, fused=True):
    """ours matches nflows: in float64 to 1e-12; in float32 as closely as nflows' own float32 result matches the
    float64 truth (an inverse divides by scales down to 1e-3, so rounding grows with the weights)."""
    assert (plan_of(ours.transform_net) is not None) == fused
    with torch.no_grad():
        for method in ("forward", "inverse"):
            ref_out, ref_lad = getattr(ref, method)(x)
            our_out, our_lad = getattr(ours, method)(x)
            if dtype == torch.float64:
                torch.testing.assert_close(our_out, ref_out, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(our_lad, ref_lad, rtol=1e-12, atol=1e-12)
                continue
            truth = copy.deepcopy(ref).double()
            true_out, true_lad = getattr(truth, method)(x.double())
            for ours_t, ref_t, true_t in ((our_out, ref_out, true_out), (our_lad, ref_lad, true_lad)):
                assert torch.equal(ours_t.isnan(), ref_t.isnan())
                finite = ~true_t.isnan()
                ref_err = (ref_t.double() - true_t)[finite].abs().max() if finite.any() else 0.0
                our_err = (ours_t.double() - true_t)[finite].abs().max() if finite.any() else 0.0
                scale = true_t[finite].abs().max() if finite.any() else 0.0
                assert our_err <= 4 * ref_err + 1e-6 * (1 + scale), (method, our_err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONDITIONERS))
def test_fused_conditioner_matches_nflows(name, dtype):
    ref, ours = pair(fl.alternating_mask(7), CONDITIONERS[name], dtype)
    x = torch.randn(37, 7, dtype=dtype)
    assert_same(ref, ours, x, dtype)
    with torch.no_grad():
        y, lad = ours(x)
        back, back_lad = ours.inverse(y)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lad + back_lad, torch.zeros_like(lad), rtol=0, atol=1e-4)


def test_fused_pass_is_taken_without_gradients_only(monkeypatch):
    ref, ours = pair(fl.alternating_mask(6), CONDITIONERS["relu"])
    calls = []
    plan = plan_of(ours.transform_net)
    original = plan.run
    monkeypatch.setattr(plan, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(9, 6)
    with torch.no_grad():
        ours(x)
    assert calls == [1]
    y, lad = ours(x)  # parameters require grad: the network runs as built, and gradients flow
    assert calls == [1] and y.requires_grad
    (y.sum() + lad.sum()).backward()
    assert all(p.grad is not None for p in ours.parameters())
    for p in ours.parameters():
        p.requires_grad_(False)
    ours(x)  # nothing to differentiate, even with grad mode on
    assert calls == [1, 1]
    with torch.inference_mode():
        ours(x)
    assert calls == [1, 1, 1]


class Sigmoid(nn.Module):
    def forward(self, x, context=None):
        return x


UNFUSED = {
    "batch-norm": lambda i, o: ResidualNet(i, o, hidden_features=16, num_blocks=2, use_batch_norm=True),
    "mixed-activations": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.ReLU(), nn.Linear(16, 16),
                                                                  nn.Tanh(), nn.Linear(16, o))),
    "other-op": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.Sigmoid(), nn.Linear(16, o))),
    "leaky-elu": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.ELU(alpha=0.5), nn.Linear(16, o))),
    "tanh-gelu": lambda i, o: Unconditional(nn.Sequential(nn.Linear(i, 16), nn.GELU("tanh"), nn.Linear(16, o))),
    "untraceable": lambda i, o: Untraceable(i, o),
}


class Untraceable(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.linear = nn.Linear(i, o)

    def forward(self, x, context=None):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
            return self.linear(x)
        return self.linear(-x)


@pytest.mark.parametrize("name", list(UNFUSED))
def test_other_conditioners_run_as_built(name):
    ref, ours = pair(fl.alternating_mask(6), UNFUSED[name])
    assert_same(ref, ours, torch.randn(11, 6), torch.float32, fused=False)


def test_context_and_active_dropout_run_as_built():
    create = lambda i, o: ResidualNet(i, o, hidden_features=16, context_features=3, num_blocks=1,  # noqa: E731
                                      dropout_probability=0.5)
    ref, ours = pair(fl.alternating_mask(6), create)
    x, context = torch.randn(11, 6), torch.randn(11, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context)[0], ref(x, context)[0], rtol=1e-5, atol=1e-5)
    # in training mode the dropout is active: outputs follow torch's generator, as the network as built does
    ref.train()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(3)
        expected = ref(x, context)[0]
        torch.manual_seed(3)
        torch.testing.assert_close(ours(x, context)[0], expected, rtol=1e-5, atol=1e-5)
    ours2 = pair(fl.alternating_mask(6), CONDITIONERS["resnet-dropout-eval"])[1].train()
    with torch.no_grad():
        a, b = ours2(x)[0], ours2(x)[0]
    assert not torch.equal(a, b)  # dropout drawn on each call: not the fused (dropout-free) pass


def test_hooks_and_changed_structure_are_respected():
    ref, ours = pair(fl.alternating_mask(6), CONDITIONERS["relu"])
    x = torch.randn(10, 6)
    seen = []
    handle = ours.transform_net.net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        ours(x)
    assert seen == [torch.Size([10, 16])]
    handle.remove()
    # a layer swapped after the first call: the plan is compiled again
    with torch.no_grad():
        ours(x)
        new = nn.Linear(16, 16)
        ours.transform_net.net[2] = new
        ref.transform_net.net[2].load_state_dict(new.state_dict())
    assert_same(ref, ours, x, torch.float32)
    # a weight replaced in place keeps the plan but the op sees the new values
    with torch.no_grad():
        ours.transform_net.net[0].weight.mul_(0.5)
        ref.transform_net.net[0].weight.mul_(0.5)
    assert_same(ref, ours, x, torch.float32)


def test_nan_passes_through_like_nflows():
    ref, ours = pair(fl.alternating_mask(6), CONDITIONERS["relu"])
    x = torch.randn(8, 6)
    x[1, 1] = float("nan")  # an identity feature: the whole row's moving outputs
    x[3, 0] = float("nan")  # a moving feature: that output only
    x[5, 1] = float("inf")
    with torch.no_grad():
        for method in ("forward", "inverse"):
            ref_out, ref_lad = getattr(ref, method)(x)
            our_out, our_lad = getattr(ours, method)(x)
            torch.testing.assert_close(our_out, ref_out, rtol=1e-5, atol=1e-5, equal_nan=True)
            torch.testing.assert_close(our_lad, ref_lad, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_empty_batch_and_wide_features():
    ref, ours = pair(fl.checkerboard_mask(4, 5), CONDITIONERS["resnet"])
    assert_same(ref, ours, torch.randn(0, 20), torch.float32)
    ref, ours = pair(fl.alternating_mask(70), sequential(nn.ReLU, hidden=80))
    assert_same(ref, ours, torch.randn(300, 70), torch.float32)  # several slabs per thread, partial strips


@settings(max_examples=25, deadline=None)
@given(features=st.integers(2, 40), hidden=st.integers(1, 70), layers=st.integers(1, 3),
       batch=st.integers(1, 140), seed=st.integers(0, 1000), activation=st.sampled_from([nn.ReLU, nn.Tanh]))
def test_random_shapes_match_nflows(features, hidden, layers, batch, seed, activation):
    mask = (torch.rand(features, generator=torch.Generator().manual_seed(seed)) < 0.5).long()
    mask[seed % features] = 1  # at least one moving feature
    ref, ours = pair(mask, sequential(activation, hidden=hidden, layers=layers))
    assert_same(ref, ours, torch.randn(batch, features), torch.float32)


def test_opcheck():
    _, ours = pair(fl.alternating_mask(6), CONDITIONERS["resnet"])
    plan = plan_of(ours.transform_net)
    x = torch.randn(9, 6)
    weights = [lin.weight.detach() for lin in plan.linears]
    biases = [lin.bias.detach() for lin in plan.linears]
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.fusedlayers.made_coupling_forward,
                              (x, ours.identity_features, ours.transform_features, weights, biases, plan.info,
                               plan.act, 1e-3, inverse),
                              test_utils=("test_schema", "test_faketensor"))


def test_op_rejects_bad_columns():
    _, ours = pair(fl.alternating_mask(6), CONDITIONERS["relu"])
    plan = plan_of(ours.transform_net)
    weights = [lin.weight.detach() for lin in plan.linears]
    biases = [lin.bias.detach() for lin in plan.linears]
    op = torch.ops.fusedlayers.made_coupling_forward
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="cover each"):
        op(x, torch.tensor([0, 2, 4]), torch.tensor([0, 3, 5]), weights, biases, plan.info, plan.act, 1e-3, False)
    with pytest.raises(RuntimeError, match="outside"):
        op(x, torch.tensor([0, 2, 4]), torch.tensor([1, 3, 6]), weights, biases, plan.info, plan.act, 1e-3, False)
    with pytest.raises(RuntimeError, match="wrong size"):
        op(x, torch.tensor([0, 2]), torch.tensor([1, 3, 4, 5]), weights, biases, plan.info, plan.act, 1e-3, False)


# Networks whose FX graph could be mistaken for a plain chain: each must give the as-built values, fused or not.
class Chain(nn.Module):
    def __init__(self, i, o, body):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(i, 16), nn.Linear(16, 16), nn.Linear(16, o)
        self.drop, self.idt, self.body = nn.Dropout(0.5), nn.Identity(), body

    def forward(self, x, context=None, residual=True):
        return self.body(self, x, residual)


def _aliased_update(m, x, residual):
    y = m.l1(x)
    z = y
    y += m.l2(y)  # FX records y + t; as built, z sees the update
    return m.l3(z)


def _inplace_relu_input(m, x, residual):
    return m.l3(m.l2(m.l1(F.relu(x, inplace=True))))


CHAINS = {
    "dropout-hides-second-use": (lambda m, x, r: m.l3(m.l2(torch.relu(m.drop(m.l1(x)))) + m.l1(x)), None),
    "relu-then-residual-through-dropout": (lambda m, x, r: (lambda h: m.l3(m.l2(torch.relu(m.drop(h))) + h))(
        m.l1(x)), None),
    "identity-then-double-residual": (lambda m, x, r: (lambda h1: (lambda h2: m.l3(m.l2(m.idt(h2) + h1) + h2))(
        m.l2(h1)))(m.l1(x)), None),
    "aliased-in-place-update": (_aliased_update, False),
    "in-place-relu-on-input": (_inplace_relu_input, False),
    "default-flag-argument": (lambda m, x, r: m.l3(m.l2(m.l1(x)) + m.l1(x)) if r else m.l3(m.l1(x)), None),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_graphs_that_resemble_chains(name):
    body, fused = CHAINS[name]
    ref, ours = pair(fl.alternating_mask(6), lambda i, o: Chain(i, o, body), torch.float64)
    x = torch.randn(11, 6, dtype=torch.float64)
    if fused is not None:
        assert (plan_of(ours.transform_net) is not None) == fused
    with torch.no_grad():
        for method in ("forward", "inverse"):
            ref_out, ref_lad = getattr(ref, method)(x.clone())
            our_out, our_lad = getattr(ours, method)(x.clone())
            torch.testing.assert_close(our_out, ref_out, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(our_lad, ref_lad, rtol=1e-12, atol=1e-12)


class MaskedOut(nn.Linear):
    """A Linear subclass with its own forward: not fused as a plain Linear."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


@pytest.mark.parametrize("change", ["elu-alpha", "gelu-tanh", "inplace", "subclass", "non-contiguous",
                                    "training-flag"])
def test_state_changed_after_first_call(change):
    create = {"elu-alpha": sequential(nn.ELU), "gelu-tanh": sequential(nn.GELU)}.get(change, sequential(nn.ReLU))
    ref, ours = pair(fl.alternating_mask(6), create, torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)
    assert_same(ref, ours, x, torch.float64)
    for model in (ref, ours):
        seq = model.transform_net.net
        if change == "elu-alpha":
            seq[1].alpha = 2.0
        elif change == "gelu-tanh":
            seq[1].approximate = "tanh"
        elif change == "inplace":
            seq[1].inplace = True
        elif change == "subclass":
            old = seq[2]
            seq[2] = MaskedOut(16, 16).double()
            seq[2].load_state_dict(old.state_dict())
        elif change == "non-contiguous":
            seq[0].weight = nn.Parameter(seq[0].weight.detach().t().contiguous().t())
        else:
            seq.training_flag_for_test = True  # a plain attribute a forward could test
    assert_same(ref, ours, x, torch.float64, fused=change in ("training-flag", "non-contiguous"))


def test_bare_sequential_raises_as_in_nflows():
    ref, ours = pair(fl.alternating_mask(6), lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o)))
    x = torch.randn(3, 6)
    with torch.no_grad():
        with pytest.raises(TypeError) as theirs:
            ref(x)
        with pytest.raises(TypeError) as mine:
            ours(x)
    assert str(theirs.value) == str(mine.value)
