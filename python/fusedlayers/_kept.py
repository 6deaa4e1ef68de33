"""Small tensors that a layer keeps between calls (batch sizes, zero states, permutations, empty placeholders)."""

from __future__ import annotations

from typing import Callable

import torch


def kept(make: Callable[[], torch.Tensor]):
    """make()'s result, made outside inference mode and without grad.

    A tensor made inside torch.inference_mode() can neither be saved for a backward nor report its version, so
    one kept from an inference call would break the first training call after it."""
    with torch.inference_mode(False), torch.no_grad():
        return make()
