"""Our transformer layers on every sample input of torch's own ModuleInfo for TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder and Transformer (`torch.testing._internal.common_modules.module_db`):
torch's module against a deep copy of it passed through `fusedlayers.convert` (same weights), outputs and
gradients. In training mode every dropout is set to 0 in both (our attention dropout draws its own mask)."""

import copy

import pytest
import torch
from torch.testing._internal.common_modules import module_db

import fusedlayers

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)
CLASSES = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer, torch.nn.TransformerEncoder,
           torch.nn.Transformer)
MODULE_INFOS = [info for info in module_db if info.module_cls in CLASSES]


def test_module_db_has_the_transformer_modules():
    assert {info.module_cls for info in MODULE_INFOS} == set(CLASSES)


def _samples():
    params = []
    for info in MODULE_INFOS:
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=training)
            for k, sample in enumerate(inputs):
                mode = "train" if training else "eval"
                params.append(pytest.param(info, training, sample, id=f"{info.module_cls.__name__}-{mode}-{k}"))
    return params


def _without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return module


def _run(module, fwd):
    def fresh(t):  # a new leaf for each module (some samples' masks are computed, not leaves)
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    args, kwargs = [fresh(t) for t in fwd.args], {k: fresh(v) for k, v in fwd.kwargs.items()}
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    out = module(*args, **kwargs)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.sum(), [*leaves, *params], allow_unused=True) if out.requires_grad else ()
    return out, grads


@pytest.mark.parametrize("info,training,sample", _samples())
def test_module_db_sample_matches_torch(info, training, sample):
    ctor, fwd = sample.constructor_input, sample.forward_input
    torch.manual_seed(0)
    ref = info.module_cls(*ctor.args, **ctor.kwargs).to(F64).train(training)
    if training:
        _without_dropout(ref)
    ours = fusedlayers.convert(copy.deepcopy(ref))
    swapped = [m for m in ours.modules() if type(m).__module__.startswith("fusedlayers")]
    assert swapped, "convert() swapped no layer"
    ref_out, ref_grads = _run(ref, fwd)
    out, grads = _run(ours, fwd)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert len(grads) == len(ref_grads)
    for k, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k: f"gradient {k}: {m}")
