"""The density-estimation benchmark's training path (benchmarks/train_density.py), shortened: an nflows MAF and
ours converted from it with `from_nflows` train on two moons from the same weights, on the same batches, and
their losses agree step by step."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks`
from benchmarks.train_density import Settings, build_pair, load, log_likelihood, train  # noqa: E402


def test_nflows_and_ours_train_alike_on_moons():
    settings = Settings(epochs=1, hidden=32, transforms=3, batch_size=256, lr=5e-3)
    data = load("moons", seed=0)
    ref, ours = build_pair(2, settings, seed=0)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    ref_losses = train(ref, data, settings, seed=0, steps=12)
    our_losses = train(ours, data, settings, seed=0, steps=12)
    assert len(our_losses) == len(ref_losses) == 12
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    assert our_losses[-1] < our_losses[0] - 0.2
    # After those steps the weights still agree, and so do the test log-likelihoods.
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert abs(log_likelihood(ours, data) - log_likelihood(ref, data)) < 1e-3
