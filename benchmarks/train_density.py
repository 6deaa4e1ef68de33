"""Density estimation with a MAF: nflows against fusedlayers.flows, trained the same way from the same weights.

For each data set, an nflows `Flow` (`transforms` x [MaskedAffineAutoregressiveTransform, ReversePermutation],
StandardNormal base) is built from `--seed`; ours is `fusedlayers.flows.from_nflows` of it (same weights). Both
train with Adam on the same batches in the same order (same dequantisation noise) for the same epochs, one
after the other; the table gives the test log-likelihood (nats per example, in the data's own units: the
standardisation's Jacobian is accounted for) and the wall time of each training run.

Data sets:
- moons: sklearn.datasets.make_moons (D=2, noise 0.05), separate train and test draws.
- digits: sklearn.datasets.load_digits (D=64, 8x8 pixels in 0..16), dequantised as (pixel + U(0, 1)) / 17 in
  [0, 1), split 80/20 (train_test_split, random_state=0); fresh noise each epoch, fixed noise for the test set.

Run: `python -m benchmarks.train_density` (add `--quick` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from dataclasses import dataclass

import torch

from fusedlayers import flows as fl


@dataclass
class Settings:
    epochs: int
    hidden: int
    transforms: int = 5
    num_blocks: int = 2
    batch_size: int = 128
    lr: float = 1e-3


DEFAULTS = {"moons": Settings(epochs=60, hidden=128), "digits": Settings(epochs=150, hidden=256)}
QUICK = {"moons": Settings(epochs=2, hidden=32), "digits": Settings(epochs=1, hidden=64)}


@dataclass
class Data:
    train: torch.Tensor        # [n, D], float32 (digits: integer pixels, dequantised per epoch)
    test: torch.Tensor         # [m, D], ready to evaluate
    dequantise: bool           # whether train rows get fresh uniform noise each epoch
    mean: torch.Tensor         # standardisation, from the (dequantised) training data
    std: torch.Tensor


def load(name: str, seed: int) -> Data:
    from sklearn.datasets import load_digits, make_moons
    from sklearn.model_selection import train_test_split

    gen = torch.Generator().manual_seed(seed)
    if name == "moons":
        train = torch.tensor(make_moons(n_samples=4000, noise=0.05, random_state=seed)[0], dtype=torch.float32)
        test = torch.tensor(make_moons(n_samples=2000, noise=0.05, random_state=seed + 1)[0], dtype=torch.float32)
        return Data(train, test, False, train.mean(0), train.std(0))
    if name == "digits":
        pixels = load_digits().data.astype("float32")
        train_px, test_px = train_test_split(pixels, test_size=0.2, random_state=0)
        train_px, test_px = torch.tensor(train_px), torch.tensor(test_px)
        test = (test_px + torch.rand(test_px.shape, generator=gen)) / 17
        once = (train_px + torch.rand(train_px.shape, generator=gen)) / 17
        return Data(train_px, test, True, once.mean(0), once.std(0))
    raise ValueError(f"unknown data set {name!r}")


def build_nflows(features: int, settings: Settings, seed: int):
    """The nflows MAF, its weights drawn from `seed`."""
    import nflows.distributions as nd
    import nflows.flows as nfl
    import nflows.transforms as nt

    torch.manual_seed(seed)
    layers = []
    for _ in range(settings.transforms):
        layers += [nt.MaskedAffineAutoregressiveTransform(features, settings.hidden, num_blocks=settings.num_blocks),
                   nt.ReversePermutation(features)]
    return nfl.Flow(nt.CompositeTransform(layers), nd.StandardNormal([features]))


def build_pair(features: int, settings: Settings, seed: int):
    """(nflows flow, ours with the same initial weights)."""
    ref = build_nflows(features, settings, seed)
    return ref, fl.from_nflows(ref)


def batches(data: Data, epoch: int, batch_size: int, seed: int):
    """The same batches for both libraries: a shuffle and noise drawn from (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(data.train), generator=gen)
    rows = data.train[order]
    if data.dequantise:
        rows = (rows + torch.rand(rows.shape, generator=gen)) / 17
    rows = (rows - data.mean) / data.std
    return rows.split(batch_size)


def log_likelihood(flow, data: Data) -> float:
    """Mean test log-likelihood in the data's units: log p(x) = log p(standardised x) - sum log std."""
    flow.eval()
    with torch.no_grad():
        log_prob = flow.log_prob((data.test - data.mean) / data.std)
    flow.train()
    return (log_prob.mean() - data.std.log().sum()).item()


def train_epoch(flow, opt, data: Data, settings: Settings, seed: int, epoch: int,
                steps: int | None = None) -> list[float]:
    """Adam on -log p over one epoch's batches; the loss of every step (at most `steps` of them)."""
    losses = []
    for batch in batches(data, epoch, settings.batch_size, seed)[:steps]:
        opt.zero_grad()
        loss = -flow.log_prob(batch).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(flow, data: Data, settings: Settings, seed: int, steps: int | None = None) -> list[float]:
    """`settings.epochs` epochs (or the first `steps` steps); the loss of every step."""
    opt = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    losses = []
    for epoch in range(settings.epochs):
        losses += train_epoch(flow, opt, data, settings, seed, epoch,
                              None if steps is None else steps - len(losses))
        if steps is not None and len(losses) >= steps:
            break
    return losses


def run(names, settings_by_name, seed: int) -> list[dict]:
    rows = []
    for name in names:
        settings = settings_by_name[name]
        data = load(name, seed)
        features = data.train.shape[1]
        runs = {}
        for library, flow in zip(("nflows", "fusedlayers"), build_pair(features, settings, seed)):
            # Untimed warm-up on a copy (first-call costs: allocator, lazy initialisation).
            train(copy.deepcopy(flow), data, settings, seed, steps=3)
            runs[library] = dict(flow=flow, opt=torch.optim.Adam(flow.parameters(), lr=settings.lr), seconds=0.0)
        # The libraries take turns epoch by epoch, so that a load on the (shared) machine slows both alike.
        for epoch in range(settings.epochs):
            for run_ in runs.values():
                start = time.perf_counter()
                train_epoch(run_["flow"], run_["opt"], data, settings, seed, epoch)
                run_["seconds"] += time.perf_counter() - start
        for library, run_ in runs.items():
            rows.append(dict(data=name, D=features, n_train=len(data.train), n_test=len(data.test),
                             library=library, test_ll=log_likelihood(run_["flow"], data), seconds=run_["seconds"],
                             epochs=settings.epochs, hidden=settings.hidden, transforms=settings.transforms))
            print(f"{name:7s} {library:12s} test LL {rows[-1]['test_ll']:9.3f}  {run_['seconds']:7.1f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| data | D | train / test | epochs | hidden | library | test log-likelihood (nats) | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['D']} | {r['n_train']} / {r['n_test']} | {r['epochs']} | {r['hidden']} "
                     f"| {r['library']} | {r['test_ll']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few epochs of small networks (smoke run)")
    parser.add_argument("--epochs", type=int, default=None, help="override every data set's epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else DEFAULTS)
    if args.epochs is not None:
        settings = {k: Settings(**{**vars(v), "epochs": args.epochs}) for k, v in settings.items()}
    rows = run(args.data, settings, args.seed)
    s = settings[args.data[0]]
    print()
    print(f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"seed {args.seed}; {s.transforms} x [MAF ({s.num_blocks} residual blocks), reverse permutation], "
          f"Adam lr {s.lr}, batch {s.batch_size}")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
