"""MADE (Germain et al., 2015) with nflows' structure, parameter names and initialisation, so an nflows MADE's
state_dict loads unchanged; plus the one-pass inversion of an autoregressive transform built on it.

Degrees: input i has degree i (1..D); hidden unit degrees cycle through 1..D-1 (or are random; all 0 when
D = 1); a hidden unit sees units of degree <= its own, an output of degree d sees units of degree < d. So once
x_1..x_d are known, every hidden unit of degree d can be computed, and then the outputs of degree d+1: computing
each unit exactly once, the inverse costs one forward pass of arithmetic instead of D.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from ..functional.linear import linear  # the GEMM engine (float32/float64 CPU; torch's F.linear otherwise)


def input_degrees(features: int) -> Tensor:
    return torch.arange(1, features + 1)


def _put(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """dst with rows `index` set to src. Out of place while autograd records: the old dst may be saved for the
    backward of a product that used it (in place, backward would fail on a modified tensor)."""
    if torch.is_grad_enabled():
        return dst.index_copy(0, index, src)
    return dst.index_copy_(0, index, src)


def _tile(x: Tensor, n: int) -> Tensor:
    """[a, b] -> [a, a, b, b] for n = 2."""
    return x.reshape(-1, 1).repeat(1, n).reshape(-1)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask built from unit degrees."""

    def __init__(self, in_degrees: Tensor, out_features: int, autoregressive_features: int, random_mask: bool,
                 is_output: bool, bias: bool = True):
        super().__init__(in_features=len(in_degrees), out_features=out_features, bias=bias)
        if is_output:
            out_degrees = _tile(input_degrees(autoregressive_features), out_features // autoregressive_features)
            mask = (out_degrees[..., None] > in_degrees).float()
        else:
            if random_mask:
                low = min(int(torch.min(in_degrees).item()), autoregressive_features - 1)
                out_degrees = torch.randint(low=low, high=autoregressive_features, size=[out_features],
                                            dtype=torch.long)
            else:
                cycle = max(1, autoregressive_features - 1)
                first = min(1, autoregressive_features - 1)
                out_degrees = torch.arange(out_features) % cycle + first
            mask = (out_degrees[..., None] >= in_degrees).float()
        self.register_buffer("mask", mask)
        self.register_buffer("degrees", out_degrees)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight * self.mask, self.bias)



class MaskedFeedforwardBlock(nn.Module):
    """[batch norm] -> masked linear -> activation -> dropout, as nflows' block of the same name."""

    def __init__(self, in_degrees: Tensor, autoregressive_features: int, context_features: int | None = None,
                 random_mask: bool = False, activation: Callable = F.relu, dropout_probability: float = 0.0,
                 use_batch_norm: bool = False):
        super().__init__()
        features = len(in_degrees)
        self.batch_norm = nn.BatchNorm1d(features, eps=1e-3) if use_batch_norm else None
        self.linear = MaskedLinear(in_degrees, features, autoregressive_features, random_mask, is_output=False)
        self.degrees = self.linear.degrees
        self.activation = activation
        self.dropout = nn.Dropout(p=dropout_probability)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        temps = self.batch_norm(inputs) if self.batch_norm else inputs
        return self.dropout(self.activation(self.linear(temps)))


class MaskedResidualBlock(nn.Module):
    """x + linear_1(act(linear_0(act(x)) [+ context])) with optional batch norms, as nflows' block."""

    def __init__(self, in_degrees: Tensor, autoregressive_features: int, context_features: int | None = None,
                 random_mask: bool = False, activation: Callable = F.relu, dropout_probability: float = 0.0,
                 use_batch_norm: bool = False, zero_initialization: bool = True):
        if random_mask:
            raise ValueError("Masked residual block can't be used with random masks.")
        super().__init__()
        features = len(in_degrees)
        if context_features is not None:
            self.context_layer = nn.Linear(context_features, features)
        self.use_batch_norm = use_batch_norm
        if use_batch_norm:
            self.batch_norm_layers = nn.ModuleList([nn.BatchNorm1d(features, eps=1e-3) for _ in range(2)])
        linear_0 = MaskedLinear(in_degrees, features, autoregressive_features, False, is_output=False)
        linear_1 = MaskedLinear(linear_0.degrees, features, autoregressive_features, False, is_output=False)
        self.linear_layers = nn.ModuleList([linear_0, linear_1])
        self.degrees = linear_1.degrees
        # Whether each unit keeps its input's degree (true as built here): the fused kernels add the residual
        # unit by unit in degree order and need it. Known at construction, so traced code need not compare.
        self.degrees_match_inputs = bool(torch.equal(self.degrees, in_degrees))
        if not bool(torch.all(self.degrees >= in_degrees)):
            raise RuntimeError("In a masked residual block, the output degrees can't be less than the "
                               "corresponding input degrees.")
        self.activation = activation
        self.dropout = nn.Dropout(p=dropout_probability)
        if zero_initialization:
            init.uniform_(self.linear_layers[-1].weight, a=-1e-3, b=1e-3)
            init.uniform_(self.linear_layers[-1].bias, a=-1e-3, b=1e-3)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        temps = inputs
        if self.use_batch_norm:
            temps = self.batch_norm_layers[0](temps)
        temps = self.linear_layers[0](self.activation(temps))
        if context is not None:
            temps = temps + self.context_layer(context)
        if self.use_batch_norm:
            temps = self.batch_norm_layers[1](temps)
        temps = self.linear_layers[1](self.dropout(self.activation(temps)))
        return inputs + temps


