"""fusedlayers.flows.MAF, the zuko-style constructor: zuko 1.6's shapes for the same calls, context handling,
log_prob against the change of variables through the Jacobian, orders of the layers, samples against log_prob,
a short training run and input checks."""

import math

import pytest
import torch
import zuko
from torch import nn

from fusedlayers import flows as fl
from fusedlayers.flows.made import MADE

CONTEXT = 4


def perturb(module: nn.Module, seed: int = 1) -> None:
    """Moves the weights off their initialisation so that every layer changes the density."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def flow_pair(features, context, **kw):
    torch.manual_seed(0)
    ours = fl.MAF(features, context, **kw)
    theirs = zuko.flows.MAF(features, context, **kw)
    return ours, theirs


# --------------------------------------------------------------------------------------------------------------
# Shapes: the same calls give zuko's shapes


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=str)
def test_shapes_match_zuko_conditional(features, batch_shape):
    ours, theirs = flow_pair(features, CONTEXT)
    c = torch.randn(*batch_shape, CONTEXT)
    ours_d, theirs_d = ours(c), theirs(c)
    assert ours_d.batch_shape == theirs_d.batch_shape == torch.Size(batch_shape)
    assert ours_d.event_shape == theirs_d.event_shape == torch.Size([features])
    for shape in [(), (6,), (2, 4)]:
        x = ours_d.sample(shape)
        assert x.shape == theirs_d.sample(shape).shape == torch.Size(shape + batch_shape + (features,))
        assert ours_d.log_prob(x).shape == theirs_d.log_prob(x).shape == torch.Size(shape + batch_shape)
        x, log_prob = ours_d.rsample_and_log_prob(shape)
        x_ref, log_prob_ref = theirs_d.rsample_and_log_prob(shape)
        assert x.shape == x_ref.shape and log_prob.shape == log_prob_ref.shape
        assert ours_d.rsample(shape).shape == x_ref.shape


@pytest.mark.parametrize("features", [1, 2, 5])
def test_shapes_match_zuko_unconditional(features):
    ours, theirs = flow_pair(features, 0, transforms=2)
    ours_d, theirs_d = ours(), theirs()
    assert ours_d.batch_shape == theirs_d.batch_shape == torch.Size([])
    for shape in [(), (7,), (2, 3)]:
        x = ours_d.sample(shape)
        assert x.shape == theirs_d.sample(shape).shape == torch.Size(shape + (features,))
        assert ours_d.log_prob(x).shape == theirs_d.log_prob(x).shape == torch.Size(shape)
    assert ours_d.log_prob(torch.randn(0, features)).shape == (0,)


def test_sample_is_detached_and_rsample_carries_gradients():
    flow = fl.MAF(3, CONTEXT)
    c = torch.randn(5, CONTEXT, requires_grad=True)
    assert not flow(c).sample((2,)).requires_grad
    x, log_prob = flow(c).rsample_and_log_prob((2,))
    (x.sum() + log_prob.sum()).backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert all(p.grad is not None for p in flow.parameters())


# --------------------------------------------------------------------------------------------------------------
# Context handling


def test_batched_context_equals_one_context_at_a_time():
    torch.manual_seed(0)
    flow = fl.MAF(3, CONTEXT, hidden_features=(16, 16)).double()
    perturb(flow)
    c = torch.randn(4, CONTEXT, dtype=torch.float64)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    batched = flow(c).log_prob(x)
    for b in range(4):
        torch.testing.assert_close(flow(c[b]).log_prob(x[:, b]), batched[:, b], rtol=1e-12, atol=1e-12)
    # x broadcasts against the batch shape: one x for every context, and every x for every context.
    one_x = flow(c).log_prob(x[0, 0])
    assert one_x.shape == (4,)
    torch.testing.assert_close(one_x, torch.stack([flow(c[b]).log_prob(x[0, 0]) for b in range(4)]))
    assert flow(c).log_prob(x[:, :1]).shape == (6, 4)


def test_context_changes_the_density_and_unconditional_ignores_nothing():
    torch.manual_seed(0)
    flow = fl.MAF(2, CONTEXT)
    perturb(flow)
    x = torch.randn(5, 2)
    a, b = flow(torch.zeros(CONTEXT)).log_prob(x), flow(torch.ones(CONTEXT)).log_prob(x)
    assert not torch.allclose(a, b)
    plain = fl.MAF(2)
    assert plain.context == 0 and all("context_layer" not in n for n, _ in plain.named_parameters())


def test_expand_broadcasts_the_context():
    torch.manual_seed(0)
    flow = fl.MAF(2, CONTEXT)
    d = flow(torch.randn(CONTEXT)).expand((3,))
    assert d.batch_shape == (3,) and d.sample((5,)).shape == (5, 3, 2)
    assert fl.MAF(2)().expand((4,)).sample().shape == (4, 2)


# --------------------------------------------------------------------------------------------------------------
# log_prob against the change of variables, and the layers' orders


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("options", [dict(), dict(randperm=True, transforms=4), dict(residual=True),
                                     dict(activation=nn.Tanh, hidden_features=(8, 8, 8))],
                         ids=["default", "randperm", "residual", "tanh-3-layers"])
def test_log_prob_is_change_of_variables(features, options):
    torch.manual_seed(0)
    flow = fl.MAF(features, CONTEXT, **options).double()
    perturb(flow)
    c = torch.randn(CONTEXT, dtype=torch.float64)
    x = torch.randn(3, features, dtype=torch.float64)
    log_prob = flow(c).log_prob(x)
    for b in range(3):
        def to_noise(row):
            return flow.transform(row[None], c[None])[0][0]
        z = to_noise(x[b])
        jac = torch.autograd.functional.jacobian(to_noise, x[b])
        expected = (-0.5 * z.pow(2).sum() - 0.5 * features * math.log(2 * math.pi)
                    + torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(log_prob[b], expected, rtol=1e-10, atol=1e-10)


def test_orders_alternate_like_zuko_and_randperm_draws_permutations():
    flow = fl.MAF(4, transforms=3)
    assert flow.orders.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]
    kinds = [type(t).__name__ for t in flow.transform._transforms]
    assert kinds == ["MaskedAffineAutoregressiveTransform", "ReversePermutation"] * 2 + [
        "MaskedAffineAutoregressiveTransform"]
    torch.manual_seed(0)
    random = fl.MAF(6, transforms=5, randperm=True)
    for order in random.orders:
        assert sorted(order.tolist()) == list(range(6))
    assert len({tuple(o.tolist()) for o in random.orders}) > 1


@pytest.mark.parametrize("seed", range(4))
def test_one_layer_is_autoregressive_in_its_order(seed):
    # z_i may depend on x_j only when j comes before i in the order (and on x_i itself).
    torch.manual_seed(seed)
    flow = fl.MAF(5, transforms=1, randperm=True).double()
    perturb(flow)
    order = flow.orders[0]
    jac = torch.autograd.functional.jacobian(lambda row: flow.transform(row[None])[0][0],
                                             torch.randn(5, dtype=torch.float64))
    allowed = order[None, :] < order[:, None]
    allowed |= torch.eye(5, dtype=torch.bool)
    assert torch.all(jac[~allowed] == 0)
    assert torch.all(jac.diagonal() > 0)


# --------------------------------------------------------------------------------------------------------------
# Samples against log_prob


@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("context", [0, CONTEXT])
def test_rsample_and_log_prob_agree_with_log_prob(features, context):
    torch.manual_seed(0)
    flow = fl.MAF(features, context, transforms=4, randperm=True).double()
    perturb(flow)
    c = torch.randn(3, context, dtype=torch.float64) if context else None
    d = flow(c)
    x, log_prob = d.rsample_and_log_prob((5,))
    torch.testing.assert_close(d.log_prob(x), log_prob, rtol=1e-8, atol=1e-8)
    torch.manual_seed(7)
    a = d.sample((5,))
    torch.manual_seed(7)
    torch.testing.assert_close(d.rsample((5,)), a)


def test_sampling_uses_the_one_pass_inverse(monkeypatch):
    """sample() (no gradients) runs the fused C++ inverse; rsample() the composed one-pass path; neither the
    D-pass loop."""
    from fusedlayers.flows import autoregressive, made_plan
    calls = []

    def spy(name, original):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(MADE, "invert", spy("composed", MADE.invert))
    monkeypatch.setattr(made_plan, "made_inverse", spy("fused", made_plan.made_inverse))
    monkeypatch.setattr(autoregressive.MaskedAffineAutoregressiveTransform, "_inverse_by_passes",
                        spy("passes", autoregressive.MaskedAffineAutoregressiveTransform._inverse_by_passes))
    flow = fl.MAF(4, transforms=3)
    flow().sample((2,))
    assert calls == ["fused"] * 3
    calls.clear()
    flow().rsample((2,))
    assert calls == ["composed"] * 3


def test_sample_moments_of_an_untrained_flow_with_zero_transforms():
    flow = fl.MAF(3, transforms=0)
    torch.manual_seed(0)
    x = flow().sample((20000,))
    torch.testing.assert_close(x.mean(0), torch.zeros(3), atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(3), atol=0.03, rtol=0)
    torch.testing.assert_close(flow().log_prob(x[:4]), torch.distributions.Normal(0, 1).log_prob(x[:4]).sum(-1))


def test_double_precision_flows_sample_in_double():
    flow = fl.MAF(2, CONTEXT).double()
    d = flow(torch.randn(3, CONTEXT, dtype=torch.float64))
    assert d.sample((2,)).dtype == torch.float64
    assert d.log_prob(torch.randn(3, 2, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------------------------------------------
# Training


def test_short_training_run_fits_conditional_gaussians():
    # x | c ~ N(2c, 0.5^2 I): the loss must fall well below its starting value within a few Adam steps.
    torch.manual_seed(0)
    c = torch.randn(256, 2)
    x = 2 * c + 0.5 * torch.randn(256, 2)
    flow = fl.MAF(2, 2, transforms=2, hidden_features=(32, 32))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = -flow(c).log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    # The true conditional entropy is 2 * (0.5 log(2 pi e) + log 0.5) = 1.45 nats.
    assert losses[-1] < 2.2


# --------------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(features=0), r"features must be an int >= 1, got 0"),
    (dict(features=2.0), r"features must be an int >= 1, got 2.0"),
    (dict(features=2, context=-1), r"context must be an int >= 0, got -1"),
    (dict(features=2, transforms=-1), r"transforms must be an int >= 0"),
    (dict(features=2, hidden_features=(8, 16)), r"hidden_features must all be equal"),
    (dict(features=2, hidden_features=()), r"hidden_features must be a non-empty sequence"),
    (dict(features=2, hidden_features=(8, 0)), r"hidden_features must be a non-empty sequence"),
    (dict(features=3, passes=2), r"passes must be None or features \(3\)"),
    (dict(features=2, activation=3), r"activation must be a module class"),
])
def test_bad_constructor_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fl.MAF(**kwargs)


def test_bad_call_arguments_raise_value_errors():
    conditional, plain = fl.MAF(3, CONTEXT), fl.MAF(3)
    with pytest.raises(ValueError, match=r"needs a context c of shape \[\.\.\., 4\]"):
        conditional()
    with pytest.raises(ValueError, match=r"c was given, but the flow was built with context=0"):
        plain(torch.randn(CONTEXT))
    with pytest.raises(ValueError, match=r"c must have shape \[\.\.\., 4\], got \[2, 3\]"):
        conditional(torch.randn(2, 3))
    with pytest.raises(TypeError, match="c must be a tensor"):
        conditional([0.0] * CONTEXT)
    d = conditional(torch.randn(5, CONTEXT))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 3\], got \[5, 2\]"):
        d.log_prob(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"does not broadcast with the batch shape \[5\]"):
        d.log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        plain().log_prob(torch.full((2, 3), float("nan")))
    with pytest.raises(TypeError, match="x must be a tensor"):
        plain().log_prob([0.0, 0.0, 0.0])
