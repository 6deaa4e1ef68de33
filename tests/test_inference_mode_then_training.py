"""A layer first run under torch.inference_mode() must still train afterwards.

Tensors made inside inference mode cannot be saved for a backward and have no version counter, so none of the
small tensors our layers keep between calls (batch sizes, zero states, degree permutations) may be made there."""

import pytest
import torch

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