class MADE(nn.Module):
    """nflows' MADE: masked initial layer, [context], blocks (residual or feedforward), masked output layer with
    `output_multiplier` outputs per feature (interleaved: feature i owns outputs i*m .. i*m+m-1)."""

    def __init__(self, features: int, hidden_features: int, context_features: int | None = None,
                 num_blocks: int = 2, output_multiplier: int = 1, use_residual_blocks: bool = True,
                 random_mask: bool = False, activation: Callable = F.relu, dropout_probability: float = 0.0,
                 use_batch_norm: bool = False):
        if use_residual_blocks and random_mask:
            raise ValueError("Residual blocks can't be used with random masks.")
        super().__init__()
        self.features = features
        self.output_multiplier = output_multiplier
        self.context_features = context_features
        self.initial_layer = MaskedLinear(input_degrees(features), hidden_features, features, random_mask,
                                          is_output=False)
        if context_features is not None:
            self.context_layer = nn.Linear(context_features, hidden_features)
        self.use_residual_blocks = use_residual_blocks
        self.activation = activation
        block_type = MaskedResidualBlock if use_residual_blocks else MaskedFeedforwardBlock
        blocks, degrees = [], self.initial_layer.degrees
        for _ in range(num_blocks):
            blocks.append(block_type(in_degrees=degrees, autoregressive_features=features,
                                     context_features=context_features, random_mask=random_mask,
                                     activation=activation, dropout_probability=dropout_probability,
                                     use_batch_norm=use_batch_norm))
            degrees = blocks[-1].degrees
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = MaskedLinear(degrees, features * output_multiplier, features, random_mask,
                                        is_output=True)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        temps = self.initial_layer(inputs)
        if context is not None:
            temps = temps + self.activation(self.context_layer(context))
        if not self.use_residual_blocks:
            temps = self.activation(temps)
        for block in self.blocks:
            temps = block(temps, context)
        return self.final_layer(temps)

    def supports_one_pass_inverse(self) -> bool:
        """Batch norm in training mode mixes a feature's statistics over the batch in a way the running update
        of nflows' D-pass loop defines, and dropout draws new masks each pass: those fall back to D passes."""
        if not self.training:
            return True
        has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())
        has_batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in self.modules())
        return not (has_dropout or has_batch_norm)

    def invert(self, targets: Tensor, context: Tensor | None,
               solve: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Finds x with solve(features d, their network outputs, targets[:, d]) = x[:, d] for d = 1..D in order,
        computing each hidden unit once (see the module docstring). `solve` gets the 0-based feature indices,
        the network outputs of those features [batch, len(d), multiplier] and returns their x values.

        Activations are kept feature-major ([units, batch]) so that each degree's few units are one wide
        product (their weight rows times every known activation)."""
        batch, features = targets.shape[0], self.features
        x_t = targets.new_zeros(features, batch)
        layers = [self.initial_layer] + list(self.blocks)
        degrees = [self.initial_layer.degrees] + [b.degrees for b in self.blocks]
        hidden_t = [targets.new_zeros(len(d), batch) for d in degrees]
        context_t = None
        if context is not None:
            context_t = self.activation(self.context_layer(context)).t()
        plans = [_DegreePlan(layer, d, features) for layer, d in zip(layers, degrees)]
        final = _RowsByDegree(self.final_layer, self.final_layer.degrees, features)
        for d in range(1, features + 1):
            # Units of degree k see x_1..x_k, all known now; output d sees every unit of degree < d. Degree 0
            # (every hidden unit when D = 1) sees no input but still has its bias and context terms.
            k = d - 1
            plan = plans[0]
            units = plan.units[k]
            if len(units):
                h = plan.linear.apply(k, x_t)
                if context_t is not None:
                    h = h + context_t.index_select(0, units)
                if not self.use_residual_blocks:
                    h = self.activation(h)
                hidden_t[0] = _put(hidden_t[0], units, h)
            for n, block in enumerate(self.blocks):
                plan = plans[n + 1]
                if len(plan.units[k]):
                    hidden_t[n + 1] = _put(hidden_t[n + 1], plan.units[k],
                                           plan.block_units(block, k, hidden_t[n], context, degrees[n]))
            params = final.apply(d, hidden_t[-1]).t()  # [batch, multiplier]
            feature = torch.tensor([d - 1], device=targets.device)
            params = params.reshape(batch, 1, self.output_multiplier)  # named: batch may be 0
            x_t = _put(x_t, feature, solve(feature, params, targets[:, d - 1:d]).t())
        return x_t.t()


class _RowsByDegree:
    """A masked linear layer's masked weight rows and biases grouped by output degree, for products with
    feature-major activations: rows(k) @ x_t + b(k)."""

    def __init__(self, linear: MaskedLinear, degrees: Tensor, features: int):
        weight = linear.weight * linear.mask
        self.units = [torch.nonzero(degrees == k).flatten() for k in range(features + 1)]
        self.weights = [weight.index_select(0, u) for u in self.units]
        self.biases = [linear.bias.index_select(0, u)[:, None] if linear.bias is not None else None
                       for u in self.units]

    def apply(self, k: int, x_t: Tensor) -> Tensor:
        out = self.weights[k] @ x_t
        return out + self.biases[k] if self.biases[k] is not None else out


class _DegreePlan:
    """Per-degree pieces of one MADE layer (the initial layer, or a block) for the one-pass inverse."""

    def __init__(self, layer: nn.Module, degrees: Tensor, features: int):
        self.units = [torch.nonzero(degrees == k).flatten() for k in range(features + 1)]
        if isinstance(layer, MaskedLinear):
            self.linear = _RowsByDegree(layer, degrees, features)
        elif isinstance(layer, MaskedResidualBlock):
            self.inner = _RowsByDegree(layer.linear_layers[0], degrees, features)
            self.outer = _RowsByDegree(layer.linear_layers[1], degrees, features)
        else:
            self.linear = _RowsByDegree(layer.linear, degrees, features)

    @staticmethod
    def _norm(bn: nn.BatchNorm1d | None, h: Tensor, units: Tensor) -> Tensor:
        if bn is None:
            return h
        mean = bn.running_mean.index_select(0, units)[:, None]
        var = bn.running_var.index_select(0, units)[:, None]
        out = (h - mean) / torch.sqrt(var + bn.eps)
        if bn.affine:
            out = out * bn.weight.index_select(0, units)[:, None] + bn.bias.index_select(0, units)[:, None]
        return out

    def block_units(self, block: nn.Module, k: int, inputs_t: Tensor, context: Tensor | None,
                    in_degrees: Tensor) -> Tensor:
        """The block's outputs for its units of degree k, from its inputs of degree <= k (feature-major)."""
        units = self.units[k]
        if isinstance(block, MaskedResidualBlock):
            if not hasattr(self, "activated"):
                self.activated = torch.zeros_like(inputs_t)
                self.inner_t = torch.zeros_like(inputs_t)
            bn = block.batch_norm_layers if block.use_batch_norm else (None, None)
            # The block's input units of degree k became known with this step: activate them once.
            self.activated = _put(self.activated, units, block.activation(
                self._norm(bn[0], inputs_t.index_select(0, units), units)))
            hidden = self.inner.apply(k, self.activated)
            if context is not None:
                hidden = hidden + (F.linear(context, block.context_layer.weight.index_select(0, units),
                                            block.context_layer.bias.index_select(0, units))).t()
            self.inner_t = _put(self.inner_t, units, block.activation(self._norm(bn[1], hidden, units)))
            return inputs_t.index_select(0, units) + self.outer.apply(k, self.inner_t)
        if block.batch_norm is not None:
            if not hasattr(self, "normed"):
                self.normed = torch.zeros_like(inputs_t)
                self.done = -1
            # Normalise the block's inputs that became known since the last step (degrees done+1..k).
            fresh = torch.nonzero((in_degrees > self.done) & (in_degrees <= k)).flatten()
            self.normed = _put(self.normed, fresh,
                               self._norm(block.batch_norm, inputs_t.index_select(0, fresh), fresh))
            self.done = k
            return block.activation(self.linear.apply(k, self.normed))
        return block.activation(self.linear.apply(k, inputs_t))
