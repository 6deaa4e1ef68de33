"""The cache of repacked weights must never serve stale weights, however a weight is changed."""

import pytest
import torch

import fusedlayers


@pytest.fixture
def pair():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16, num_layers=2)
    ours = fusedlayers.nn.LSTM(8, 16, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, torch.randn(5, 3, 8)


def _same(ref, ours, x):
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)


def test_in_place_change_under_no_grad(pair):
    ref, ours, x = pair
    _same(ref, ours, x)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
    _same(ref, ours, x)


def test_rewrite_through_data_bumps_no_version_but_is_seen(pair):
    ref, ours, x = pair
    _same(ref, ours, x)
    for p, q in zip(ref.parameters(), ours.parameters()):
        value = torch.randn_like(p)
        p.data.copy_(value)
        q.data.copy_(value)
    _same(ref, ours, x)


def test_optimizer_step_and_load_state_dict(pair):
    ref, ours, x = pair
    opt = torch.optim.SGD([*ref.parameters(), *ours.parameters()], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (ref(x)[0].square().sum() + ours(x)[0].square().sum()).backward()
        opt.step()
        _same(ref, ours, x)
    ref2 = torch.nn.LSTM(8, 16, num_layers=2)
    ref.load_state_dict(ref2.state_dict())
    ours.load_state_dict(ref2.state_dict())
    _same(ref, ours, x)


def test_replaced_parameter_and_disabled_cache(pair):
    ref, ours, x = pair
    _same(ref, ours, x)
    ref.weight_hh_l0 = torch.nn.Parameter(torch.randn_like(ref.weight_hh_l0))
    ours.weight_hh_l0 = torch.nn.Parameter(ref.weight_hh_l0.detach().clone())
    _same(ref, ours, x)
    fusedlayers.set_weight_cache_enabled(False)
    try:
        assert not fusedlayers.info()["weight_cache"]
        _same(ref, ours, x)
    finally:
        fusedlayers.set_weight_cache_enabled(True)
    fusedlayers.clear_weight_cache()
    _same(ref, ours, x)
