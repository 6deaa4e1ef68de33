"""The small tensors our layers keep between calls (batch sizes, zero states, degree permutations, placeholders).

None may come from a call under inference mode (such a tensor cannot be saved for a backward and has no version
counter), a FakeTensorMode, a `with torch.device(...)` block or a torch.func transform (its tensors must not
outlive it), and clear_weight_cache() frees them."""

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedlayers
from fusedlayers import flows


def _lstm_cases():
    x = torch.randn(5, 3, 4)
    yield "LSTM", fusedlayers.nn.LSTM(4, 6), (x,)
    yield "LSTM 2 layers bidirectional", fusedlayers.nn.LSTM(4, 6, num_layers=2, bidirectional=True), (x,)
    yield "LSTM unbatched", fusedlayers.nn.LSTM(4, 6), (x[:, 0],)
    yield "LSTMCell", fusedlayers.nn.LSTMCell(4, 6), (x[0],)


def _flow_cases():
    x, context = torch.randn(16, 5), torch.randn(16, 3)
    yield "MAF", flows.MaskedAffineAutoregressiveTransform(5, 8), (x,)
    yield "MAF with context", flows.MaskedAffineAutoregressiveTransform(5, 8, context_features=3), (x, context)
    yield "MAF feedforward", flows.MaskedAffineAutoregressiveTransform(5, 8, use_residual_blocks=False), (x,)
    yield "IAF", flows.IAF(5, 8), (x,)
    yield "coupling", flows.AffineCouplingTransform(flows.alternating_mask(5), _Conditioner), (x,)


