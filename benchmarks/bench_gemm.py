"""The GEMM engine on the block shapes the kernels use, against torch.matmul (goal: 80% of the fp32 peak)."""

from __future__ import annotations

import torch

from .common import Case

# Block shapes, computed by one thread inside a kernel (so timed on one thread): an LSTM step block (batch x
# 4 gates x 32 units x hidden) and an input-projection block. Large shapes, shared among threads (gemm_parallel):
# the weight gradients of an LSTM layer and square products.
BLOCK_SHAPES = [(32, 128, 512), (64, 128, 256), (512, 128, 256)]
LARGE_SHAPES = [(256, 2048, 3200), (1024, 1024, 1024), (2048, 2048, 2048)]
QUICK_BLOCKS, QUICK_LARGE = [(64, 128, 256)], [(512, 512, 512)]


def cases(sizes: str, dtype: str) -> list[Case]:
    blocks, large = (QUICK_BLOCKS, QUICK_LARGE) if sizes == "quick" else (BLOCK_SHAPES, LARGE_SHAPES)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = []
    for shapes, threaded in ((blocks, False), (large, True)):
        for m, n, k in shapes:
            def make(m=m, n=n, k=k, threaded=threaded):
                a = torch.randn(m, k).to(torch_dtype)
                b = torch.randn(k, n).to(torch_dtype)
                gemm = torch.ops.fusedlayers._gemm
                return (lambda: a @ b), (lambda: gemm(a, b, threaded))
            out.append(Case("gemm", "block (1 thread)" if not threaded else "parallel", f"M={m} N={n} K={k}",
                            2.0 * m * n * k, make, reference="torch.matmul", dtype=dtype,
                            peak_kind="bf16" if dtype == "bfloat16" else "fp32", goal=">= 80% of peak",
                            threads=None if threaded else 1))
    return out
