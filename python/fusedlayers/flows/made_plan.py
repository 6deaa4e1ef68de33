"""Describes a MADE to the fused C++ ops (csrc/flows/made_ops.cpp), or returns None when an option is outside them
(the caller then takes the composed torch path, with the same results).

- made_inverse: the one-pass inverse (MAF sampling, IAF density). Every layer's units sorted by degree here, the
  network as a list of stages (made_kernel.h). It has no backward: used when nothing needs gradients, while the
  composed path of `MADE.invert` serves autograd.
- made_forward: the forward with its log-det, differentiable. The module's own weights go to the op with the
  permutations that sort each layer by degree; the op sorts (and caches) and returns gradients unsorted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._kept import kept, memo, memo_allowed
from .made import MADE, MaskedFeedforwardBlock, MaskedResidualBlock

_ACTIVATIONS = {F.relu: 0, torch.relu: 0, torch.tanh: 1, F.tanh: 1, F.elu: 2, F.gelu: 3}
_op = torch.ops.fusedlayers.made_inverse
_sorted_weight_op = torch.ops.fusedlayers.made_sorted_weight


def activation_code(fn) -> int | None:
    """The op's code for a MADE activation: torch's functions, or modules as zuko passes them."""
    if isinstance(fn, nn.ReLU):
        return 0
    if isinstance(fn, nn.Tanh):
        return 1
    if isinstance(fn, nn.ELU) and fn.alpha == 1.0:
        return 2
    if isinstance(fn, nn.GELU) and fn.approximate == "none":
        return 3
    try:
        return _ACTIVATIONS.get(fn)
    except TypeError:  # unhashable callables
        return None


def _offsets(sorted_degrees: Tensor, features: int) -> Tensor:
    """offsets[k] = how many units have degree < k, for k = 0 .. features + 1."""
    return torch.searchsorted(sorted_degrees.contiguous(), torch.arange(features + 2), right=False)


def _batch_norm_affine(bn: nn.BatchNorm1d | None, perm: Tensor) -> Tensor | None:
    if bn is None:
        return None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    return torch.stack([scale, shift])[:, perm].contiguous()


class _Stages:
    def __init__(self, features: int, batch: int, perms: "_Perms"):
        self.features, self.batch, self.perms = features, batch, perms
        self.weights, self.biases, self.in_affine, self.out_affine, self.contexts = [], [], [], [], []
        self.info, self.offsets = [], []

    def add(self, linear, in_degrees, in_perm, out_degrees, out_perm, src, residual=-1, act_in=False,
            act_out=False, in_affine=None, out_affine=None, context=None) -> int:
        # Sorted and masked in C++, cached while the weight, mask and permutations are unchanged.
        self.weights.append(_sorted_weight_op(linear.weight, linear.mask, out_perm, in_perm))
        self.biases.append(linear.bias.index_select(0, out_perm).contiguous() if linear.bias is not None else None)
        self.in_affine.append(in_affine)
        self.out_affine.append(out_affine)
        self.contexts.append(context.index_select(1, out_perm).t().contiguous() if context is not None else None)
        dst = len(self.info) + 1
        self.info.append([src, dst, residual, int(act_in), int(act_out)])
        self.offsets.append(torch.stack([self.perms.offsets(in_degrees, self.features),
                                         self.perms.offsets(out_degrees, self.features)]))
        return dst


_IDENTITIES: dict[int, Tensor] = memo({})


def _identity(n: int) -> Tensor:
    if not memo_allowed():
        return torch.arange(n, device="cpu")
    if n not in _IDENTITIES:
        _IDENTITIES[n] = kept(lambda: torch.arange(n, device="cpu"))
    return _IDENTITIES[n]


def _sorted(degrees: Tensor) -> Tensor:
    return torch.sort(degrees, stable=True).indices


def made_inverse(made: MADE, targets: Tensor, context: Tensor | None, epsilon: float) -> tuple[Tensor, Tensor] | None:
    """x and -sum log scale for y = targets through the fused op, or None when this MADE or these inputs are
    outside what the op covers (then the caller takes the composed path)."""
    act = activation_code(made.activation)
    if (act is None or made.output_multiplier != 2 or targets.device.type != "cpu"
            or targets.dtype not in (torch.float32, torch.float64) or targets.dim() != 2
            or any(p.dtype != targets.dtype for p in made.parameters())):
        return None
    features = made.features
    perms = _Perms.of(made)
    stages = _Stages(features, targets.shape[0], perms)
    x_degrees = perms.input_degrees(features)
    x_perm = _identity(features)
    degrees = made.initial_layer.degrees
    perm = perms.sort(degrees)
    initial_context = made.activation(made.context_layer(context)) if context is not None else None
    buffer = stages.add(made.initial_layer, x_degrees, x_perm, degrees, perm, src=0,
                        act_out=not made.use_residual_blocks, context=initial_context)
    for block in made.blocks:
        if isinstance(block, MaskedResidualBlock):
            if block.activation is not made.activation or not block.degrees_match_inputs:
                return None
            bn = block.batch_norm_layers if block.use_batch_norm else (None, None)
            inner_context = block.context_layer(context) if context is not None else None
            inner_degrees = block.linear_layers[0].degrees
            inner_perm = perms.sort(inner_degrees)
            inner = stages.add(block.linear_layers[0], degrees, perm, inner_degrees, inner_perm, src=buffer,
                               act_in=True, in_affine=_batch_norm_affine(bn[0], perm),
                               out_affine=_batch_norm_affine(bn[1], inner_perm), context=inner_context)
            buffer = stages.add(block.linear_layers[1], inner_degrees, inner_perm, degrees, perm, src=inner,
                                residual=buffer, act_in=True)
        elif isinstance(block, MaskedFeedforwardBlock):
            if block.activation is not made.activation:
                return None
            out_degrees = block.degrees
            out_perm = perms.sort(out_degrees)
            buffer = stages.add(block.linear, degrees, perm, out_degrees, out_perm, src=buffer, act_out=True,
                                in_affine=_batch_norm_affine(block.batch_norm, perm))
            degrees, perm = out_degrees, out_perm
        else:
            return None
    final = made.final_layer
    stages.add(final, degrees, perm, final.degrees, perms.sort(final.degrees), src=buffer)
    return _op(targets.contiguous(), stages.weights, stages.biases, stages.in_affine, stages.out_affine,
               stages.contexts, torch.tensor(stages.info, dtype=torch.int64), torch.stack(stages.offsets),
               act, float(epsilon))


# ---- the fused forward pass (density direction) with its backward

_forward_op = torch.ops.fusedlayers.made_forward
_backward_op = torch.ops.fusedlayers.made_backward


class _Layers:
    """The forward op's layer list: the module's own weights, masks, biases and context terms, and the
    permutations that sort each layer's units by degree (the op sorts, and returns gradients unsorted)."""

    def __init__(self):
        self.weights, self.masks, self.in_perms, self.out_perms, self.biases, self.contexts = [], [], [], [], [], []
        self.info = []
        self.held = []  # (linear, weight, bias, mask, degrees, degrees' version) the lists were built from

    def add(self, linear, in_perm, out_perm, src, residual=-1, act_in=False, act_out=False, context=None) -> int:
        none = kept(lambda: linear.weight.new_empty(0))  # absent bias or context
        self.held.append((linear, linear.weight, linear.bias, linear.mask, linear.degrees, linear.degrees._version))
        self.weights.append(linear.weight)
        self.masks.append(linear.mask)
        self.in_perms.append(in_perm)
        self.out_perms.append(out_perm)
        self.biases.append(linear.bias if linear.bias is not None else none)
        self.contexts.append(context.contiguous() if context is not None else none)
        self.info += [src, residual, int(act_in), int(act_out)]
        return len(self.info) // 4

    def still_current(self) -> bool:
        """Whether every layer still holds the tensors these lists were built from (a replaced parameter or
        buffer, or degrees changed in place, means building them again). Reads the modules' dicts directly:
        nn.Module attribute lookups would cost more than building the lists."""
        for linear, weight, bias, mask, degrees, version in self.held:
            params, buffers = linear._parameters, linear._buffers
            if (params["weight"] is not weight or params.get("bias") is not bias or buffers["mask"] is not mask
                    or buffers["degrees"] is not degrees or degrees._version != version):
                return False
        return True


