"""fusedlayers.nn.LSTM / LSTMCell against torch.nn.LSTM / LSTMCell with the same weights (issue: fused LSTM).

FLOPs as the issue counts them: forward 2*T*B*4H*(I + H) per layer and direction (plus 2*T*B*H*P for a
projection), a training step three times the forward."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_sequence

import fusedlayers

from .common import Case

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _lstm_flops(steps_rows: int, i: int, h: int, layers: int = 1, directions: int = 1) -> float:
    total = 0.0
    for layer in range(layers):
        width_in = i if layer == 0 else h * directions
        total += 2.0 * steps_rows * 4 * h * (width_in + h) * directions
    return total


def _pair(dtype, **kw):
    ref = torch.nn.LSTM(**kw).to(dtype)
    ours = fusedlayers.nn.LSTM(**kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inference(t, b, i, h, dtype, layers=1, bidirectional=False):
    def make():
        ref, ours = _pair(dtype, input_size=i, hidden_size=h, num_layers=layers, bidirectional=bidirectional)
        x = torch.randn(t, b, i, dtype=dtype)
        return (lambda: ref(x)), (lambda: ours(x))
    return make


def _training(t, b, i, h, dtype, layers=1):
    def make():
        ref, ours = _pair(dtype, input_size=i, hidden_size=h, num_layers=layers)
        x = torch.randn(t, b, i, dtype=dtype, requires_grad=True)

        def step(model):
            def run():
                out, (h_n, c_n) = model(x)
                out.sum().backward()
            return run
        return step(ref), step(ours)
    return make


def _cell(b, i, h, dtype):
    def make():
        ref = torch.nn.LSTMCell(i, h).to(dtype)
        ours = fusedlayers.nn.LSTMCell(i, h).to(dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(b, i, dtype=dtype)
        state = (torch.randn(b, h, dtype=dtype), torch.randn(b, h, dtype=dtype))
        return (lambda: ref(x, state)), (lambda: ours(x, state))
    return make


def _packed(lengths, i, h, dtype, layers=2):
    def make():
        ref, ours = _pair(dtype, input_size=i, hidden_size=h, num_layers=layers, bidirectional=True)
        seqs = [torch.randn(n, i, dtype=dtype) for n in lengths]
        packed = pack_sequence(seqs, enforce_sorted=False)
        return (lambda: ref(packed)), (lambda: ours(packed))
    return make


def _packed_lengths(batch: int = 32, shortest: int = 10, longest: int = 200) -> list[int]:
    step = (longest - shortest) / (batch - 1)
    return [round(shortest + k * step) for k in range(batch)]


def cases(sizes: str, dtype: str) -> list[Case]:
    dt = _DTYPES[dtype]
    peak = "bf16" if dtype == "bfloat16" else "fp32"
    out: list[Case] = []

    def add(name, size, flops, make, goal="", grad=False, reference="torch.nn.LSTM", memory=False):
        out.append(Case("lstm", name, size, flops, make, reference=reference, dtype=dtype, peak_kind=peak, goal=goal,
                        grad=grad, memory=memory))

    if sizes == "quick":
        add("inference", "T=20 B=8 I=64 H=128", _lstm_flops(20 * 8, 64, 128), _inference(20, 8, 64, 128, dt))
        add("training step", "T=20 B=8 I=64 H=128", 3 * _lstm_flops(20 * 8, 64, 128),
            _training(20, 8, 64, 128, dt), grad=True)
        add("LSTMCell step", "B=8 I=64 H=128", _lstm_flops(8, 64, 128), _cell(8, 64, 128, dt),
            reference="torch.nn.LSTMCell")
        return out

    add("training step", "T=100 B=32 I=256 H=512", 3 * _lstm_flops(100 * 32, 256, 512),
        _training(100, 32, 256, 512, dt), goal=">= 85% of peak; peak memory <= nn.LSTM's", grad=True,
        memory=sizes == "default")
    add("inference", "T=100 B=32 I=256 H=512", _lstm_flops(100 * 32, 256, 512), _inference(100, 32, 256, 512, dt),
        goal=">= 90% of peak" if dtype == "float32" else ">= 85% of bf16 peak")
    add("training step", "L=2 T=100 B=64 I=512 H=512", 3 * _lstm_flops(100 * 64, 512, 512, layers=2),
        _training(100, 64, 512, 512, dt, layers=2), goal=">= 85% of peak", grad=True)
    add("inference (latency)", "T=50 B=1 I=128 H=128", _lstm_flops(50, 128, 128), _inference(50, 1, 128, 128, dt),
        goal="<= 0.4x torch")
    add("LSTMCell step", "B=32 I=256 H=512", _lstm_flops(32, 256, 512), _cell(32, 256, 512, dt),
        goal=">= 75% of peak", reference="torch.nn.LSTMCell")
    add("call overhead", "LSTMCell B=1 I=16 H=16", _lstm_flops(1, 16, 16), _cell(1, 16, 16, dt),
        goal="per-call cost of the op path", reference="torch.nn.LSTMCell")
    lengths = _packed_lengths()
    add("packed, 2 layers bidir", "32 seqs, lengths 10..200, I=H=256",
        _lstm_flops(sum(lengths), 256, 256, layers=2, directions=2), _packed(lengths, 256, 256, dt),
        goal="<= 0.5x torch")
    if sizes == "grid":
        for t in (1, 10, 100, 1000):
            for b in (1, 32, 256):
                for h in (32, 128, 512, 2048):
                    if t * b * h > 100 * 256 * 512:  # keep one case under a few seconds
                        continue
                    add("inference", f"T={t} B={b} I={h} H={h}", _lstm_flops(t * b, h, h),
                        _inference(t, b, h, h, dt))
                    if t * b * h <= 100 * 32 * 512:
                        add("training step", f"T={t} B={b} I={h} H={h}", 3 * _lstm_flops(t * b, h, h),
                            _training(t, b, h, h, dt), grad=True)
    return out
