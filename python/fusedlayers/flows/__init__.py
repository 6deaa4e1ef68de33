"""Normalizing-flow transforms with nflows' interface: MAF/IAF layers whose inverse costs one network pass
instead of D, permutations, composition, and Flow."""

from .autoregressive import IAF, MaskedAffineAutoregressiveTransform, from_nflows
from .coupling import AffineCouplingTransform, alternating_mask, checkerboard_mask
from .base import CompositeTransform, InputOutsideDomain, InverseNotAvailable, InverseTransform, Transform
from .distributions import StandardNormal
from .flow import Flow, NoMeanException
from .made import MADE
from .permutations import Permutation, RandomPermutation, ReversePermutation
from .zuko_style import MAF, MAFDistribution

__all__ = [
    "AffineCouplingTransform", "alternating_mask", "checkerboard_mask", "CompositeTransform", "Flow", "IAF",
    "InputOutsideDomain", "InverseNotAvailable", "InverseTransform", "MADE", "MAF", "MAFDistribution",
    "MaskedAffineAutoregressiveTransform", "NoMeanException", "Permutation", "RandomPermutation", "ReversePermutation",
    "StandardNormal", "Transform", "from_nflows",
]