class _Perms:
    """Each layer's degree-sorting permutation, computed once per MADE (the op's weight cache keys on them)."""

    @staticmethod
    def of(made: MADE) -> "_Perms":
        cached = getattr(made, "_fused_perms", None)
        if cached is None:
            cached = _Perms()
            object.__setattr__(made, "_fused_perms", cached)  # not a submodule or buffer
        return cached

    def __init__(self):
        self.by_degrees = {}
        self.offsets_by_degrees = {}
        self.inputs = None

    def input_degrees(self, features: int) -> Tensor:
        if not memo_allowed():
            return torch.arange(1, features + 1, device="cpu")
        if self.inputs is None or len(self.inputs) != features:
            self.inputs = kept(lambda: torch.arange(1, features + 1, device="cpu"))
        return self.inputs

    def offsets(self, degrees: Tensor, features: int) -> Tensor:
        """_offsets of the degrees in sorted order, computed once per degrees tensor."""
        if not memo_allowed():
            return _offsets(degrees[self.sort(degrees)], features)
        key = (id(degrees), degrees._version, features)
        if key not in self.offsets_by_degrees:
            self.offsets_by_degrees[key] = (kept(lambda: _offsets(degrees[self.sort(degrees)], features)), degrees)
        return self.offsets_by_degrees[key][0]

    def sort(self, degrees: Tensor) -> Tensor:
        if not memo_allowed():  # traced: the graph sorts (version counters are not traceable)
            return _sorted(degrees)
        key = (id(degrees), degrees._version)
        if key not in self.by_degrees:
            self.by_degrees[key] = (kept(lambda: _sorted(degrees)), degrees)  # keeps degrees alive: ids stay unique
        return self.by_degrees[key][0]


