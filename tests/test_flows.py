"""Normalizing-flow transforms (fusedlayers.flows) against nflows 0.14 with shared weights: MAF forward, the
one-pass inverse against nflows' D-pass loop, gradients, log-determinants, the autoregressive property, batch
norm and dropout, IAF, affine coupling, permutations, composition, Flow, from_nflows, torch.compile, input
checks, a short training run and property-based parity."""

import contextlib
import copy
import itertools

import nflows.distributions as nd
import nflows.flows as nfl
import nflows.transforms as nt
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from nflows.nn.nets import ResidualNet
from nflows.utils import torchutils
from torch import nn

from fusedlayers import flows as fl
from fusedlayers.flows.made import MADE, MaskedLinear, MaskedResidualBlock

HIDDEN = 8
CONTEXT = 3
BATCH = 6

# Every MADE option nflows has; the id names the test case.
MAF_CONFIGS = {
    "res-1block": dict(num_blocks=1),
    "res-2blocks": dict(num_blocks=2),
    "res-3blocks": dict(num_blocks=3),
    "ff-1block": dict(num_blocks=1, use_residual_blocks=False),
    "ff-3blocks": dict(num_blocks=3, use_residual_blocks=False),
    "ff-random-mask": dict(use_residual_blocks=False, random_mask=True),
    "res-context": dict(context_features=CONTEXT),
    "ff-context": dict(use_residual_blocks=False, context_features=CONTEXT),
    "ff-random-mask-context": dict(use_residual_blocks=False, random_mask=True, context_features=CONTEXT),
    "tanh": dict(activation=torch.tanh),
    "elu": dict(activation=F.elu),
    "gelu": dict(activation=F.gelu, use_residual_blocks=False),
    "res-batch-norm": dict(use_batch_norm=True),
    "ff-batch-norm": dict(use_batch_norm=True, use_residual_blocks=False),
    "res-batch-norm-context": dict(use_batch_norm=True, context_features=CONTEXT),
    "ff-batch-norm-random-mask": dict(use_batch_norm=True, use_residual_blocks=False, random_mask=True),
    "res-dropout": dict(dropout_probability=0.3),
    "ff-dropout-batch-norm": dict(dropout_probability=0.3, use_batch_norm=True, use_residual_blocks=False),
}
FEATURES = [1, 2, 5]
DTYPES = [torch.float32, torch.float64]
# (forward tolerance, inverse / gradient tolerance): the forward runs the same operations as nflows; the
# one-pass inverse sums in another order than nflows' D passes.
TOL = {torch.float32: (dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-5)),
       torch.float64: (dict(rtol=1e-12, atol=1e-13), dict(rtol=1e-10, atol=1e-11))}


def assert_state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    # Parameters and masks must be identical; running statistics computed from our GEMMs agree to rounding.
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        exact = not name.endswith(("running_mean", "running_var"))
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sa[name], sb[name], **tol, msg=name)


def perturb(module: nn.Module, seed: int = 1) -> None:
    """Moves weights away from nflows' near-zero initialisation of the residual branches and gives batch norms
    non-trivial running statistics and affine parameters, so that every part of the network matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def assert_close_scaled(actual, expected, tol=1e-10):
    """assert_close with atol relative to the largest entry: the inverse divides by scales as small as 1e-3, so
    entries of a row can differ by orders of magnitude and carry the rounding of the large ones."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def maf_pair(features, dtype=torch.float64, hidden=HIDDEN, seed=0, **kw):
    """An nflows MAF and ours from the same seed: checks that they start identical, then loads nflows' (perturbed)
    weights into ours with strict=True."""
    torch.manual_seed(seed)
    ref = nt.MaskedAffineAutoregressiveTransform(features, hidden, **kw)
    torch.manual_seed(seed)
    ours = fl.MaskedAffineAutoregressiveTransform(features, hidden, **kw)
    assert_state_dicts_equal(ref, ours)
    perturb(ref, seed + 1)
    ref.to(dtype)
    ours.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_state_dicts_equal(ref, ours)
    return ref, ours


def train_mode_pair(features, **kw):
    """maf_pair in float64, both in training mode (batch norm on batch statistics, dropout drawing masks)."""
    ref, ours = maf_pair(features, torch.float64, **kw)
    ref.train()
    ours.train()
    return ref, ours


def inputs_for(features, kw, dtype=torch.float64, batch=BATCH, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=gen, dtype=dtype)
    context = (torch.randn(batch, kw["context_features"], generator=gen, dtype=dtype)
               if kw.get("context_features") else None)
    return x, context


def loss_of(outputs, logabsdet):
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).reshape(outputs.shape)
    return (weights * outputs).sum() + (outputs ** 2).sum() + logabsdet.sum()


def run_with_grads(module, method, x, context):
    x = x.clone().requires_grad_(True)
    context = None if context is None else context.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    outputs, logabsdet = getattr(module, method)(x, context)
    loss_of(outputs, logabsdet).backward()
    grads = {"inputs": x.grad}
    if context is not None:
        grads["context"] = context.grad
    for name, p in module.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return outputs.detach(), logabsdet.detach(), grads


