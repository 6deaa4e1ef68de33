"""The benchmark suite: every fused op against its reference layer, in one process, on this machine.

    python -m benchmarks.run                          # every family, default sizes, 2 threads, float32
    python -m benchmarks.run --family lstm --threads 1 2 --dtype float32 bfloat16 --sizes grid

For each case it prints the reference's and our median time, the speed-up, our GFLOP/s and our share of the
arithmetic peak measured here (an FMA loop on as many threads as the case uses), and writes
<out>/results.json and <out>/speedup.png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys

# numpy's own OpenBLAS threads (loaded with torch) spin after any numpy product and take cycles from the two
# threads under test; no case times numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

import fusedlayers  # noqa: E402

from .common import Case, cpu_model, measure_read_bandwidth, time_pair  # noqa: E402
from .memory import peak_memory_mib  # noqa: E402

FAMILIES = ["gemm", "lstm", "attention", "flows"]


def measure_peaks(threads: list[int], dtypes: list[str], seconds: float, trials: int = 4) -> dict[str, float]:
    """The FMA peak on each thread count: the best of several short probes, since a probe that falls in a slow
    phase of a shared machine (another tenant on the core) reads low, and a peak is a maximum."""
    def best(kind: str, n: int) -> float:
        return max(fusedlayers._C.measure_peak_gflops(kind, n, seconds / trials) for _ in range(trials))

    peaks = {}
    for n in threads:
        peaks[f"fp32/{n}"] = best("fp32", n)
        if "bfloat16" in dtypes:
            try:
                peaks[f"bf16/{n}"] = best("bf16", n)
            except RuntimeError:
                pass
    return peaks


def run_case(case: Case, threads: int, min_run_time: float, sizes: str) -> dict:
    torch.manual_seed(0)
    reference, ours = case.make()
    ref_s, ours_s = time_pair(reference, ours, threads, min_run_time, case.grad)
    memory = peak_memory_mib(case, sizes, threads) if case.memory else None
    return {
        "reference_peak_mib": memory[0] if memory else None, "ours_peak_mib": memory[1] if memory else None,
        "family": case.family, "case": case.name, "size": case.size, "dtype": case.dtype, "threads": threads,
        "reference": case.reference, "reference_ms": ref_s * 1e3, "ours_ms": ours_s * 1e3,
        "speedup": ref_s / ours_s, "flops": case.flops, "bytes_read": case.bytes_read, "peak_kind": case.peak_kind,
        "ours_gflops": case.flops / ours_s / 1e9 if case.flops else None,
        "reference_gflops": case.flops / ref_s / 1e9 if case.flops else None,
        "goal": case.goal,
    }


def add_shares(row: dict, peaks: dict[str, float]) -> None:
    """Our and the reference's share of the measured FMA peak (or, for memory-bound cases, read bandwidth)."""
    threads, gflops, ref_gflops = row["threads"], row["ours_gflops"], row["reference_gflops"]
    peak = peaks.get(f"{row['peak_kind']}/{threads}")
    bandwidth = peaks.get(f"read GB/s/{threads}")
    bytes_read = row["bytes_read"]
    row["ours_pct_peak"] = 100 * gflops / peak if gflops and peak else None
    row["reference_pct_peak"] = 100 * ref_gflops / peak if ref_gflops and peak else None
    row["ours_pct_bandwidth"] = (100 * bytes_read / (row["ours_ms"] / 1e3) / 1e9 / bandwidth
                                 if bytes_read and bandwidth else None)
    row["reference_pct_bandwidth"] = (100 * bytes_read / (row["reference_ms"] / 1e3) / 1e9 / bandwidth
                                      if bytes_read and bandwidth else None)


def _memory_note(row: dict) -> str:
    if row.get("ours_peak_mib") is None:
        return ""
    ref, ours = row["reference_peak_mib"], row["ours_peak_mib"]
    ratio = f", {ours / ref:.3f}x" if ref > 0 else ""
    return f" (peak memory: ref {ref:.1f} MiB, ours {ours:.1f} MiB{ratio})"


def format_table(rows: list[dict]) -> str:
    head = ["family", "case", "size", "dtype", "thr", "reference ms", "ours ms", "speed-up", "GFLOP/s",
            "% peak", "ref % peak", "goal"]
    lines = [head]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        ours_pct, ref_pct = fmt(r["ours_pct_peak"], ".0f"), fmt(r["reference_pct_peak"], ".0f")
        if r.get("ours_pct_bandwidth") is not None:  # memory-bound: share of the measured read bandwidth
            ours_pct = fmt(r["ours_pct_bandwidth"], ".0f") + " (bw)"
            ref_pct = fmt(r["reference_pct_bandwidth"], ".0f") + " (bw)"
        lines.append([r["family"], r["case"], r["size"], r["dtype"], str(r["threads"]), fmt(r["reference_ms"], ".3f"),
                      fmt(r["ours_ms"], ".3f"), fmt(r["speedup"], ".2f") + "x", fmt(r["ours_gflops"], ".0f"),
                      ours_pct, ref_pct, r["goal"] + _memory_note(r)])
    widths = [max(len(row[k]) for row in lines) for k in range(len(head))]
    out = []
    for n, row in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def save_chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['family']}: {r['case']} {r['size']} {r['dtype']} {r['threads']}t" for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(rows) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(rows)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the reference (reference time / our time)")
    ax.set_title("fusedlayers vs reference layers (median, same process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=FAMILIES)
    parser.add_argument("--sizes", choices=["quick", "default", "grid"], default="default")
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--peak-seconds", type=float, default=2.0)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    cases = []
    for family in args.family:
        module = importlib.import_module(f".bench_{family}", __package__)
        for dtype in args.dtype:
            cases.extend(module.cases(args.sizes, dtype))
    jobs = [(case, n) for case in cases for n in sorted({case.threads or n for n in args.threads})]
    thread_counts = sorted({n for _, n in jobs})
    bandwidth_threads = sorted({n for case, n in jobs if case.bytes_read})

    def probe() -> dict[str, float]:
        found = measure_peaks(thread_counts, args.dtype, args.peak_seconds)
        for n in bandwidth_threads:
            found[f"read GB/s/{n}"] = measure_read_bandwidth(n)
        return found

    # Probed before and after the cases, the best of both kept: one slow phase does not set the yardstick.
    peaks = probe()
    rows = []
    for case, n in tqdm(jobs, desc="benchmarks", unit="case", file=sys.stderr):
        rows.append(run_case(case, n, args.min_run_time, args.sizes))
    after = probe()
    peaks = {key: max(value, after.get(key, value)) for key, value in peaks.items()}
    for row in rows:
        add_shares(row, peaks)
    header = (f"fusedlayers {fusedlayers.__version__} | torch {torch.__version__} | {cpu_model()} | "
              f"ISA {fusedlayers._C.isa()} | GEMM {fusedlayers._C.gemm_backend()} | "
              f"{datetime.date.today().isoformat()}\nmeasured peak GFLOP/s: "
              + ", ".join(f"{k} threads: {v:.0f}" for k, v in peaks.items())
              + ' ("read GB/s": a parallel sum over 512 MiB; each the best of probes before and after the cases)')
    print(header)
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "peaks_gflops": peaks, "info": fusedlayers.info(), "rows": rows}, f, indent=1)
    save_chart(rows, os.path.join(args.out, "speedup.png"))
    print(f"wrote {args.out}/results.json and {args.out}/speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
