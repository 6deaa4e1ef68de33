"""fusedlayers.nn.LSTM / LSTMCell on every sample input torch ships for torch.nn.LSTM / torch.nn.LSTMCell in
`torch.testing._internal.common_modules.module_db`, and on its error inputs.

Each sample: build torch's module and ours with the same constructor arguments, copy the state_dict (strict=True),
run both on deep copies of the same forward inputs and compare the outputs (nested tuples) and the gradients of a
sum of all outputs with respect to the inputs and every parameter. float64, tolerance 1e-10 (both sides are
exact to a few ulps; 1e-10 leaves room for another summation order).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fusedlayers

TOL = dict(rtol=1e-10, atol=1e-10)
OURS = {torch.nn.LSTM: fusedlayers.nn.LSTM, torch.nn.LSTMCell: fusedlayers.nn.LSTMCell}
MODULE_INFOS = [info for info in module_db if info.module_cls in OURS]


def test_module_db_has_lstm_and_lstm_cell():
    assert {info.module_cls for info in MODULE_INFOS} == set(OURS)


def _samples():
    params = []
    for info in MODULE_INFOS:
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                             training=training)
            assert inputs, info.name
            for k, sample in enumerate(inputs):
                mode = "train" if training else "eval"
                params.append(pytest.param(info, training, sample, id=f"{info.name}-{mode}-{k}"))
    return params


def _tensors(x):
    """Float tensors of a nested structure, in order (PackedSequence: its data)."""
    if isinstance(x, PackedSequence):
        return [x.data]
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


def _copy_inputs(args, kwargs):
    """Deep copies of the forward inputs with fresh leaves (so each module's gradients stay apart)."""
    args, kwargs = copy.deepcopy((args, kwargs))
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad and t.is_leaf]
    return args, kwargs, leaves


def _assert_same_structure(ours, ref):
    if isinstance(ref, PackedSequence):
        assert isinstance(ours, PackedSequence)
        torch.testing.assert_close(ours.data, ref.data, **TOL)
        for a, b in zip(ours[1:], ref[1:]):
            assert (a is None and b is None) or torch.equal(a, b)
    elif isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, **TOL)
    elif isinstance(ref, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            _assert_same_structure(a, b)
    else:
        assert ours == ref


@pytest.mark.parametrize("info,training,sample", _samples())
def test_module_db_sample_matches_torch(info, training, sample):
    ctor = sample.constructor_input
    torch.manual_seed(0)
    ref = info.module_cls(*ctor.args, **ctor.kwargs).to(torch.float64)
    ours = OURS[info.module_cls](*ctor.args, **ctor.kwargs).to(torch.float64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(training)
    ours.train(training)

    fwd = sample.forward_input
    ref_args, ref_kwargs, ref_leaves = _copy_inputs(fwd.args, fwd.kwargs)
    our_args, our_kwargs, our_leaves = _copy_inputs(fwd.args, fwd.kwargs)
    assert ref_leaves, "the samples are built with requires_grad=True"
    ref_out = ref(*ref_args, **ref_kwargs)
    our_out = ours(*our_args, **our_kwargs)
    _assert_same_structure(our_out, ref_out)

    ref_params, our_params = list(ref.parameters()), list(ours.parameters())
    ref_grads = torch.autograd.grad(sum(t.sum() for t in _tensors(ref_out)), [*ref_leaves, *ref_params])
    our_grads = torch.autograd.grad(sum(t.sum() for t in _tensors(our_out)), [*our_leaves, *our_params])
    names = [f"input[{k}]" for k in range(len(ref_leaves))] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, our_grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def _error_samples():
    params = []
    for info in MODULE_INFOS:
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                               training=True)
        for k, err in enumerate(errors):
            params.append(pytest.param(info, err, id=f"{info.name}-error-{k}"))
    return params


ERROR_SAMPLES = _error_samples()


def test_module_db_has_error_inputs_for_both():
    assert {p.values[0].module_cls for p in ERROR_SAMPLES} == set(OURS)


@pytest.mark.parametrize("info,error", ERROR_SAMPLES)
def test_module_db_error_input_raises_like_torch(info, error):
    sample = error.module_error_input
    ctor, fwd = sample.constructor_input, sample.forward_input

    def run(cls):
        torch.manual_seed(0)
        m = cls(*ctor.args, **ctor.kwargs)
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            return
        m = m.to(torch.float64)
        args, kwargs, _ = _copy_inputs(fwd.args, fwd.kwargs)
        m(*args, **kwargs)

    # torch's own module raises what module_db says; ours must raise the same type with the same message.
    with pytest.raises(error.error_type, match=error.error_regex):
        run(info.module_cls)
    with pytest.raises(error.error_type, match=error.error_regex):
        run(OURS[info.module_cls])