def assert_grads_close(ref_grads, our_grads, rtol, atol):
    """atol is relative to the largest gradient entry of each tensor (gradients can be large)."""
    assert list(ref_grads) == list(our_grads)
    for name in ref_grads:
        scale = max(1.0, ref_grads[name].abs().max().item()) if ref_grads[name].numel() else 1.0  # [h, 0] weights
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------------------
# MAF parity with nflows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("config", list(MAF_CONFIGS))
def test_maf_matches_nflows_forward_inverse_and_gradients(config, features, dtype):
    kw = MAF_CONFIGS[config]
    ref, ours = maf_pair(features, dtype, **kw)
    ref.eval()
    ours.eval()
    x, context = inputs_for(features, kw, dtype)
    fwd_tol, inv_tol = TOL[dtype]
    for method, tol in (("forward", fwd_tol), ("inverse", inv_tol)):
        ref_out, ref_lad, ref_grads = run_with_grads(ref, method, x, context)
        our_out, our_lad, our_grads = run_with_grads(ours, method, x, context)
        assert our_out.shape == (BATCH, features) and our_lad.shape == (BATCH,)
        assert our_out.dtype == dtype and our_lad.dtype == dtype
        torch.testing.assert_close(our_out, ref_out, **tol)
        torch.testing.assert_close(our_lad, ref_lad, **tol)
        assert_grads_close(ref_grads, our_grads, **inv_tol)


@pytest.mark.parametrize("features", [1, 4])
@pytest.mark.parametrize("config", ["res-batch-norm", "ff-batch-norm", "res-batch-norm-context",
                                    "ff-dropout-batch-norm"])
def test_maf_train_mode_batch_norm_forward_matches_nflows(config, features):
    kw = MAF_CONFIGS[config]
    ref, ours = train_mode_pair(features, **kw)
    x, context = inputs_for(features, kw, batch=16)
    torch.manual_seed(5)  # the same dropout masks
    ref_out, ref_lad, ref_grads = run_with_grads(ref, "forward", x, context)
    torch.manual_seed(5)
    our_out, our_lad, our_grads = run_with_grads(ours, "forward", x, context)
    torch.testing.assert_close(our_out, ref_out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(our_lad, ref_lad, rtol=1e-12, atol=1e-13)
    assert_grads_close(ref_grads, our_grads, rtol=1e-10, atol=1e-11)
    assert_state_dicts_equal(ref, ours)  # the running statistics moved identically


def test_parameter_names_and_buffers_are_nflows():
    ref, ours = maf_pair(3, use_batch_norm=True, context_features=2, num_blocks=2)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert [n for n, _ in ref.named_buffers()] == [n for n, _ in ours.named_buffers()]
    # And the other way round: our weights load into nflows.
    torch.manual_seed(3)
    theirs = nt.MaskedAffineAutoregressiveTransform(3, HIDDEN, use_batch_norm=True, context_features=2).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, context = inputs_for(3, dict(context_features=2))
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, context), theirs(x, context), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The one-pass inverse


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("config", list(MAF_CONFIGS))
def test_one_pass_inverse_matches_nflows_and_inverts(config, features):
    kw = MAF_CONFIGS[config]
    ref, ours = maf_pair(features, torch.float64, **kw)
    ref.eval()
    ours.eval()
    assert ours.autoregressive_net.supports_one_pass_inverse()
    u, context = inputs_for(features, kw, batch=32, seed=7)
    with torch.no_grad():  # the in-place path of the inversion
        ref_x, ref_lad = ref.inverse(u, context)
        x, lad = ours.inverse(u, context)
    assert_close_scaled(x, ref_x)
    assert_close_scaled(lad, ref_lad)
    # Both ways round, log-determinants summing to 0.
    u_again, fwd_lad = ours(x, context)
    assert_close_scaled(u_again, u)
    assert_close_scaled(fwd_lad + lad, torch.zeros_like(lad))
    y, y_lad = ours(u, context)
    u_back, back_lad = ours.inverse(y, context)
    assert_close_scaled(u_back, u)
    assert_close_scaled(y_lad + back_lad, torch.zeros_like(lad))


