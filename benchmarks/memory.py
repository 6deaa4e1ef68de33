"""Peak memory of one call of a benchmark case's reference and ours, each measured in a fresh process.

In the child, large allocations are served by mmap (M_MMAP_THRESHOLD = 64 KiB) so that freed memory leaves the
process at once and the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) follows the
live memory. One warm-up call first; then the peak of a second call above the resident set before it. What our
layers keep between calls (pooled activations and gradients, repacked weights) is freed after the warm-up, so
that the second call's peak counts it.

    python -m benchmarks.memory <family> <sizes> <dtype> <case name> <case size> <reference|ours>
prints the peak in bytes.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import subprocess
import sys

_M_MMAP_THRESHOLD = -3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(family: str, sizes: str, dtype: str, name: str, size: str, which: str) -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    import torch

    module = importlib.import_module(f"benchmarks.bench_{family}")
    case = next(c for c in module.cases(sizes, dtype) if c.name == name and c.size == size)
    torch.manual_seed(0)
    fn = dict(zip(("reference", "ours"), case.make()))[which]
    with torch.set_grad_enabled(case.grad):
        fn()
        import fusedlayers

        fusedlayers.clear_weight_cache()  # kept between calls: counted in the measured call's peak
        gc.collect()
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        fn()
        return (_status_kib("VmHWM") - before) * 1024


def peak_memory_mib(case, sizes: str, threads: int) -> tuple[float, float] | None:
    """(reference, ours) peak MiB above the resident set before the call; None where /proc is unavailable."""
    out = []
    for which in ("reference", "ours"):
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", case.family, sizes, case.dtype, case.name, case.size, which],
            capture_output=True, text=True, env=_env(threads))
        if result.returncode != 0:
            print(f"memory measurement failed for {case.name}: {result.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        out.append(int(result.stdout.strip().splitlines()[-1]) / 2**20)
    return out[0], out[1]


def _env(threads: int) -> dict:
    import os

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


if __name__ == "__main__":
    print(_measure(*sys.argv[1:7]))