class _ForwardPlan:
    """What made_forward needs to know of a MADE's structure, found once per MADE (walking its modules on every
    call cost about a third of a small layer's time): whether the op covers it, the dropout modules to check,
    and the op's layer lists (rebuilt when a layer's tensors are replaced)."""

    @staticmethod
    def of(made: MADE) -> "_ForwardPlan":
        plan = getattr(made, "_fused_forward_plan", None)
        if plan is None:
            plan = _ForwardPlan(made)
            object.__setattr__(made, "_fused_forward_plan", plan)  # not a submodule
        return plan

    def __init__(self, made: MADE):
        self.act = activation_code(made.activation)
        modules = list(made.modules())
        self.dropouts = [m for m in modules if isinstance(m, nn.Dropout)]
        blocks_ok = all(block.activation is made.activation and (
            isinstance(block, MaskedFeedforwardBlock) or
            (isinstance(block, MaskedResidualBlock) and block.degrees_match_inputs)) for block in made.blocks)
        self.supported = (self.act is not None and blocks_ok and made.output_multiplier == 2
                          and not any(isinstance(m, nn.BatchNorm1d) for m in modules))
        self.layers_without_context: _Layers | None = None  # reused by later calls while still current


def _describe_layers(made: MADE, context: Tensor | None) -> _Layers:
    """The op's layer list for this MADE, in the order its layers run."""
    perms = _Perms.of(made)
    layers = _Layers()
    x_perm = _identity(made.features)  # inputs have degrees 1..D in order
    perm = perms.sort(made.initial_layer.degrees)
    initial_context = made.activation(made.context_layer(context)) if context is not None else None
    buffer = layers.add(made.initial_layer, x_perm, perm, src=0, act_out=not made.use_residual_blocks,
                        context=initial_context)
    for block in made.blocks:
        if isinstance(block, MaskedResidualBlock):
            inner_perm = perms.sort(block.linear_layers[0].degrees)
            inner_context = block.context_layer(context) if context is not None else None
            inner = layers.add(block.linear_layers[0], perm, inner_perm, src=buffer, act_in=True,
                               context=inner_context)
            buffer = layers.add(block.linear_layers[1], inner_perm, perm, src=inner, residual=buffer, act_in=True)
        else:
            out_perm = perms.sort(block.degrees)
            buffer = layers.add(block.linear, perm, out_perm, src=buffer, act_out=True)
            perm = out_perm
    layers.add(made.final_layer, perm, perms.sort(made.final_layer.degrees), src=buffer)
    return layers