def test_one_pass_inverse_for_several_batch_sizes():
    ref, ours = maf_pair(4, context_features=2)
    for batch in (1, 2, 33):
        u, context = inputs_for(4, dict(context_features=2), batch=batch)
        torch.testing.assert_close(ours.inverse(u, context), ref.inverse(u, context), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("features", [1, 3])
def test_empty_batch_gives_empty_outputs_like_nflows(features):
    # The parameters of zero rows cannot be reshaped with an inferred (-1) dimension: it must be named.
    ref, ours = maf_pair(features, context_features=2)
    u, context = inputs_for(features, dict(context_features=2), batch=0)
    for method in ("forward", "inverse"):
        out, lad = getattr(ours, method)(u, context)
        ref_out, ref_lad = getattr(ref, method)(u, context)
        assert out.shape == ref_out.shape == (0, features) and lad.shape == ref_lad.shape == (0,)
    flow = fl.Flow(fl.IAF(features, HIDDEN), fl.StandardNormal([features]))
    assert flow.log_prob(u.float()).shape == (0,)
    # A sample count must be a positive int, as nflows requires (its TypeError; ours is also a ValueError).
    from nflows.distributions import StandardNormal as NflowsNormal
    for count in (0, -1, 2.0, True):
        for sampler in (flow.sample, flow._distribution.sample, NflowsNormal([features]).sample):
            with pytest.raises(TypeError):
                sampler(count)


# --------------------------------------------------------------------------------------------------------------
# Log-determinants, the autoregressive property, gradcheck


@pytest.mark.parametrize("features", [1, 2, 4])
@pytest.mark.parametrize("config", ["res-2blocks", "ff-random-mask-context", "res-batch-norm-context", "gelu"])
def test_logabsdet_equals_slogdet_of_jacobian(config, features):
    kw = MAF_CONFIGS[config]
    _, ours = maf_pair(features, torch.float64, **kw)
    ours.eval()
    x, context = inputs_for(features, kw, batch=4)
    for method in ("forward", "inverse"):
        _, logabsdet = getattr(ours, method)(x, context)
        for b in range(x.shape[0]):
            ctx = None if context is None else context[b:b + 1]

            def f(row):
                return getattr(ours, method)(row[None], ctx)[0][0]

            jac = torch.autograd.functional.jacobian(f, x[b])
            sign, logdet = torch.slogdet(jac)
            assert sign > 0  # the affine scales are positive, and the Jacobian is triangular
            torch.testing.assert_close(logabsdet[b], logdet, rtol=1e-10, atol=1e-10)
            # Triangular: output i does not depend on inputs after i.
            assert torch.equal(torch.triu(jac, diagonal=1), torch.zeros_like(jac))


def _made_connectivity(made: MADE) -> torch.Tensor:
    """Which inputs can reach which outputs through the masks ([outputs, inputs], > 0 where connected)."""
    conn = made.initial_layer.mask.double()
    for block in made.blocks:
        if isinstance(block, MaskedResidualBlock):
            inner = block.linear_layers[1].mask.double() @ block.linear_layers[0].mask.double()
            conn = conn + inner @ conn
        else:
            conn = block.linear.mask.double() @ conn
    return made.final_layer.mask.double() @ conn


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("config", ["res-3blocks", "ff-3blocks", "ff-random-mask", "res-context",
                                    "ff-batch-norm-random-mask"])
def test_made_is_autoregressive(config, features):
    kw = MAF_CONFIGS[config]
    multiplier = 3
    torch.manual_seed(0)
    made = MADE(features, 2 * features + 3, output_multiplier=multiplier, **kw).double()
    perturb(made)
    made.eval()
    x, context = inputs_for(features, kw, batch=3)
    owner = torch.arange(features).repeat_interleave(multiplier)  # feature i owns outputs i*m .. i*m+m-1
    forbidden = owner[:, None] <= torch.arange(features)[None, :]  # output of feature i, input j >= i
    allowed_total = 0.0
    for b in range(x.shape[0]):
        ctx = None if context is None else context[b:b + 1]
        jac = torch.autograd.functional.jacobian(lambda row: made(row[None], ctx)[0], x[b])
        assert jac.shape == (features * multiplier, features)
        assert torch.all(jac[forbidden] == 0), "an output depends on its own or a later input"
        allowed_total += jac[~forbidden].abs().sum().item()
    assert features == 1 or allowed_total > 0  # the allowed connections are there (unless every ReLU is off)
    # The masks: the product over the network is strictly lower triangular per feature.
    conn = _made_connectivity(made)
    assert torch.all(conn[forbidden] == 0)
    per_feature = conn.reshape(features, multiplier, features).sum(1)
    assert torch.equal(torch.tril(per_feature, diagonal=-1), per_feature)
    for layer in made.modules():
        if isinstance(layer, MaskedLinear):
            assert layer.mask.shape == layer.weight.shape
            assert torch.all((layer.mask == 0) | (layer.mask == 1))


def test_mask_degrees_follow_nflows():
    for features, random_mask in itertools.product([1, 2, 5], [False, True]):
        torch.manual_seed(0)
        ref = nt.made.MADE(features, 7, num_blocks=2, use_residual_blocks=False, random_mask=random_mask)
        torch.manual_seed(0)
        ours = MADE(features, 7, num_blocks=2, use_residual_blocks=False, random_mask=random_mask)
        for a, b in zip([ref.initial_layer, *[blk.linear for blk in ref.blocks], ref.final_layer],
                        [ours.initial_layer, *[blk.linear for blk in ours.blocks], ours.final_layer]):
            assert torch.equal(a.degrees, b.degrees) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("config", ["res-context", "ff-random-mask", "res-batch-norm", "tanh"])
def test_gradcheck_forward_and_inverse(config):
    kw = MAF_CONFIGS[config]
    _, ours = maf_pair(3, torch.float64, hidden=6, **kw)
    ours.eval()
    x, context = inputs_for(3, kw, batch=3)
    x.requires_grad_(True)
    args = (x,) if context is None else (x, context.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda *a: ours(*a), args)
    assert torch.autograd.gradcheck(lambda *a: ours.inverse(*a), args)


# --------------------------------------------------------------------------------------------------------------
# Training mode: batch norm and dropout fall back to D passes


@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("config", ["res-batch-norm", "ff-batch-norm", "res-batch-norm-context",
                                    "ff-batch-norm-random-mask"])
def test_train_mode_batch_norm_inverse_matches_nflows_and_inverts(config, features):
    kw = MAF_CONFIGS[config]
    ref, ours = train_mode_pair(features, **kw)
    assert not ours.autoregressive_net.supports_one_pass_inverse()
    u, context = inputs_for(features, kw, batch=16)
    before = copy.deepcopy(ours.state_dict())
    forward_copy = copy.deepcopy(ours)  # for the round trip, before this inverse moves the running statistics
    ref_x, ref_lad = ref.inverse(u, context)
    x, lad = ours.inverse(u, context)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad, ref_lad, rtol=1e-12, atol=1e-12)
    assert_state_dicts_equal(ref, ours)  # D updates of the running statistics, as nflows
    moved = [n for n in before if "running_mean" in n and not torch.equal(before[n], ours.state_dict()[n])]
    assert moved, "the training-mode inverse should update the running statistics"
    # In training mode, batch statistics are per hidden unit, so the map is still autoregressive: the forward
    # pass over the same batch undoes the inverse.
    u_again, fwd_lad = forward_copy(x, context)
    torch.testing.assert_close(u_again, u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fwd_lad + lad, torch.zeros_like(lad), rtol=0, atol=1e-10)


