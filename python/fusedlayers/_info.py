"""What the extension was built with and what it runs with."""

import torch

from . import _C
from ._kept import clear_memos


def info() -> dict:
    """Returns the chosen CPU instruction set, GEMM backend, whether bfloat16 products run natively, thread count, torch versions and CUDA status."""
    return {
        "isa": _C.isa(),
        "best_isa": _C.best_isa(),
        "gemm_backend": _C.gemm_backend(),
        "bf16_native": _C.bf16_native(),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "built_with_torch": _C.built_with_torch(),
        "cuda_kernels_built": _C.cuda_built(),
        "weight_cache": _C.weight_cache_enabled(),
    }


def set_weight_cache_enabled(enabled: bool) -> None:
    """Layers keep their weights repacked for the GEMM engine between calls (about one more copy of the
    weights of the 32 most recently used layer-directions) and repack only when a weight changes: a new
    version (any in-place change autograd tracks) or new bytes at sampled positions (catches rewrites through
    `.data`). Disable this to save the memory, or if you edit single weight entries through `.data`."""
    _C.set_weight_cache_enabled(bool(enabled))


def clear_weight_cache() -> None:
    """Drops every cached repacked weight, the memory pooled for the MAF's saved activations and weight
    gradients, and the small tensors kept between calls (zero initial states, batch sizes, permutations)."""
    _C.clear_weight_cache()
    clear_memos()
