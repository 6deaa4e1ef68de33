"""The package's foundation: build info, the torch-version guard, ISA dispatch and the GEMM engine."""

import os
import subprocess
import sys

import pytest
import torch

import fusedlayers


def test_info_reports_build_and_runtime():
    info = fusedlayers.info()
    assert info["isa"] in ("baseline", "avx2", "avx512")
    assert info["gemm_backend"] in ("brgemm", "brgemm+blas", "portable")
    assert isinstance(info["bf16_native"], bool)
    assert info["num_threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__ == info["built_with_torch"]
    assert info["cuda_kernels_built"] is False


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_import_under_another_torch_names_both_versions():
    result = _run_python("import torch; torch.__version__ = '0.0.1'; import fusedlayers")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "0.0.1" in result.stderr and fusedlayers._C.built_with_torch() in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_variant_computes_the_same_lstm(isa):
    code = f"""
import torch, fusedlayers
assert fusedlayers.info()['isa'] in ('{isa}', 'baseline', 'avx2'), fusedlayers.info()
torch.manual_seed(0)
ref = torch.nn.LSTM(12, 20, num_layers=2, bidirectional=True, proj_size=7)
ours = fusedlayers.nn.LSTM(12, 20, num_layers=2, bidirectional=True, proj_size=7)
ours.load_state_dict(ref.state_dict())
x = torch.randn(9, 3, 12, requires_grad=True)
o1, (h1, c1) = ref(x)
o2, (h2, c2) = ours(x)
torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-5)
g1 = torch.autograd.grad(o1.sum() + c1.sum(), [x, *ref.parameters()])
g2 = torch.autograd.grad(o2.sum() + c2.sum(), [x, *ours.parameters()])
for a, b in zip(g1, g2):
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
print(fusedlayers.info()['isa'])
"""
    result = _run_python(code, FUSEDLAYERS_ISA=isa)
    assert result.returncode == 0, result.stderr


def test_portable_gemm_backend_is_selectable_and_correct():
    code = """
import torch, fusedlayers
assert fusedlayers.info()['gemm_backend'] == 'portable'
a, b = torch.randn(70, 33), torch.randn(33, 45)
torch.testing.assert_close(torch.ops.fusedlayers._gemm(a, b, True), a @ b, rtol=1e-5, atol=1e-5)
"""
    result = _run_python(code, FUSEDLAYERS_GEMM="portable")
    assert result.returncode == 0, result.stderr


# (40, 512, 64) and (130, 1024, 300): rows of B a multiple of 2 KiB apart, copied to contiguous panels.
def test_tiled_gemm_backend_is_selectable_and_correct():
    """FUSEDLAYERS_GEMM=brgemm keeps float32 products shared among threads on our tiles (AVX2 CPUs otherwise send
    them to the BLAS), so the tiles are checked on every machine."""
    code = """
import torch, fusedlayers
assert fusedlayers.info()['gemm_backend'] in ('brgemm', 'portable'), fusedlayers.info()
for m, n, k in [(70, 33, 45), (130, 1024, 300), (256, 600, 1100)]:
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    out = torch.ops.fusedlayers._gemm(a.float(), b.float(), True)
    torch.testing.assert_close(out.double(), a.float().double() @ b.float().double(), rtol=1e-4, atol=1e-3)
"""
    result = _run_python(code, FUSEDLAYERS_GEMM="brgemm")
    assert result.returncode == 0, result.stderr


SHAPES = [(1, 1, 1), (3, 5, 7), (64, 64, 256), (65, 129, 513), (32, 2048, 40), (300, 17, 1), (7, 9, 0),
          (40, 512, 64), (130, 1024, 300),
          (2100, 300, 257)]  # threaded: 9 row tiles share one copy of B (a partial last chunk and K panel)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gemm_engine_matches_matmul(shape, threaded, dtype):
    m, n, k = shape
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    out = torch.ops.fusedlayers._gemm(a.to(dtype), b.to(dtype), threaded)
    # bf16 multiplies bf16-rounded inputs exactly and accumulates in fp32: compare with that.
    expected = a.to(dtype).double() @ b.to(dtype).double()
    tol = {torch.float32: 1e-4, torch.float64: 1e-12, torch.bfloat16: 1e-4}[dtype]
    assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * max(1, k) ** 0.5)


def test_gemm_engine_rejects_bad_input():
    with pytest.raises(RuntimeError, match=r"a must be \[M, K\] and b \[K, N\]"):
        torch.ops.fusedlayers._gemm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.fusedlayers._gemm(torch.randn(3, 4), torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype must be"):
        torch.ops.fusedlayers._gemm(torch.ones(3, 4, dtype=torch.int32), torch.ones(4, 6, dtype=torch.int32))


def test_peak_probe_measures_something_plausible():
    one = fusedlayers._C.measure_peak_gflops("fp32", 1, 0.05)
    assert 1 < one < 10_000
    with pytest.raises(ValueError):
        fusedlayers._C.measure_peak_gflops("fp8", 1, 0.01)
