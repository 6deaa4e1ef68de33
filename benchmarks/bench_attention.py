"""fusedlayers.functional.scaled_dot_product_attention and nn.MultiheadAttention against torch's, same inputs.

FLOPs as the FlashAttention papers count them: forward 4*B*H*L*S*D, backward 2.5 times the forward, causal
only the unmasked half."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers.functional import scaled_dot_product_attention as fused_sdpa

from .common import Case

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sdpa_make(shape_q, shape_kv, dtype, causal=False, train=False, dropout=0.0):
    def make():
        q = torch.randn(*shape_q, dtype=dtype, requires_grad=train)
        k = torch.randn(*shape_kv, dtype=dtype, requires_grad=train)
        v = torch.randn(*shape_kv, dtype=dtype, requires_grad=train)

        def call(fn):
            if train:
                return lambda: fn(q, k, v, is_causal=causal, dropout_p=dropout).sum().backward()
            return lambda: fn(q, k, v, is_causal=causal, dropout_p=dropout)
        return call(F.scaled_dot_product_attention), call(fused_sdpa)
    return make


def _mha_make(b, length, embed, heads, dtype):
    def make():
        ref = torch.nn.MultiheadAttention(embed, heads, batch_first=True).to(dtype)
        ours = fusedlayers.nn.MultiheadAttention(embed, heads, batch_first=True).to(dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(b, length, embed, dtype=dtype)
        return (lambda: ref(x, x, x, need_weights=False)), (lambda: ours(x, x, x, need_weights=False))
    return make


def _flops(b, h, lq, s, d, causal=False, train=False):
    f = 4.0 * b * h * lq * s * d * (0.5 if causal else 1.0)
    return f * 3.5 if train else f


def cases(sizes: str, dtype: str) -> list[Case]:
    dt = _DTYPES[dtype]
    peak = "bf16" if dtype == "bfloat16" else "fp32"
    out: list[Case] = []

    def add(name, size, flops, make, goal="", grad=False, reference="F.scaled_dot_product_attention",
            bytes_read=0.0, memory=False):
        out.append(Case("attention", name, size, flops, make, reference=reference, dtype=dtype, peak_kind=peak,
                        goal=goal, grad=grad, bytes_read=bytes_read, memory=memory))

    if sizes == "quick":
        add("forward", "B=2 H=4 L=256 D=64", _flops(2, 4, 256, 256, 64),
            _sdpa_make((2, 4, 256, 64), (2, 4, 256, 64), dt))
        add("forward+backward", "B=2 H=4 L=256 D=64", _flops(2, 4, 256, 256, 64, train=True),
            _sdpa_make((2, 4, 256, 64), (2, 4, 256, 64), dt, train=True), grad=True)
        return out

    bf16 = dtype == "bfloat16"
    add("forward", "B=8 H=8 L=512 D=64", _flops(8, 8, 512, 512, 64), _sdpa_make((8, 8, 512, 64), (8, 8, 512, 64), dt),
        goal=">= 70% of bf16 peak" if bf16 else ">= 75% of peak")
    add("forward", "B=8 H=8 L=512 D=128", _flops(8, 8, 512, 512, 128),
        _sdpa_make((8, 8, 512, 128), (8, 8, 512, 128), dt), goal="" if bf16 else ">= 75% of peak")
    add("forward causal", "B=2 H=8 L=2048 D=64", _flops(2, 8, 2048, 2048, 64, causal=True),
        _sdpa_make((2, 8, 2048, 64), (2, 8, 2048, 64), dt, causal=True), goal="" if bf16 else ">= 75% of peak")
    add("forward+backward", "B=8 H=8 L=512 D=64", _flops(8, 8, 512, 512, 64, train=True),
        _sdpa_make((8, 8, 512, 64), (8, 8, 512, 64), dt, train=True), goal="" if bf16 else ">= 70% of peak",
        grad=True)
    for length in (1024, 2048, 4096):  # peak memory must grow linearly in L
        add("forward+backward", f"B=1 H=1 L={length} D=64", _flops(1, 1, length, length, 64, train=True),
            _sdpa_make((1, 1, length, 64), (1, 1, length, 64), dt, train=True),
            goal="" if bf16 or length != 4096 else ">= 70% of peak", grad=True, memory=sizes == "default")
    add("forward (short)", "B=32 H=8 L=128 D=64", _flops(32, 8, 128, 128, 64),
        _sdpa_make((32, 8, 128, 64), (32, 8, 128, 64), dt), goal="" if bf16 else ">= 60% of peak")
    add("forward dropout 0.1", "B=2 H=8 L=2048 D=64", _flops(2, 8, 2048, 2048, 64),
        _sdpa_make((2, 8, 2048, 64), (2, 8, 2048, 64), dt, dropout=0.1), goal="<= 1.2x ours without dropout")
    add("forward no dropout", "B=2 H=8 L=2048 D=64", _flops(2, 8, 2048, 2048, 64),
        _sdpa_make((2, 8, 2048, 64), (2, 8, 2048, 64), dt))
    add("forward 5-D", "(2, 4, 8, 512, 64)", _flops(8, 8, 512, 512, 64),
        _sdpa_make((2, 4, 8, 512, 64), (2, 4, 8, 512, 64), dt), goal="within 5% of the 4-D case")
    add("decoding", "B=1 H=8 L=1 S=16384 D=64", _flops(1, 8, 1, 16384, 64),
        _sdpa_make((1, 8, 1, 64), (1, 8, 16384, 64), dt), goal=">= 80% of read bandwidth",
        bytes_read=2.0 * 8 * 16384 * 64 * torch.empty((), dtype=dt).element_size())
    add("MultiheadAttention", "B=16 L=256 E=512 8 heads", 2 * 16 * 256 * 512 * 512 * 4 + _flops(16, 8, 256, 256, 64),
        _mha_make(16, 256, 512, 8, dt), goal=">= 80% of peak", reference="nn.MultiheadAttention")
    if sizes == "grid":
        out += grid_cases(dt, dtype, peak)
    return out + layer_cases(sizes, dtype)


def grid_cases(dt, dtype: str, peak: str) -> list[Case]:
    """Sequence lengths 64..4096, head sizes 32..128, causal or not, forward and forward+backward."""
    out = []
    for length in (64, 256, 1024, 4096):
        batch, heads = (8, 8) if length <= 256 else (2, 8) if length <= 1024 else (1, 4)
        for d in (32, 64, 128):
            for causal in (False, True):
                for train in (False, True):
                    shape = (batch, heads, length, d)
                    name = ("forward+backward" if train else "forward") + (" causal" if causal else "")
                    out.append(Case("attention", name, f"B={batch} H={heads} L={length} D={d}",
                                    _flops(batch, heads, length, length, d, causal=causal, train=train),
                                    _sdpa_make(shape, shape, dt, causal=causal, train=train),
                                    reference="F.scaled_dot_product_attention", dtype=dtype, peak_kind=peak,
                                    grad=train))
    return out


def _sagan_make(b, channels, size, dtype):
    def make():
        ours = fusedlayers.nn.SelfAttention2d(channels).to(dtype)
        with torch.no_grad():
            ours.gamma.fill_(0.5)
        x = torch.randn(b, channels, size, size, dtype=dtype)

        def naive():  # the paper's formula, as users write it: the full attention map is built
            f = F.conv2d(x, ours.f.weight, ours.f.bias).flatten(2)
            g = F.conv2d(x, ours.g.weight, ours.g.bias).flatten(2)
            h = F.conv2d(x, ours.h.weight, ours.h.bias).flatten(2)
            beta = torch.softmax(f.transpose(1, 2) @ g, dim=-1)
            return ours.gamma * (beta @ h.transpose(1, 2)).transpose(1, 2).reshape(x.shape) + x
        return naive, (lambda: ours(x))
    return make


def layer_cases(sizes: str, dtype: str) -> list[Case]:
    """The classic attention layers against the naive torch formulas (issue: classic attention layers)."""
    if sizes == "quick" or dtype != "float32":
        return []
    n = 32 * 32
    # Per image: the f, g, h projections (64 -> 8 + 8 + 64 channels), the f.g scores (8 channels) and the
    # weighted sum (64 channels), 2 FLOPs per multiply-add.
    flops = 2.0 * n * 64 * 80 + 2.0 * n * n * 8 + 2.0 * n * n * 64
    return [Case("attention", "SelfAttention2d", "B=8 C=64 32x32", 8 * flops, _sagan_make(8, 64, 32, torch.float32),
                 reference="naive formula", goal="<= 0.5x the naive formula"),
            Case("attention", "TransformerEncoderLayer fwd+bwd", "B=16 L=256 d=512 8 heads",
                 3 * (2 * 16 * 256 * 512 * 512 * 4 + 2 * 2 * 16 * 256 * 512 * 2048 + _flops(16, 8, 256, 256, 64)),
                 _encoder_make(), reference="nn.TransformerEncoderLayer", goal="<= 0.7x torch's layer", grad=True),
            Case("attention", "additive attention fwd+bwd", "B=32 Tq=64 Tk=256 hidden=256", 0.0, _additive_make(),
                 reference="naive formula", goal="<= 0.25x time, <= 0.1x memory", grad=True, memory=True),
            Case("attention", "Luong local-p vs global", "B=32 T=64 S=2048 H=256 D=10", 0.0, _luong_make("local-p"),
                 reference="our global attention", goal="<= 0.1x global"),
            Case("attention", "Luong local-p vs global, context only", "B=32 T=64 S=2048 H=256 D=10", 0.0,
                 _luong_make("local-p", attentional=False), reference="our global attention", goal="<= 0.1x global"),
            Case("attention", "Luong local-m vs global", "B=32 T=64 S=2048 H=256 D=10", 0.0, _luong_make("local-m"),
                 reference="our global attention"),
            Case("attention", "Luong local-p window vs global, attention step only", "B=32 T=64 S=2048 H=256 D=10",
                 0.0, _luong_attention_step_make(), reference="our fused SDPA over all S")]


def _additive_make(b=32, q_len=64, kv_len=256, size=256):
    def make():
        torch.manual_seed(0)
        ours = fusedlayers.nn.AdditiveAttention(size, size, size)
        query = torch.randn(b, q_len, size, requires_grad=True)
        keys = torch.randn(b, kv_len, size, requires_grad=True)

        def naive():  # as users write it: the [b, q, k, hidden] tanh tensor is built and kept for backward
            scores = torch.tanh(ours.query_proj(query)[:, :, None, :] + ours.key_proj(keys)[:, None, :, :]) @ ours.v
            context = torch.softmax(scores, dim=-1) @ keys
            context.sum().backward()
        return naive, (lambda: ours(query, keys)[0].sum().backward())
    return make


def _encoder_make(b=16, length=256, d_model=512, heads=8):
    def make():
        torch.manual_seed(0)
        ref = torch.nn.TransformerEncoderLayer(d_model, heads, batch_first=True, dropout=0.0)
        ours = fusedlayers.nn.TransformerEncoderLayer(d_model, heads, batch_first=True, dropout=0.0)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(b, length, d_model, requires_grad=True)
        return (lambda: ref(x).sum().backward()), (lambda: ours(x).sum().backward())
    return make


def _luong_attention_step_make(b=32, t=64, s=2048, hidden=256, window=10):
    """The attention step alone, on the same projected queries: local-p's Gaussian-weighted window (the fused
    window kernel) against the fused attention over every source position. The projections and the attentional
    state, which both layers run, are left out."""
    def make():
        torch.manual_seed(0)
        query, source = torch.randn(b, t, hidden), torch.randn(b, s, hidden)
        centre = s * torch.rand(b, t)  # p_t
        first = torch.ceil(centre - window).long()
        positions = first[..., None] + torch.arange(2 * window + 1)
        valid = (positions >= 0) & (positions < s) & (positions <= centre[..., None] + window)
        gauss = torch.exp(-(positions.float() - centre[..., None]) ** 2 / (2 * (window / 2) ** 2))
        sdpa = fusedlayers.functional.scaled_dot_product_attention
        window_op = torch.ops.fusedlayers.window_attention
        return (lambda: sdpa(query, source, source, scale=1.0)), (lambda: window_op(query, source, gauss, first, valid))
    return make


def _luong_make(mode, b=32, t=64, s=2048, hidden=256, window=10, attentional=True):
    def make():
        torch.manual_seed(0)
        glob = fusedlayers.nn.LuongAttention(hidden, mode="global", attentional=attentional)
        local = fusedlayers.nn.LuongAttention(hidden, mode=mode, window=window, attentional=attentional)
        local.load_state_dict(glob.state_dict(), strict=False)  # local-p has its position predictor besides
        query, source = torch.randn(b, t, hidden), torch.randn(b, s, hidden)
        return (lambda: glob(query, source)), (lambda: local(query, source))
    return make
