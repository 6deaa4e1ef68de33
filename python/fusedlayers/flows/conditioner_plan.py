"""An affine coupling's conditioner network fused with the coupling's map, when nothing needs gradients.

The fused MADE forward (csrc/flows/made_forward_cpu_kernel.cpp) runs a network of linear layers on slabs of
samples that stay in cache, with the activations and residual additions between the products and an affine map
as its epilogue. A dense network is a MADE without masks, so a conditioner that torch.fx traces (its context
left None) to a chain of `nn.Linear` layers, activations of one kind (relu, tanh, elu, exact gelu),
residual additions and inactive dropouts runs there too, with the coupling's map in place of the MAF's. Its
intermediate activations are never written out in full: in eager torch each is a fresh megabyte-sized tensor.
Any other network, or a call that records gradients, runs as built (`Transform` calls it the usual way)."""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _global_hooks

from .made_plan import activation_code

_op = torch.ops.fusedlayers.made_coupling_forward

# The module types the fused op runs, by exact type: a subclass may do anything in its own forward (nflows'
# MaskedLinear masks its weight). Pass-through modules are inactive dropouts and identities.
_ACTIVATION_MODULES = (nn.ReLU, nn.Tanh, nn.ELU, nn.GELU)
_PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity)


def _is_linear(m) -> bool:
    from ..nn.linear import Linear  # the package's nn imports its flows-free modules only: no cycle at import
    return type(m) in (nn.Linear, Linear)


def _is_passthrough(m) -> bool:
    return type(m) in _PASSTHROUGH_MODULES


class _Tracer(torch.fx.Tracer):
    """Linear layers and activation modules stay whole (fusedlayers' own Linear subclass included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (_is_linear(m) or type(m) in _ACTIVATION_MODULES or _is_passthrough(m)
                or super().is_leaf_module(m, qualname))


def _function_activation(node: torch.fx.Node) -> int | None:
    """The activation code of a call_function node that applies one to its single tensor argument, out of
    place (an in-place one changes a tensor that other nodes may read: FX does not record that)."""
    code = activation_code(node.target)
    if code is None or len(node.args) != 1:
        return None
    kwargs = dict(node.kwargs)
    if kwargs.pop("inplace", False):
        return None
    if code == 2 and kwargs.pop("alpha", 1.0) != 1.0:
        return None
    if code == 3 and kwargs.pop("approximate", "none") != "none":
        return None
    return None if kwargs else code


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs)


class ConditionerPlan:
    """The op's layer lists for one conditioner, in made_forward's format: layer_info rows of (src buffer,
    residual buffer or -1, act_in, act_out), buffer 0 the identity features and buffer l + 1 layer l's output."""

    def __init__(self, linears: list[nn.Linear], info: list[int], act: int, in_features: int,
                 passthrough: list[nn.Module]):
        self.linears, self.info, self.act, self.passthrough = linears, info, act, passthrough
        self.in_features, self.out_features = in_features, linears[-1].out_features
        self._empty: Tensor | None = None

    def usable(self, inputs: Tensor, identity_features: int, moving_features: int) -> bool:
        """Whether this call can take the fused op: no dropout active, parameters of the inputs' dtype on the
        CPU, nothing to differentiate, and the widths the coupling needs."""
        if any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in self.passthrough):
            return False
        grad = torch.is_grad_enabled()
        needs_grad = grad and inputs.requires_grad
        for lin in self.linears:
            w, b = lin.weight, lin.bias
            if (w.dtype != inputs.dtype or w.device.type != "cpu" or not w.is_contiguous()
                    or (b is not None and (b.dtype != w.dtype or not b.is_contiguous()))):
                return False
            needs_grad = needs_grad or (grad and (w.requires_grad or (b is not None and b.requires_grad)))
        return (not needs_grad and identity_features == self.in_features
                and self.out_features == 2 * moving_features)

    def run(self, inputs: Tensor, identity_index: Tensor, moving_index: Tensor, inverse: bool,
            epsilon: float) -> tuple[Tensor, Tensor]:
        """(outputs, logabsdet) of the coupling, outputs in the inputs' column order."""
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias if lin.bias is not None else self._no_bias(lin.weight) for lin in self.linears]
        with torch._C._AutoDispatchBelowAutograd():
            return _op(inputs.contiguous(), identity_index, moving_index, weights, biases, self.info, self.act,
                       float(epsilon), inverse)

    def _no_bias(self, weight: Tensor) -> Tensor:
        """The op's empty tensor for an absent bias, of the weight's dtype."""
        if self._empty is None or self._empty.dtype != weight.dtype:
            self._empty = weight.new_empty(0)
        return self._empty


