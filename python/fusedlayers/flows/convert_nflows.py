"""Our equivalents of nflows modules, with their weights: `from_nflows(module)`."""

from __future__ import annotations

from torch import nn

from .autoregressive import MaskedAffineAutoregressiveTransform
from .base import CompositeTransform, InverseTransform
from .coupling import AffineCouplingTransform
from .distributions import StandardNormal
from .flow import Flow
from .permutations import Permutation


def _maf(module) -> MaskedAffineAutoregressiveTransform:
    made = module.autoregressive_net
    blocks = list(made.blocks)
    residual = made.use_residual_blocks
    random_mask = not residual and bool(blocks) and not hasattr(made, "_fl_cyclic")  # masks come from buffers
    first = blocks[0] if blocks else None
    batch_norm = first is not None and (getattr(first, "use_batch_norm", False) or
                                        getattr(first, "batch_norm", None) is not None)
    dropout = first.dropout.p if first is not None else 0.0
    ours = MaskedAffineAutoregressiveTransform(
        features=module.features, hidden_features=made.initial_layer.out_features,
        context_features=made.context_layer.in_features if hasattr(made, "context_layer") else None,
        num_blocks=len(blocks), use_residual_blocks=residual, random_mask=False, activation=made.activation,
        dropout_probability=dropout, use_batch_norm=batch_norm)
    weight = made.initial_layer.weight
    ours.to(device=weight.device, dtype=weight.dtype)  # built in the default dtype: match the source's
    del random_mask  # random or cyclic, the degrees and masks are buffers and are loaded below
    ours.load_state_dict(module.state_dict(), strict=True)
    ours.train(module.training)
    return ours


def convert(module: nn.Module) -> nn.Module:
    ours = _convert(module)
    ours.training = module.training  # not .train(): each converted child already carries its own mode
    return ours


def _convert(module: nn.Module) -> nn.Module:
    name = type(module).__name__
    if name == "MaskedAffineAutoregressiveTransform":
        return _maf(module)
    if name == "AffineCouplingTransform":
        ours = AffineCouplingTransform.__new__(AffineCouplingTransform)
        nn.Module.__init__(ours)
        ours.features = module.features
        ours.register_buffer("identity_features", module.identity_features.clone())
        ours.register_buffer("transform_features", module.transform_features.clone())
        ours.transform_net = module.transform_net  # the conditioner is any user module: shared, not copied
        ours.unconditional_transform = (None if module.unconditional_transform is None
                                        else convert(module.unconditional_transform))
        return ours
    if name == "CompositeTransform":
        return CompositeTransform([convert(t) for t in module._transforms])
    if name == "InverseTransform":
        return InverseTransform(convert(module._transform))
    if name in ("Permutation", "RandomPermutation", "ReversePermutation"):
        return Permutation(module._permutation.clone(), module._dim)
    if name == "StandardNormal":
        return StandardNormal(module._shape).to(module._log_z.device)
    if name == "Flow":
        embedding = module._embedding_net
        return Flow(convert(module._transform), convert(module._distribution),
                    None if type(embedding).__name__ == "Identity" else embedding)
    raise TypeError(f"from_nflows: no fusedlayers equivalent for {name}")
