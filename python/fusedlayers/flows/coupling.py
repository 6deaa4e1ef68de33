"""Affine coupling (Real NVP, Dinh et al. 2017) with nflows' interface and conventions: features with
mask > 0 are transformed by scale and shift computed from the others; both directions cost one network pass."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .._kept import kept, memo_allowed
from .base import Transform
from .conditioner_plan import plan_of

_coupling_op = torch.ops.fusedlayers.coupling_affine


def _fused(moving: Tensor, params: Tensor) -> bool:
    return (moving.device.type == "cpu" and moving.dtype in (torch.float32, torch.float64)
            and params.dtype == moving.dtype and params.dim() == moving.dim()
            and params.shape[1] == 2 * moving.shape[1] and params.shape[2:] == moving.shape[2:])


def alternating_mask(features: int, even: bool = True) -> Tensor:
    """1 on every other feature (starting at 0 if `even`), the usual 1-D Real NVP split."""
    mask = torch.zeros(features, dtype=torch.long)
    mask[0 if even else 1::2] = 1
    return mask


def checkerboard_mask(height: int, width: int, even: bool = True) -> Tensor:
    """A flattened height x width checkerboard, for images flattened to vectors."""
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return (((rows + cols) % 2 == 0) == even).long().flatten()


def _on_gemm_engine(net: nn.Module) -> nn.Module:
    """The conditioner's plain torch.nn.Linear layers become fusedlayers.nn.Linear (a subclass: same
    parameters, state_dict and results to rounding), whose products run on the GEMM engine: at the sizes of a
    coupling layer torch's linear reaches about 40% of the FMA peak, ours about 85%. Other modules are left alone."""
    from ..nn.linear import Linear  # the package's nn imports its flows-free modules only: no cycle at import

    for module in net.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return net


class AffineCouplingTransform(Transform):
    """Drop-in for `nflows.transforms.AffineCouplingTransform(mask, transform_net_create_fn,
    unconditional_transform=None)`: transform_net_create_fn(in_features, out_features) builds the conditioner,
    called as net(identity_features, context); it returns shift (first half) and unconstrained scale
    (second half); scale = sigmoid(unconstrained + 2) + 1e-3. The conditioner's torch.nn.Linear layers are
    switched to fusedlayers.nn.Linear (same parameters, on the GEMM engine)."""

    def __init__(self, mask, transform_net_create_fn: Callable[[int, int], nn.Module],
                 unconditional_transform: Callable | None = None):
        mask = torch.as_tensor(mask)
        if mask.dim() != 1:
            raise ValueError("Mask must be a 1-dim tensor.")
        if mask.numel() <= 0:
            raise ValueError("Mask can't be empty.")
        super().__init__()
        self.features = len(mask)
        index = torch.arange(self.features)
        self.register_buffer("identity_features", index.masked_select(mask <= 0))
        self.register_buffer("transform_features", index.masked_select(mask > 0))
        self.transform_net = _on_gemm_engine(
            transform_net_create_fn(self.num_identity_features, self.num_transform_features * 2))
        self.unconditional_transform = (None if unconditional_transform is None
                                        else unconditional_transform(features=self.num_identity_features))

    @property
    def num_identity_features(self) -> int:
        return len(self.identity_features)

    @property
    def num_transform_features(self) -> int:
        return len(self.transform_features)

    def _check(self, inputs: Tensor) -> None:
        if inputs.dim() not in (2, 4):
            raise ValueError("Inputs must be a 2D or a 4D tensor.")
        if inputs.shape[1] != self.features:
            raise ValueError(f"Expected features = {self.features}, got {inputs.shape[1]}.")

    def _scale_and_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_transform_features
        return torch.sigmoid(params[:, n:, ...] + 2) + 1e-3, params[:, :n, ...]

    def _couple(self, inputs: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(inputs)
        # index_select along dim 1: several times faster than advanced indexing (and index_put) here
        fused = self._fused_conditioner(inputs, context, inverse)
        if fused is not None:
            return fused
        identity = inputs.index_select(1, self.identity_features)
        moving = inputs.index_select(1, self.transform_features)
        logabsdet = inputs.new_zeros(inputs.shape[0])
        if self.unconditional_transform is not None and inverse:
            identity, logabsdet = self.unconditional_transform.inverse(identity, context)
        params = self.transform_net(identity, context)
        if _fused(moving, params):  # the affine map and its log-det in one C++ pass
            moving, log_scale = _coupling_op(moving, params, inverse)
            logabsdet = logabsdet + log_scale
        else:
            scale, shift = self._scale_and_shift(params)
            log_scale = torch.log(scale).flatten(1).sum(dim=1)
            moving = (moving - shift) / scale if inverse else moving * scale + shift
            logabsdet = logabsdet - log_scale if inverse else logabsdet + log_scale
        if not inverse and self.unconditional_transform is not None:
            identity, extra = self.unconditional_transform(identity, context)
            logabsdet = logabsdet + extra
        return torch.cat([identity, moving], dim=1).index_select(1, self._feature_positions()), logabsdet

    def _fused_conditioner(self, inputs: Tensor, context: Tensor | None,
                           inverse: bool) -> tuple[Tensor, Tensor] | None:
        """The conditioner, the affine map and the columns' gather and scatter in one fused pass
        (conditioner_plan.py), where nothing needs gradients and the conditioner is a chain the op runs; else
        None."""
        if (context is not None or self.unconditional_transform is not None or inputs.dim() != 2
                or inputs.device.type != "cpu" or inputs.dtype not in (torch.float32, torch.float64)
                or not memo_allowed()):
            return None
        plan = plan_of(self.transform_net)
        if plan is None or not plan.usable(inputs, self.identity_features.shape[0], self.transform_features.shape[0]):
            return None
        return plan.run(inputs, self.identity_features, self.transform_features, inverse, 1e-3)

    def _feature_positions(self) -> Tensor:
        """Where each feature sits in cat([identity, transform]), so that outputs are put back in one gather;
        kept while the two index buffers are the same tensors, unchanged."""
        if not memo_allowed():
            return torch.argsort(torch.cat([self.identity_features, self.transform_features]))
        key = (self.identity_features, self.identity_features._version, self.transform_features,
               self.transform_features._version)
        cached = self.__dict__.get("_positions")
        if cached is None or any(a is not b if isinstance(a, Tensor) else a != b for a, b in zip(cached[0], key)):
            cached = (key, kept(lambda: torch.argsort(torch.cat([self.identity_features, self.transform_features]))))
            self.__dict__["_positions"] = cached
        return cached[1]

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(inputs, context, inverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(inputs, context, inverse=True)
