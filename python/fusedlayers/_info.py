"""What the extension was built with and what it runs with."""

import torch

from . import _C


def info() -> dict:
    """Returns the chosen CPU instruction set, GEMM backend, thread count, torch versions and CUDA status."""
    return {
        "isa": _C.isa(),
        "best_isa": _C.best_isa(),
        "gemm_backend": _C.gemm_backend(),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "built_with_torch": _C.built_with_torch(),
        "cuda_kernels_built": _C.cuda_built(),
    }
