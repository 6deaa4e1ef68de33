"""fusedlayers.flows against nflows and zuko (the faster of the two is the reference), same sizes.

FLOPs are not counted for flows (the issue states its goals as time ratios); the table shows both references'
times in the JSON (`extra`)."""

from __future__ import annotations

import torch

from fusedlayers import flows

from .common import Case


def _nflows_maf(features, hidden, num_blocks=2):
    from nflows.transforms import MaskedAffineAutoregressiveTransform
    return MaskedAffineAutoregressiveTransform(features, hidden, num_blocks=num_blocks)


def _pair(features, hidden):
    ref = _nflows_maf(features, hidden)
    ours = flows.MaskedAffineAutoregressiveTransform(features, hidden)
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    return ref, ours


def _zuko_maf(features, hidden):
    import zuko
    return zuko.flows.MAF(features, 0, transforms=1, hidden_features=(hidden, hidden))


def _faster(*fns):
    """The reference is the faster of nflows and zuko, decided by one timed call of each."""
    import time
    best, best_t = None, float("inf")
    for fn in fns:
        fn()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if elapsed < best_t:
            best, best_t = fn, elapsed
    return best


def _maf_direction(d, hidden, n, inverse: bool):
    """Forward with log-det (density) or inverse (sampling) of one MAF layer."""
    def make():
        ref, ours = _pair(d, hidden)
        zuko_t = _zuko_maf(d, hidden)().transform
        if inverse:
            ref_fn, ours_fn, zuko_fn = ref.inverse, ours.inverse, zuko_t.inv.call_and_ladj
        else:
            ref_fn, ours_fn, zuko_fn = ref, ours, zuko_t.call_and_ladj
        x = torch.randn(n, d)
        with torch.no_grad():
            reference = _faster(lambda: ref_fn(x), lambda: zuko_fn(x))
        return reference, (lambda: ours_fn(x))
    return make


def _maf_training(d, hidden, n):
    def make():
        ref, ours = _pair(d, hidden)
        ref.train()
        ours.train()
        x = torch.randn(n, d)

        def step(model):
            def run():
                y, logdet = model(x)
                (0.5 * y.pow(2).sum(1) - logdet).mean().backward()
            return run
        return step(ref), step(ours)
    return make


def cases(sizes: str, dtype: str) -> list[Case]:
    if dtype != "float32":
        return []
    out: list[Case] = []

    def add(name, size, make, goal, grad=False):
        out.append(Case("flows", name, size, 0.0, make, reference="fastest of nflows, zuko", goal=goal, grad=grad))

    if sizes == "quick":
        add("MAF forward + log-det", "D=8 hidden 32 N=256", _maf_direction(8, 32, 256, inverse=False), "")
        add("MAF inverse (sampling)", "D=8 hidden 32 N=256", _maf_direction(8, 32, 256, inverse=True), "")
        return out
    add("MAF forward + log-det", "D=64 hidden 256x2 N=1024", _maf_direction(64, 256, 1024, inverse=False), "<= 0.33x")
    add("MAF inverse (sampling)", "D=64 hidden 256x2 N=1024", _maf_direction(64, 256, 1024, inverse=True), "<= 0.05x")
    add("MAF training step", "D=64 hidden 256x2 N=1024", _maf_training(64, 256, 1024), "<= 0.5x", grad=True)
    for d in (2, 8, 32, 128):
        add("MAF inverse (sampling)", f"D={d} hidden 256x2 N=1024", _maf_direction(d, 256, 1024, inverse=True), "grows like forward")
    return out
