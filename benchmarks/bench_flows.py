"""fusedlayers.flows against nflows and zuko (the faster of the two is the reference), same sizes.

The issue states the flows' goals as time ratios. FLOPs are counted where both sides run the same architecture
(the zuko-style rows): the masked products' useful FLOPs, 2 per nonzero mask entry and sample (3 times that for a
training step; the affine map and log-det not counted), so % peak says how close our kernels come to the
arithmetic a masked network needs (a dense reference does about twice as many)."""

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
    """The reference is the faster of nflows and zuko, decided by the best of five timed calls of each (one call
    picked the slower library on a noisy machine)."""
    import time
    best, best_t = None, float("inf")
    for fn in fns:
        fn()
        for _ in range(5):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if elapsed < best_t:
                best, best_t = fn, elapsed
    return best


def _masked_flops(transform, n: int) -> float:
    """2 FLOPs per nonzero mask entry of every masked layer, per sample."""
    return 2.0 * n * sum(float(m.mask.count_nonzero()) for m in transform.modules()
                         if isinstance(getattr(m, "mask", None), torch.Tensor))


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


def _zuko_style_direction(d, hidden, n, mode: str):
    """Our zuko-style MAF layer against zuko's, the same architecture (hidden layers `hidden`): 'forward' (log
    prob direction with log-det), 'inverse' (sampling) or 'training' (forward + backward)."""
    def make():
        import zuko
        torch.manual_seed(0)
        theirs = zuko.flows.MAF(d, 0, transforms=1, hidden_features=hidden)().transform
        ours = flows.MAF(d, 0, transforms=1, hidden_features=hidden).transform  # nflows-style Transform
        x = torch.randn(n, d)
        if mode == "training":
            def step(t):
                def run():
                    y, ladj = t.call_and_ladj(x) if hasattr(t, "call_and_ladj") else t(x)
                    (0.5 * y.pow(2).sum(1) - ladj).mean().backward()
                return run
            return step(theirs), step(ours)
        if mode == "forward":
            return (lambda: theirs.call_and_ladj(x)), (lambda: ours(x))
        return (lambda: theirs.inv.call_and_ladj(x)), (lambda: ours.inverse(x))
    return make


def _iaf_density(d, hidden, n):
    """Density of external data under an IAF layer: its forward is a MAF inverse."""
    def make():
        from nflows.transforms import InverseTransform
        ref_maf, ours_maf = _pair(d, hidden)
        ref, ours = InverseTransform(ref_maf), flows.InverseTransform(ours_maf)
        zuko_t = _zuko_maf(d, hidden)().transform.inv
        x = torch.randn(n, d)
        with torch.no_grad():
            reference = _faster(lambda: ref(x), lambda: zuko_t.call_and_ladj(x))
        return reference, (lambda: ours(x))
    return make


def _coupling(d, hidden, n):
    """Affine coupling forward then inverse, the conditioner an MLP with two hidden layers; nflows is the
    reference (zuko has no affine coupling layer of this form)."""
    def make():
        from nflows.transforms import AffineCouplingTransform as Theirs

        def net(in_features, out_features):
            return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, out_features))
        mask = torch.arange(d) % 2
        ref = Theirs(mask, lambda i, o: _Unconditional(net(i, o)))
        ours = flows.AffineCouplingTransform(mask, lambda i, o: _Unconditional(net(i, o)))
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(n, d)
        return (lambda: ref.inverse(ref(x)[0])), (lambda: ours.inverse(ours(x)[0]))
    return make


class _Unconditional(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, context=None):
        return self.net(x)


def _whole_flow(d, hidden, n, transforms, what: str, architecture: str):
    """A 5-transform flow with a standard normal base, log_prob or sample, against the library whose
    architecture it has: nflows' (MAF layers with residual blocks and reverse permutations) or zuko's
    (MAF(features, transforms=..., hidden_features=(hidden, hidden)))."""
    def make():
        torch.manual_seed(0)
        x = torch.randn(n, d)
        if architecture == "zuko":
            import zuko
            theirs = zuko.flows.MAF(d, 0, transforms=transforms, hidden_features=(hidden, hidden))
            ours = flows.MAF(d, 0, transforms=transforms, hidden_features=(hidden, hidden))
            if what == "log_prob":
                return (lambda: theirs().log_prob(x)), (lambda: ours().log_prob(x))
            return (lambda: theirs().sample((n,))), (lambda: ours().sample((n,)))
        from nflows.distributions import StandardNormal
        from nflows.flows import Flow
        from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation
        layers = []
        for _ in range(transforms):
            layers += [MaskedAffineAutoregressiveTransform(d, hidden), ReversePermutation(d)]
        ref = Flow(CompositeTransform(layers), StandardNormal([d])).eval()
        ours = flows.from_nflows(ref).eval()
        if what == "log_prob":
            return (lambda: ref.log_prob(x)), (lambda: ours.log_prob(x))
        return (lambda: ref.sample(n)), (lambda: ours.sample(n))
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
    add("IAF density", "D=64 hidden 256x2 N=1024", _iaf_density(64, 256, 1024), "<= 0.05x")
    forward_flops = _masked_flops(flows.MAF(64, 0, transforms=1, hidden_features=(256, 256)), 1024)
    for mode, goal in (("forward", "<= 0.33x"), ("inverse", "<= 0.05x"), ("training", "<= 0.5x")):
        flops = forward_flops * (3 if mode == "training" else 1)
        out.append(Case("flows", f"zuko-style MAF {mode}", "D=64 hidden (256, 256) N=1024", flops,
                        _zuko_style_direction(64, (256, 256), 1024, mode), reference="zuko, same architecture",
                        goal=goal, grad=mode == "training"))
    add("affine coupling fwd+inv", "D=64 hidden 256 N=1024", _coupling(64, 256, 1024), "<= 0.5x")
    for architecture in ("nflows", "zuko"):
        for what in ("log_prob", "sample"):
            out.append(Case("flows", f"5-transform flow {what}", f"D=8 hidden 64 N=4096, {architecture}'s layers", 0.0,
                            _whole_flow(8, 64, 4096, 5, what, architecture), reference=architecture,
                            goal="<= 0.33x"))
    grid = (2, 8, 32, 128, 784) if sizes == "grid" else (2, 8, 32, 128)
    for d in grid:
        add("MAF forward + log-det", f"D={d} hidden 256x2 N=1024", _maf_direction(d, 256, 1024, inverse=False), "")
        add("MAF inverse (sampling)", f"D={d} hidden 256x2 N=1024", _maf_direction(d, 256, 1024, inverse=True),
            "grows like forward")
    return out
