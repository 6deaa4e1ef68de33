"""Writes a benchmark run (results.json from benchmarks.run) as a markdown page: the command, the machine, the
rows where the reference is faster, then every row.

    python -m benchmarks.report bench-results/lstm-grid/results.json "python -m benchmarks.run ..." > page.md
"""

from __future__ import annotations

import json
import sys

from .run import format_table


def page(results: dict, command: str, title: str) -> str:
    rows = results["rows"]
    slower = [r for r in rows if r["speedup"] < 1.0]
    header = results["header"].replace("\n", "; ")
    return "\n".join([
        f"# {title}", "",
        f"`{command}`", "",
        f"Machine: {header}. Medians of torch.utils.benchmark, the reference and ours in the same process on the "
        "same inputs.", "",
        f"## Where the reference is faster ({len(slower)} of {len(rows)} rows)", "",
        format_table(slower) if slower else "None.", "",
        "## Every row", "",
        format_table(rows), ""])


if __name__ == "__main__":
    path, command, title = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(path) as f:
        print(page(json.load(f), command, title))