def made_forward(made: MADE, inputs: Tensor, context: Tensor | None, epsilon: float) -> tuple[Tensor, Tensor] | None:
    """(scale * x + shift, sum log scale) through the fused op, or None when the MADE or the inputs are outside
    what it covers (batch norm, dropout in training, other activations, dtypes or devices)."""
    plan = _ForwardPlan.of(made)
    if (not plan.supported or (made.training and any(m.p > 0 for m in plan.dropouts))
            or inputs.device.type != "cpu" or inputs.dtype not in (torch.float32, torch.float64) or inputs.dim() != 2):
        return None
    compiling = torch.compiler.is_compiling()
    keep = context is None and memo_allowed()  # the layer lists are kept for later calls
    layers = plan.layers_without_context if keep else None
    if layers is None or not layers.still_current():
        layers = _describe_layers(made, context)
        if keep:
            plan.layers_without_context = layers
    if any(t.dtype != inputs.dtype for t in layers.weights) or any(t.dtype != inputs.dtype for t in layers.biases
                                                                   if t.numel()):
        return None
    save = torch.is_grad_enabled() and (inputs.requires_grad or (context is not None and context.requires_grad)
                                        or any(t.requires_grad for t in layers.weights)
                                        or any(t.requires_grad for t in layers.biases))  # for the backward
    args = (inputs.contiguous(), layers.weights, layers.masks, layers.in_perms, layers.out_perms, layers.biases,
            layers.contexts, layers.info, plan.act, float(epsilon), save)
    if compiling or torch._C._are_functorch_transforms_active():  # the registered op, which they can trace
        outputs, logabsdet, _ = _forward_op(*args)
    elif save:  # eager autograd without the registered wrapper's Python layer (same backward op)
        outputs, logabsdet = _EagerForward.apply((layers.info, plan.act, float(epsilon)), inputs.contiguous(),
                                                 *layers.weights, *layers.masks, *layers.in_perms,
                                                 *layers.out_perms, *layers.biases, *layers.contexts)
    else:  # nothing to differentiate: straight to the kernel, past the autograd wrapper's Python layer
        with torch._C._AutoDispatchBelowAutograd():
            outputs, logabsdet, _ = _forward_op(*args)
    return outputs, logabsdet


class _EagerForward(torch.autograd.Function):
    """made_forward and made_backward under eager autograd. The op's registered autograd (_ops/flows.py, which
    torch.compile traces) flattens and checks its list arguments in Python on every call: at batch 16 that cost
    more than the kernels. The tensors come flat: x, then six groups of one tensor per layer."""

    @staticmethod
    def forward(ctx, params, x, *groups):
        layer_info, activation, epsilon = params
        n = len(groups) // 6
        lists = [list(groups[k * n:(k + 1) * n]) for k in range(6)]
        with torch._C._AutoDispatchBelowAutograd():
            outputs, logabsdet, saved = _forward_op(x, *lists, layer_info, activation, epsilon, True)
        ctx.save_for_backward(x, *groups, *saved)
        ctx.params, ctx.layer_count = params, n
        ctx.set_materialize_grads(False)
        return outputs, logabsdet

    @staticmethod
    def backward(ctx, grad_outputs, grad_logabsdet):
        tensors = ctx.saved_tensors
        n = ctx.layer_count
        x = tensors[0]
        lists = [list(tensors[1 + k * n:1 + (k + 1) * n]) for k in range(6)]
        saved = list(tensors[1 + 6 * n:])
        layer_info, activation, epsilon = ctx.params
        if grad_outputs is None:
            grad_outputs = torch.zeros_like(x)
        if grad_logabsdet is None:
            grad_logabsdet = x.new_zeros(x.shape[0])
        input_grad = ctx.needs_input_grad[1]
        gx, gw, gb, gc = _backward_op(grad_outputs.contiguous(), grad_logabsdet.contiguous(), x, *lists, layer_info,
                                      saved, activation, epsilon, input_grad)
        return None, gx if input_grad else None, *gw, *([None] * (3 * n)), *gb, *gc
