"""What a benchmark case is, and how one is timed: the reference and ours in the same process, same inputs,
timed by torch.utils.benchmark (median of blocked_autorange, the two sides in alternating rounds)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark


@dataclass
class Case:
    family: str                 # "lstm", "gemm", ...
    name: str                   # what is measured, e.g. "inference"
    size: str                   # the sizes, e.g. "T=100 B=32 I=256 H=512"
    flops: float                # useful floating-point operations of one call (0: not counted)
    make: Callable[[], tuple[Callable[[], object], Callable[[], object]]]  # -> (reference, ours), inputs built
    reference: str = "torch"    # what the reference is
    dtype: str = "float32"
    peak_kind: str = "fp32"     # which measured peak the GFLOP/s are compared with
    goal: str = ""              # the goal for this case, as text
    grad: bool = False          # runs a backward pass (timed without torch.no_grad)
    threads: int | None = None  # fixed thread count (e.g. 1 for a GEMM block that one thread computes)
    bytes_read: float = 0.0     # for memory-bound cases: bytes one call must read (compared with read bandwidth)
    memory: bool = False        # also measure both sides' peak memory (benchmarks/memory.py, fresh processes)
    extra: dict = field(default_factory=dict)


def time_pair(reference: Callable[[], object], ours: Callable[[], object], threads: int, min_run_time: float,
              grad: bool, rounds: int = 4) -> tuple[float, float]:
    """Median seconds of one call of each, on `threads` threads. The two are timed in alternating rounds
    (torch.utils.benchmark's blocked_autorange, merged per side), so that a slow phase of a shared machine
    falls on both sides of the ratio instead of on one."""
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for fn in (reference, ours)]
    runs: list[list[benchmark.Measurement]] = [[], []]
    with torch.set_grad_enabled(grad):
        reference(), ours()  # warm-up: JIT kernels, workspaces, lazy init
        for _ in range(rounds):
            for side, timer in enumerate(timers):
                runs[side].append(timer.blocked_autorange(min_run_time=min_run_time / rounds))
    ref_s, ours_s = (benchmark.Measurement.merge(side)[0].median for side in runs)
    return ref_s, ours_s


def measure_read_bandwidth(threads: int, size_mib: int = 512) -> float:
    """GB/s of a parallel sum over a buffer far larger than the caches (the read bandwidth a memory-bound
    kernel can hope for)."""
    data = torch.ones(size_mib * 2**20 // 4)
    timer = benchmark.Timer(stmt="data.sum()", globals={"data": data}, num_threads=threads)
    data.sum()
    return data.numel() * 4 / timer.blocked_autorange(min_run_time=1.0).median / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
            else:
                name = platform.processor()
        family = model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu family"):
                    family = line.split(":", 1)[1].strip()
                elif line.startswith("model") and not line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if family != "?" and model != "?":
                    break
        return f"{name} (family {family}, model {model})"
    except OSError:
        return platform.processor() or "unknown CPU"