def _trace(net: nn.Module) -> torch.fx.Graph | None:
    """net's graph as nflows calls it, net(inputs, context) with context None and any later parameter at its
    default; None where that call would not bind (nflows' call raises) or FX cannot trace it."""
    import inspect
    try:
        signature = inspect.signature(net.forward)
        signature.bind(object(), None)
        params = list(signature.parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return None
        concrete = {params[1].name: None}
        for p in params[2:]:
            if p.default is p.empty:
                return None
            concrete[p.name] = p.default
        return _Tracer().trace(net, concrete_args=concrete)
    except Exception:  # noqa: BLE001 - any network FX cannot trace simply runs as built
        return None


def compile_conditioner(net: nn.Module) -> ConditionerPlan | None:
    """The plan for `net`, or None when it is not a chain that the fused op runs."""
    graph = _trace(net)
    if graph is None:
        return None
    modules = dict(net.named_modules())
    nodes = [n for n in graph.nodes]
    order = {n: k for k, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    value: dict[torch.fx.Node, tuple[str, int]] = {placeholders[0]: ("buf", 0)}
    producer = {0: placeholders[0]}  # buffer -> the node whose value it holds now
    units = [None]  # buffer -> width (buffer 0: the first layer's inputs)
    linears: list[nn.Linear] = []
    info: list[int] = []
    passthrough: list[nn.Module] = []
    act_kind: list[int] = []

    def consumers(node):
        """The nodes reading node's value, looking through pass-through modules."""
        out = []
        for user in node.users:
            if user.op == "call_module" and _is_passthrough(modules.get(user.target)):
                out += consumers(user)
            else:
                out.append(user)
        return out

    def activation_of(node) -> int | None:
        if node.op == "call_module":
            m = modules.get(node.target)
            if type(m) not in _ACTIVATION_MODULES or getattr(m, "inplace", False):
                return None
            return activation_code(m)
        if node.op == "call_function":
            return _function_activation(node)
        if node.op == "call_method" and node.target in ("relu", "tanh") and len(node.args) == 1:
            return 0 if node.target == "relu" else 1
        return None

    def latest_layer_alone(buf: int, node) -> bool:
        """Whether buf is the last layer's output, read by `node` only, so that node can fold into it."""
        return buf == len(linears) and buf > 0 and consumers(producer[buf]) == [node]

    output = None
    for node in nodes:
        if node.op == "placeholder":
            if node is not placeholders[0] and consumers(node) and any(
                    u.op != "call_function" or "assert" not in getattr(u.target, "__name__", "")
                    for u in consumers(node)):
                return None  # the traced network reads its context
            continue
        if node.op == "call_function" and "assert" in getattr(node.target, "__name__", ""):
            continue  # FX's guard that a concrete argument is None
        if node.op == "output":
            output = node.args[0]
            break
        if node.op == "call_module" and _is_passthrough(modules.get(node.target)):
            if len(node.args) != 1 or node.kwargs or node.args[0] not in value:
                return None
            passthrough.append(modules[node.target])
            value[node] = value[node.args[0]]  # consumers() looks through it to the producer's other readers
            continue
        if node.op == "call_module" and _is_linear(modules.get(node.target)):
            lin = modules[node.target]
            if len(node.args) != 1 or node.kwargs or node.args[0] not in value:
                return None
            kind, src = value[node.args[0]]
            if src == 0 and units[0] is None:
                units[0] = lin.in_features
            if units[src] != lin.in_features:
                return None
            linears.append(lin)
            info += [src, -1, int(kind == "act"), 0]
            units.append(lin.out_features)
            value[node] = ("buf", len(linears))
            producer[len(linears)] = node
            continue
        code = activation_of(node)
        if code is not None:
            if node.args[0] not in value:
                return None
            kind, buf = value[node.args[0]]
            if kind != "buf":
                return None
            act_kind.append(code)
            row = 4 * (buf - 1)
            if latest_layer_alone(buf, node) and info[row + 1] < 0 and not info[row + 3]:
                info[row + 3] = 1  # the layer's own output activation
                value[node] = ("buf", buf)
                producer[buf] = node
            else:
                value[node] = ("act", buf)  # applied by the next layer to its input
            continue
        if _is_add(node):
            a, b = node.args
            if a not in value or b not in value or value[a][0] != "buf" or value[b][0] != "buf":
                return None
            # FX records `y += t` as y + t: if an operand is read again after the sum, the network may have
            # meant the updated tensor. Such a chain runs as built.
            if any(order[user] > order[node] for operand in (a, b) for user in consumers(operand)):
                return None
            (_, ba), (_, bb) = value[a], value[b]
            last, other = (ba, bb) if latest_layer_alone(ba, node) else (bb, ba)
            row = 4 * (last - 1)
            if (not latest_layer_alone(last, node) or other >= last or info[row + 1] >= 0
                    or units[other] != units[last]):
                return None
            info[row + 1] = other
            value[node] = ("buf", last)
            producer[last] = node
            continue
        return None  # anything else: the network runs as built
    if (output is None or output not in value or value[output] != ("buf", len(linears)) or not linears
            or len(set(act_kind)) > 1):
        return None
    return ConditionerPlan(linears, info, act_kind[0] if act_kind else 0, units[0], passthrough)


def _state(m: nn.Module) -> tuple:
    """What a trace may have read of a module besides its tensors: its training flag and its plain attributes
    (an activation's alpha or approximation, a dropout's p, a flag that its forward tests)."""
    return (id(m), m.training, tuple(item for item in m.__dict__.items()
                                     if type(item[1]) in (bool, int, float, str, type(None))))


def _structure(net: nn.Module) -> tuple[tuple, bool]:
    """The state of net's modules and whether any has a forward hook, in one walk over the module dicts
    (Module.modules() builds a name for every module: a third of a small coupling's Python time)."""
    key, hooked, stack = [], False, [net]
    while stack:
        m = stack.pop()
        key.append(_state(m))
        hooked = hooked or bool(m._forward_hooks) or bool(m._forward_pre_hooks)
        stack.extend(child for child in m._modules.values() if child is not None)
    return tuple(key), hooked


_PLANS_PER_NET = 4  # a few states at once, such as a network switched between training and evaluation


def plan_of(net: nn.Module) -> ConditionerPlan | None:
    """compile_conditioner, once per state of the network's modules (see _state); None also while a forward
    hook is on any of its modules, or on all modules (the fused op would skip it)."""
    key, hooked = _structure(net)
    plans = net.__dict__.setdefault("_fused_conditioner", {})
    if key not in plans:
        if len(plans) >= _PLANS_PER_NET:
            plans.clear()
        plans[key] = (compile_conditioner(net), tuple(net.modules()))  # modules kept alive: ids stay unique
    if plans[key][0] is None or hooked or _global_hooks._global_forward_hooks \
            or _global_hooks._global_forward_pre_hooks:
        return None
    return plans[key][0]
