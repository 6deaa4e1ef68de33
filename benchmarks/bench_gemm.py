"""The GEMM engine on the block shapes the kernels use, against torch.matmul (goal: 80% of the fp32 peak)."""

from __future__ import annotations

import torch

from .common import Case

# (M, N, K): a recurrent LSTM step block (batch x 4*16 gates x hidden), a projection chunk, square products.
DEFAULT_SHAPES = [(32, 64, 512), (64, 64, 256), (32, 2048, 512), (512, 2048, 256), (1024, 1024, 1024),
                  (2048, 2048, 2048)]
QUICK_SHAPES = [(64, 64, 256), (512, 512, 512)]


def cases(sizes: str, dtype: str) -> list[Case]:
    shapes = QUICK_SHAPES if sizes == "quick" else DEFAULT_SHAPES
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = []
    for m, n, k in shapes:
        def make(m=m, n=n, k=k):
            a = torch.randn(m, k).to(torch_dtype)
            b = torch.randn(k, n).to(torch_dtype)
            gemm = torch.ops.fusedlayers._gemm
            return (lambda: a @ b), (lambda: gemm(a, b, True))
        out.append(Case("gemm", "matmul", f"M={m} N={n} K={k}", 2.0 * m * n * k, make, reference="torch.matmul",
                        dtype=dtype, peak_kind="bf16" if dtype == "bfloat16" else "fp32", goal=">= 80% of peak"))
    return out