class _Conditioner(torch.nn.Module):
    """nflows' conditioner convention: net(inputs, context)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.first, self.second = torch.nn.Linear(in_features, 8), torch.nn.Linear(8, out_features)

    def forward(self, inputs, context=None):
        return self.second(torch.relu(self.first(inputs)))


def _outputs_sum(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs.sum()
    return sum(_outputs_sum(o) for o in outputs)


def _run(module, args, method="__call__"):
    return getattr(module, method)(*args)


@pytest.mark.parametrize("name,module,args", list(_lstm_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_lstm_trains_after_inference_mode(name, module, args):
    with torch.inference_mode():
        _run(module, args)
    _outputs_sum(_run(module, args)).backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("name,module,args", list(_flow_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_flow_trains_after_inference_mode(name, module, args):
    for method in ("__call__", "inverse"):
        with torch.inference_mode():
            _run(module, args, method)
        _outputs_sum(_run(module, args, method)).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_zuko_style_maf_trains_after_inference_mode():
    flow, x = flows.MAF(5, hidden_features=(8, 8)), torch.randn(16, 5)
    with torch.inference_mode():
        flow().log_prob(x), flow().rsample((4,))
    (flow().log_prob(x).sum() + flow().rsample((4,)).sum()).backward()
    assert all(p.grad is not None for p in flow.parameters())


def _train_step(module, args):
    module.zero_grad(set_to_none=True)
    _outputs_sum(_run(module, args)).backward()
    return [p.grad for p in module.parameters()]


_EAGER_CASES = [("LSTM", lambda: fusedlayers.nn.LSTM(4, 6), (torch.randn(5, 3, 4),)),
                ("LSTMCell", lambda: fusedlayers.nn.LSTMCell(4, 6), (torch.randn(3, 4),)),
                ("MAF", lambda: flows.MaskedAffineAutoregressiveTransform(5, 8), (torch.randn(16, 5),)),
                ("coupling", lambda: flows.AffineCouplingTransform(flows.alternating_mask(5), _Conditioner),
                 (torch.randn(16, 5),))]


@pytest.mark.parametrize("name,make,args", _EAGER_CASES, ids=[c[0] for c in _EAGER_CASES])
def test_a_call_under_fake_tensor_mode_leaves_nothing_fake(name, make, args):
    # Real inputs under FakeTensorMode fail (as torch's own layers do), fake ones run (the LSTMs) or meet a
    # data-dependent check (the flows' eager paths; torch.compile traces those); later eager calls must not
    # meet fake tensors kept from either, also in a module built afterwards.
    module = make()
    with pytest.raises(Exception):
        with FakeTensorMode():
            module(*args)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the parameters stay real
    fake_args = [mode.from_tensor(a) for a in args]
    try:
        with mode:
            module(*fake_args)
    except (torch._subclasses.fake_tensor.DataDependentOutputException,
            torch._subclasses.fake_tensor.DynamicOutputShapeException):
        assert name in ("MAF", "coupling")
    for module in (module, make()):
        grads = _train_step(module, args)
        assert all(type(g) is torch.Tensor for g in grads)
        with torch.no_grad():
            _run(module, args)


@pytest.mark.parametrize("name,make,args", _EAGER_CASES, ids=[c[0] for c in _EAGER_CASES])
def test_functionalize_then_eager_training(name, make, args):
    module = make()
    torch.func.functionalize(lambda *a: _outputs_sum(module(*a)))(*args)
    grads = _train_step(module, args)
    assert not any(torch._is_functional_tensor(g) for g in grads)
    torch.optim.SGD(module.parameters(), lr=0.1).step()


def test_lstm_under_a_device_context():
    # `with torch.device("cpu")` is a torch_function mode: the call runs, and keeps nothing made under it.
    lstm_module = sys.modules["fusedlayers.functional.lstm"]
    fusedlayers.clear_weight_cache()
    m, x = fusedlayers.nn.LSTM(4, 6), torch.randn(5, 3, 4)
    with torch.device("cpu"):
        m(x)
    assert not lstm_module._ZERO_STATES and not lstm_module._BATCH_SIZES
    m(x)
    assert lstm_module._ZERO_STATES and lstm_module._BATCH_SIZES


def test_kept_states_are_small_and_cleared():
    # Only small zero states are kept (a small call is where they cost a share), and clear_weight_cache frees them.
    lstm_module = sys.modules["fusedlayers.functional.lstm"]
    fusedlayers.clear_weight_cache()
    m = fusedlayers.nn.LSTM(4, 512, num_layers=2, bidirectional=True)
    with torch.no_grad():
        m(torch.randn(2, 64, 4))  # states of 4 x 64 x 512 floats each: 512 KiB
    assert not lstm_module._ZERO_STATES
    with torch.no_grad():
        m(torch.randn(2, 1, 4))
    assert lstm_module._ZERO_STATES
    fusedlayers.clear_weight_cache()
    assert not lstm_module._ZERO_STATES and not lstm_module._BATCH_SIZES


def test_lstm_pooled_tensors_never_change_under_the_user():
    # The LSTM's output, saved gates and input gradient come from the pool of reusable tensors: a tensor the user
    # (or autograd) still holds is never handed out again, so two forwards before one backward, and outputs kept
    # across steps, keep their values and give torch's gradients.
    torch.manual_seed(0)
    ours = fusedlayers.nn.LSTM(4, 6, num_layers=2)
    ref = torch.nn.LSTM(4, 6, num_layers=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 4)
    kept = []
    for _ in range(3):
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(xs)[0], ours(xs * 2)[0]
        (y1 * y2).sum().backward()
        r1, r2 = ref(xr)[0], ref(xr * 2)[0]
        (r1 * r2).sum().backward()
        torch.testing.assert_close(y1, r1)
        torch.testing.assert_close(xs.grad, xr.grad)
        kept.append((y1.detach(), r1.detach(), xs.grad, xr.grad))
    for y, r, gx, gr in kept:
        torch.testing.assert_close(y, r)
        torch.testing.assert_close(gx, gr)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    fusedlayers.clear_weight_cache()
    assert fusedlayers._C._pooled_bytes() == 0
