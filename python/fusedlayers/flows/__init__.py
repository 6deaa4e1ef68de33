"""Normalizing-flow transforms with nflows' interface: MAF/IAF layers whose inverse costs one network pass
instead of D, permutations, composition, and Flow."""

from .autoregressive import IAF, MaskedAffineAutoregressiveTransform, from_nflows
from .base import CompositeTransform, InputOutsideDomain, InverseNotAvailable, InverseTransform, Transform
from .distributions import StandardNormal
from .flow import Flow
from .made import MADE
from .permutations import Permutation, RandomPermutation, ReversePermutation

__all__ = [
    "CompositeTransform", "Flow", "IAF", "InputOutsideDomain", "InverseNotAvailable", "InverseTransform", "MADE",
    "MaskedAffineAutoregressiveTransform", "Permutation", "RandomPermutation", "ReversePermutation",
    "StandardNormal", "Transform", "from_nflows",
]