def test_train_mode_dropout_inverse_matches_nflows_with_same_rng():
    kw = MAF_CONFIGS["res-dropout"]
    ref, ours = train_mode_pair(4, **kw)
    assert not ours.autoregressive_net.supports_one_pass_inverse()
    u, _ = inputs_for(4, kw, batch=10)
    torch.manual_seed(11)
    ref_x, ref_lad = ref.inverse(u)
    torch.manual_seed(11)
    x, lad = ours.inverse(u)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad, ref_lad, rtol=1e-12, atol=1e-12)
    # Eval mode (or p = 0 in training mode) uses the one pass.
    ours.eval()
    assert ours.autoregressive_net.supports_one_pass_inverse()
    _, plain = maf_pair(4, torch.float64)
    plain.train()
    assert plain.autoregressive_net.supports_one_pass_inverse()


def test_one_pass_inverse_in_train_mode_without_batch_norm_or_dropout():
    ref, ours = train_mode_pair(5, context_features=2)
    u, context = inputs_for(5, dict(context_features=2))
    ref_out, ref_lad, ref_grads = run_with_grads(ref, "inverse", u, context)
    our_out, our_lad, our_grads = run_with_grads(ours, "inverse", u, context)
    torch.testing.assert_close(our_out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_lad, ref_lad, rtol=1e-10, atol=1e-10)
    assert_grads_close(ref_grads, our_grads, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# IAF


@pytest.mark.parametrize("kw", [dict(), dict(context_features=CONTEXT, use_residual_blocks=False)], ids=["res", "ff"])
def test_iaf_is_maf_with_directions_swapped(kw):
    torch.manual_seed(0)
    iaf = fl.IAF(4, HIDDEN, **kw).double()
    torch.manual_seed(0)
    maf = fl.MaskedAffineAutoregressiveTransform(4, HIDDEN, **kw).double()
    assert_state_dicts_equal(iaf._transform, maf)
    perturb(maf)
    iaf._transform.load_state_dict(maf.state_dict())
    torch.manual_seed(0)
    ref = nt.InverseTransform(nt.MaskedAffineAutoregressiveTransform(4, HIDDEN, **kw)).double()
    ref.load_state_dict(iaf.state_dict(), strict=True)
    x, context = inputs_for(4, kw)
    torch.testing.assert_close(iaf(x, context), maf.inverse(x, context), rtol=0, atol=0)
    torch.testing.assert_close(iaf.inverse(x, context), maf(x, context), rtol=0, atol=0)
    torch.testing.assert_close(iaf(x, context), ref(x, context), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(iaf.inverse(x, context), ref.inverse(x, context), rtol=1e-12, atol=1e-12)
    y, lad = iaf(x, context)
    x_back, back_lad = iaf.inverse(y, context)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad + back_lad, torch.zeros_like(lad), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Affine coupling


class SmallConditioner(nn.Module):
    """An nn.Sequential conditioner that takes (inputs, context)."""

    def __init__(self, in_features, out_features, context_features=None):
        super().__init__()
        extra = context_features or 0
        self.net = nn.Sequential(nn.Linear(in_features + extra, 12), nn.Tanh(), nn.Linear(12, out_features))

    def forward(self, inputs, context=None):
        return self.net(inputs if context is None else torch.cat([inputs, context], dim=1))


def coupling_pair(mask, conditioner="resnet", context_features=None, unconditional=False):
    def create(i, o):
        if conditioner == "resnet":
            return ResidualNet(i, o, hidden_features=10, context_features=context_features, num_blocks=2)
        return SmallConditioner(i, o, context_features)

    torch.manual_seed(0)
    ref = nt.AffineCouplingTransform(
        mask, create,
        unconditional_transform=(lambda features: nt.MaskedAffineAutoregressiveTransform(features, 6))
        if unconditional else None)
    torch.manual_seed(0)
    ours = fl.AffineCouplingTransform(
        mask, create,
        unconditional_transform=(lambda features: fl.MaskedAffineAutoregressiveTransform(features, 6))
        if unconditional else None)
    assert_state_dicts_equal(ref, ours)
    perturb(ref)
    ref.double()
    ours.double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


COUPLING_CASES = {
    "alternating-even-resnet": (lambda: fl.alternating_mask(5, even=True), "resnet", None, False),
    "alternating-odd-sequential": (lambda: fl.alternating_mask(4, even=False), "sequential", None, False),
    "context-resnet": (lambda: fl.alternating_mask(5), "resnet", CONTEXT, False),
    "context-sequential": (lambda: fl.alternating_mask(3), "sequential", CONTEXT, False),
    "checkerboard": (lambda: fl.checkerboard_mask(2, 3), "resnet", None, False),
    "unconditional-maf": (lambda: fl.alternating_mask(6, even=False), "resnet", None, True),
    "single-identity-feature": (lambda: torch.tensor([1, 0, 1]), "sequential", None, True),
    "no-identity-feature": (lambda: torch.tensor([1, 1, 1]), "resnet", None, False),  # a conditioner of 0 inputs
}


@pytest.mark.parametrize("case", list(COUPLING_CASES))
def test_affine_coupling_matches_nflows_and_inverts(case):
    make_mask, conditioner, context_features, unconditional = COUPLING_CASES[case]
    mask = make_mask()
    ref, ours = coupling_pair(mask, conditioner, context_features, unconditional)
    features = len(mask)
    x, context = inputs_for(features, dict(context_features=context_features), batch=7)
    for method in ("forward", "inverse"):
        ref_out, ref_lad, ref_grads = run_with_grads(ref, method, x, context)
        our_out, our_lad, our_grads = run_with_grads(ours, method, x, context)
        torch.testing.assert_close(our_out, ref_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(our_lad, ref_lad, rtol=1e-10, atol=1e-12)
        assert_grads_close(ref_grads, our_grads, rtol=1e-10, atol=1e-12)
    y, lad = ours(x, context)
    identity = (mask <= 0).nonzero().flatten()
    if not unconditional:
        assert torch.equal(y[:, identity], x[:, identity])
    x_back, back_lad = ours.inverse(y, context)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad + back_lad, torch.zeros_like(lad), rtol=0, atol=1e-10)
    # log|det| from the Jacobian.
    for b in range(2):
        ctx = None if context is None else context[b:b + 1]
        jac = torch.autograd.functional.jacobian(lambda row: ours(row[None], ctx)[0][0], x[b])
        torch.testing.assert_close(lad[b], torch.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_coupling_masks():
    assert fl.alternating_mask(5).tolist() == [1, 0, 1, 0, 1]
    assert fl.alternating_mask(5, even=False).tolist() == [0, 1, 0, 1, 0]
    for features, even in itertools.product([1, 4, 7], [True, False]):
        ref_mask = torchutils.create_alternating_binary_mask(features, even=even)
        assert fl.alternating_mask(features, even).tolist() == ref_mask.tolist()
    assert fl.checkerboard_mask(2, 3).tolist() == [1, 0, 1, 0, 1, 0]
    assert fl.checkerboard_mask(3, 2, even=False).tolist() == [0, 1, 1, 0, 0, 1]
    board = fl.checkerboard_mask(4, 4).reshape(4, 4)
    assert torch.equal(board.flip(0).flip(1), board)  # unchanged by a 180-degree rotation
    assert int(board.sum()) == 8 and torch.all(board[:, 1:] != board[:, :-1])


def test_affine_coupling_on_images():
    class ConvNet(nn.Module):
        def __init__(self, in_channels, out_channels):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

        def forward(self, inputs, context=None):
            return self.conv(inputs)

    mask = fl.alternating_mask(4)
    torch.manual_seed(0)
    ref = nt.AffineCouplingTransform(mask, ConvNet).double()
    torch.manual_seed(0)
    ours = fl.AffineCouplingTransform(mask, ConvNet).double()
    assert_state_dicts_equal(ref, ours)
    perturb(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.inverse(x), ref.inverse(x), rtol=1e-12, atol=1e-12)
    y, lad = ours(x)
    x_back, back_lad = ours.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad + back_lad, torch.zeros_like(lad), rtol=0, atol=1e-10)


def test_affine_coupling_rejects_bad_masks_and_inputs():
    for mask in (torch.ones(2, 2), torch.tensor([])):
        with pytest.raises(ValueError, match="Mask"):
            fl.AffineCouplingTransform(mask, lambda i, o: SmallConditioner(i, o))
    _, ours = coupling_pair(fl.alternating_mask(4), "sequential")
    with pytest.raises(ValueError, match="features = 4, got 3"):
        ours(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2D or a 4D"):
        ours.inverse(torch.randn(2, 4, 1, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# Permutations, composition, inversion


@pytest.mark.parametrize("features", [1, 2, 6])
def test_permutations_match_nflows(features):
    x = torch.randn(5, features, dtype=torch.float64)
    for ref_cls, our_cls in ((nt.ReversePermutation, fl.ReversePermutation),
                             (nt.RandomPermutation, fl.RandomPermutation)):
        torch.manual_seed(features)
        ref = ref_cls(features)
        torch.manual_seed(features)
        ours = our_cls(features)
        assert_state_dicts_equal(ref, ours)
        for method in ("forward", "inverse"):
            ref_out, ref_lad = getattr(ref, method)(x)
            our_out, our_lad = getattr(ours, method)(x)
            assert torch.equal(our_out, ref_out) and torch.equal(our_lad, ref_lad)
            assert torch.equal(our_lad, torch.zeros(5, dtype=torch.float64))
        assert torch.equal(ours.inverse(ours(x)[0])[0], x)
    assert fl.ReversePermutation(3)(torch.tensor([[1.0, 2.0, 3.0]]))[0].tolist() == [[3.0, 2.0, 1.0]]
    with pytest.raises(ValueError):
        fl.ReversePermutation(3)(torch.randn(2, 4))
    with pytest.raises(ValueError):
        fl.Permutation(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        fl.RandomPermutation(0)


def composite_pair(features=4, context_features=None):
    """An nflows composite (MAF, reverse, MAF, random permutation, coupling, inverted MAF) and ours, same weights."""

    def build(lib):
        mods = [lib.MaskedAffineAutoregressiveTransform(features, HIDDEN, context_features=context_features),
                lib.ReversePermutation(features),
                lib.MaskedAffineAutoregressiveTransform(features, HIDDEN, context_features=context_features,
                                                        use_residual_blocks=False),
                lib.RandomPermutation(features),
                lib.AffineCouplingTransform(
                    fl.alternating_mask(features),
                    lambda i, o: ResidualNet(i, o, 10, context_features=context_features, num_blocks=1)),
                lib.InverseTransform(lib.MaskedAffineAutoregressiveTransform(
                    features, HIDDEN, context_features=context_features, num_blocks=1))]
        return lib.CompositeTransform(mods)

    torch.manual_seed(0)
    ref = build(nt)
    torch.manual_seed(0)
    ours = build(fl)
    assert_state_dicts_equal(ref, ours)
    perturb(ref)
    ref.double()
    ours.double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("context_features", [None, CONTEXT])
def test_composite_and_inverse_transform_match_nflows(context_features):
    ref, ours = composite_pair(4, context_features)
    x, context = inputs_for(4, dict(context_features=context_features), batch=9)
    for method in ("forward", "inverse"):
        ref_out, ref_lad, ref_grads = run_with_grads(ref, method, x, context)
        our_out, our_lad, our_grads = run_with_grads(ours, method, x, context)
        torch.testing.assert_close(our_out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(our_lad, ref_lad, rtol=1e-10, atol=1e-10)
        assert_grads_close(ref_grads, our_grads, rtol=1e-9, atol=1e-10)
    y, lad = ours(x, context)
    x_back, back_lad = ours.inverse(y, context)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad + back_lad, torch.zeros_like(lad), rtol=0, atol=1e-10)
    inv = fl.InverseTransform(ours)
    torch.testing.assert_close(inv(y, context), ours.inverse(y, context), rtol=0, atol=0)
    torch.testing.assert_close(inv.inverse(x, context), ours(x, context), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Flow


def flow_pair(features=3, context_features=None):
    ref_t, our_t = composite_pair(features, context_features)
    ref = nfl.Flow(ref_t, nd.StandardNormal([features]))
    ours = fl.Flow(our_t, fl.StandardNormal([features]))
    return ref, ours


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def float64_default():
    """Base distributions draw noise in the default dtype: float64 flows sample with float64 noise."""
    with default_dtype(torch.float64):
        yield


@pytest.mark.parametrize("context_features", [None, CONTEXT])
def test_flow_log_prob_and_samples_match_nflows(context_features, float64_default):
    features = 3
    ref, ours = flow_pair(features, context_features)
    x, context = inputs_for(features, dict(context_features=context_features), batch=8)
    torch.testing.assert_close(ours.log_prob(x, context), ref.log_prob(x, context), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.transform_to_noise(x, context), ref.transform_to_noise(x, context),
                               rtol=1e-10, atol=1e-10)
    ctx_rows = None if context is None else context[:2]
    expected_shape = (5, features) if context is None else (2, 5, features)
    torch.manual_seed(4)
    ref_samples = ref.sample(5, ctx_rows)
    torch.manual_seed(4)
    samples = ours.sample(5, ctx_rows)
    assert samples.shape == ref_samples.shape == expected_shape
    torch.testing.assert_close(samples, ref_samples, rtol=1e-9, atol=1e-9)
    torch.manual_seed(4)
    ref_samples, ref_lp = ref.sample_and_log_prob(5, ctx_rows)
    torch.manual_seed(4)
    samples, lp = ours.sample_and_log_prob(5, ctx_rows)
    assert lp.shape == expected_shape[:-1]
    torch.testing.assert_close(samples, ref_samples, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-9, atol=1e-9)
    # The returned log-probabilities are those of the samples.
    flat = samples.reshape(-1, features)
    flat_ctx = None if ctx_rows is None else ctx_rows.repeat_interleave(5, dim=0)
    assert_close_scaled(ours.log_prob(flat, flat_ctx).reshape(lp.shape), lp, tol=1e-9)


def test_flow_with_embedding_net_matches_nflows(float64_default):
    ref_t, our_t = composite_pair(3, context_features=CONTEXT)
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Linear(2, CONTEXT), nn.Tanh())
    ref = nfl.Flow(ref_t, nd.StandardNormal([3]), embedding_net=embedding)
    ours = fl.Flow(our_t, fl.StandardNormal([3]), embedding_net=copy.deepcopy(embedding))
    x, raw_context = torch.randn(7, 3), torch.randn(7, 2)
    torch.testing.assert_close(ours.log_prob(x, raw_context), ref.log_prob(x, raw_context), rtol=1e-10, atol=1e-10)
    torch.manual_seed(3)
    ref_samples, ref_lp = ref.sample_and_log_prob(4, raw_context[:3])
    torch.manual_seed(3)
    samples, lp = ours.sample_and_log_prob(4, raw_context[:3])
    assert samples.shape == (3, 4, 3) and lp.shape == (3, 4)
    torch.testing.assert_close(samples, ref_samples, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-9, atol=1e-9)


def test_flow_with_conditional_maf_samples_and_log_prob_consistent():
    torch.manual_seed(0)
    transform = fl.CompositeTransform([fl.MaskedAffineAutoregressiveTransform(2, 8, context_features=1),
                                       fl.ReversePermutation(2),
                                       fl.MaskedAffineAutoregressiveTransform(2, 8, context_features=1)])
    flow = fl.Flow(transform, fl.StandardNormal([2]))
    context = torch.tensor([[-1.0], [0.0], [2.0]])
    samples, lp = flow.sample_and_log_prob(50, context)
    assert samples.shape == (3, 50, 2) and lp.shape == (3, 50)
    with pytest.raises(ValueError, match="needs a context"):
        flow.sample(7)
    lp_again = flow.log_prob(samples.reshape(-1, 2), context.repeat_interleave(50, dim=0)).reshape(3, 50)
    torch.testing.assert_close(lp_again, lp, rtol=1e-4, atol=1e-4)
    unconditional = fl.Flow(fl.MaskedAffineAutoregressiveTransform(2, 8), fl.StandardNormal([2]))
    samples, lp = unconditional.sample_and_log_prob(40)
    assert samples.shape == (40, 2) and lp.shape == (40,)
    torch.testing.assert_close(unconditional.log_prob(samples), lp, rtol=1e-4, atol=1e-4)
    assert unconditional.sample(11).shape == (11, 2)


def test_standard_normal_matches_nflows():
    x = torch.randn(6, 4)
    torch.testing.assert_close(fl.StandardNormal([4]).log_prob(x), nd.StandardNormal([4]).log_prob(x))
    assert fl.StandardNormal([4]).log_prob(x).dtype == torch.float32
    with pytest.raises(ValueError):
        fl.StandardNormal([4]).log_prob(torch.randn(6, 3))


def test_from_nflows_flow_gives_identical_log_prob_and_samples():
    features = 4
    torch.manual_seed(0)
    transform = nt.CompositeTransform([
        nt.MaskedAffineAutoregressiveTransform(features, HIDDEN, use_batch_norm=True),
        nt.ReversePermutation(features),
        nt.MaskedAffineAutoregressiveTransform(features, HIDDEN, use_residual_blocks=False, random_mask=True,
                                               dropout_probability=0.1),
        nt.RandomPermutation(features),
        nt.AffineCouplingTransform(fl.alternating_mask(features),
                                   lambda i, o: ResidualNet(i, o, 10, num_blocks=1)),
    ])
    ref32 = nfl.Flow(transform, nd.StandardNormal([features]))
    perturb(ref32)
    ref32.eval()
    ours32 = fl.from_nflows(ref32)
    assert isinstance(ours32, fl.Flow) and not ours32.training
    assert_state_dicts_equal(ref32, ours32)
    x = torch.randn(10, features, dtype=torch.float64)
    torch.testing.assert_close(ours32.log_prob(x.float()), ref32.log_prob(x.float()), rtol=1e-6, atol=1e-6)
    # A float64 nflows flow converts to a float64 flow (not to the default dtype).
    ref = copy.deepcopy(ref32).double()
    ours = fl.from_nflows(ref)
    assert_state_dicts_equal(ref, ours)
    torch.testing.assert_close(ours.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    with default_dtype(torch.float64):
        torch.manual_seed(1)
        ref_samples = ref.sample(6)
        torch.manual_seed(1)
        samples = ours.sample(6)
    torch.testing.assert_close(samples, ref_samples, rtol=1e-10, atol=1e-10)
    # Training mode carries over (batch norm then uses batch statistics, dropout draws masks, as in nflows).
    ref.train()
    ours = fl.from_nflows(ref)
    assert ours.training and all(m.training for m in ours.modules())
    torch.manual_seed(2)
    ref_lp = ref.log_prob(x)
    torch.manual_seed(2)
    torch.testing.assert_close(ours.log_prob(x), ref_lp, rtol=1e-12, atol=1e-12)
    assert_state_dicts_equal(ref, ours)  # running statistics updated alike


def test_from_nflows_single_transforms_and_unsupported():
    torch.manual_seed(0)
    ref = nt.MaskedAffineAutoregressiveTransform(3, HIDDEN, context_features=2, num_blocks=3)
    ours = fl.from_nflows(ref)
    assert isinstance(ours, fl.MaskedAffineAutoregressiveTransform)
    x, context = torch.randn(4, 3), torch.randn(4, 2)
    # Same weights; our masked layers multiply on the GEMM engine, so float32 results agree to rounding.
    torch.testing.assert_close(ours(x, context), ref(x, context), rtol=1e-6, atol=1e-6)
    inv = fl.from_nflows(nt.InverseTransform(ref))
    assert isinstance(inv, fl.InverseTransform)
    torch.testing.assert_close(inv.inverse(x, context), ref(x, context), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="no fusedlayers equivalent"):
        fl.from_nflows(nt.MaskedPiecewiseLinearAutoregressiveTransform(4, 3, 8))


# --------------------------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_maf_forward_matches_eager():
    torch.manual_seed(0)
    maf = fl.MaskedAffineAutoregressiveTransform(3, HIDDEN, context_features=2)
    perturb(maf)
    maf.eval()
    x, context = torch.randn(5, 3), torch.randn(5, 2)
    compiled = torch.compile(maf, fullgraph=False)
    expected = maf(x, context)
    torch.testing.assert_close(compiled(x, context), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(x + 1, context), maf(x + 1, context), rtol=1e-5, atol=1e-6)
    # The one-pass inverse traces too (with graph breaks: its per-degree unit lists have data-dependent sizes).
    compiled_inverse = torch.compile(maf.inverse, backend="aot_eager")
    torch.testing.assert_close(compiled_inverse(x, context), maf.inverse(x, context), rtol=1e-5, atol=1e-6)


def test_compiled_maf_forward_full_graph():
    # The NaN/inf input check is data dependent, so it is skipped while compiling.
    torch.manual_seed(0)
    maf = fl.MaskedAffineAutoregressiveTransform(3, HIDDEN).eval()
    x = torch.randn(5, 3)
    torch._dynamo.reset()
    compiled = torch.compile(maf, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), maf(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_informative_errors():
    torch.manual_seed(0)
    conditional = fl.MaskedAffineAutoregressiveTransform(3, HIDDEN, context_features=2)
    plain = fl.MaskedAffineAutoregressiveTransform(3, HIDDEN)
    x, context = torch.randn(4, 3), torch.randn(4, 2)
    for method in ("forward", "inverse"):
        with pytest.raises(ValueError, match=r"shape \[batch, 3\], got \[4, 2\]"):
            getattr(plain, method)(torch.randn(4, 2))
        with pytest.raises(ValueError, match=r"shape \[batch, 3\], got \[4, 3, 1\]"):
            getattr(plain, method)(torch.randn(4, 3, 1))
        with pytest.raises(ValueError, match=r"needs a context of shape \[batch, 2\]"):
            getattr(conditional, method)(x)
        with pytest.raises(ValueError, match="built without context_features"):
            getattr(plain, method)(x, context)
        with pytest.raises(ValueError, match=r"context must have shape \[4, 2\], got \[4, 3\]"):
            getattr(conditional, method)(x, torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"context must have shape \[4, 2\], got \[5, 2\]"):
            getattr(conditional, method)(x, torch.randn(5, 2))
        for bad in (float("nan"), float("inf"), -float("inf")):
            poisoned = x.clone()
            poisoned[2, 1] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                getattr(plain, method)(poisoned)
        with pytest.raises(TypeError, match="must be a tensor"):
            getattr(plain, method)(x.tolist())
    flow = fl.Flow(plain, fl.StandardNormal([3]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        flow.log_prob(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="num_samples"):
        flow.sample(-1)
    with pytest.raises(ValueError, match="Residual blocks can't be used with random masks"):
        fl.MaskedAffineAutoregressiveTransform(3, HIDDEN, random_mask=True)


# --------------------------------------------------------------------------------------------------------------
# A short density-estimation run, step by step against nflows


def test_training_on_moons_matches_nflows_step_by_step():
    from sklearn.datasets import make_moons

    data, _ = make_moons(n_samples=512, noise=0.05, random_state=0)
    data = torch.tensor(data, dtype=torch.float32)

    def build_transform(lib):
        layers = []
        for _ in range(3):
            layers += [lib.MaskedAffineAutoregressiveTransform(2, 16), lib.ReversePermutation(2)]
        return lib.CompositeTransform(layers)

    torch.manual_seed(0)
    ref = nfl.Flow(build_transform(nt), nd.StandardNormal([2]))
    torch.manual_seed(0)
    ours = fl.Flow(build_transform(fl), fl.StandardNormal([2]))
    assert_state_dicts_equal(ref, ours)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=5e-3)
    our_opt = torch.optim.Adam(ours.parameters(), lr=5e-3)
    ref_losses, our_losses = [], []
    for _ in range(20):
        for model, opt, losses in ((ref, ref_opt, ref_losses), (ours, our_opt, our_losses)):
            opt.zero_grad()
            loss = -model.log_prob(data).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert our_losses[-1] < our_losses[0] - 0.1
    with torch.no_grad():
        torch.testing.assert_close(ours.log_prob(data), ref.log_prob(data), rtol=1e-4, atol=1e-4)
        torch.manual_seed(9)
        ref_samples = ref.sample(64)
        torch.manual_seed(9)
        samples = ours.sample(64)
    torch.testing.assert_close(samples, ref_samples, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Property-based parity of the inverse


@settings(max_examples=20, deadline=None)
@given(features=st.integers(1, 8), hidden=st.integers(4, 32), num_blocks=st.integers(1, 3),
       residual=st.booleans(), random_mask=st.booleans(), context=st.booleans(), batch_norm=st.booleans(),
       activation=st.sampled_from([F.relu, torch.tanh, F.elu, F.gelu]), seed=st.integers(0, 2 ** 16))
def test_inverse_parity_property(features, hidden, num_blocks, residual, random_mask, context, batch_norm,
                                 activation, seed):
    kw = dict(num_blocks=num_blocks, use_residual_blocks=residual, random_mask=random_mask and not residual,
              context_features=2 if context else None, use_batch_norm=batch_norm, activation=activation)
    ref, ours = maf_pair(features, torch.float64, hidden=hidden, seed=seed, **kw)
    ref.eval()
    ours.eval()
    u, ctx = inputs_for(features, kw, batch=5, seed=seed)
    with torch.no_grad():
        ref_x, ref_lad = ref.inverse(u, ctx)
        x, lad = ours.inverse(u, ctx)
        u_again, fwd_lad = ours(x, ctx)
    assert_close_scaled(x, ref_x)
    assert_close_scaled(lad, ref_lad)
    assert_close_scaled(u_again, u)
    assert_close_scaled(fwd_lad + lad, torch.zeros_like(lad))


def test_flow_exceptions_are_nflows_exceptions():
    # Code written against nflows catches ours.
    import nflows.transforms.base as nflows_base
    assert issubclass(fl.InverseNotAvailable, nflows_base.InverseNotAvailable)
    assert issubclass(fl.InputOutsideDomain, nflows_base.InputOutsideDomain)
    with pytest.raises(nflows_base.InverseNotAvailable):
        fl.Transform().inverse(torch.zeros(2, 3))
