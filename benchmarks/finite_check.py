"""What the merges' finiteness check costs: a second pass, or counted in the kernel.

A merge must not write NaN or inf unnoticed. The CPU build used to make each chunk with
``ops.weighted_sum`` and then read it again with one ``aminmax`` (``merge.check_finite``);
the kernels now count the non-finite values they write (``nonfinite=``), in the same
pass. This times, interleaved in one process, a 2-source bfloat16 merge in the build's
16M-element chunks: with the second pass, with the kernel's count, and with no check at
all, into one reused output buffer as the build does (``merge.ChunkBuffer``); and with the
kernel's count into a fresh tensor per chunk, as the build did before that buffer.

    python benchmarks/finite_check.py [--elements 67108864] [--reps 15]
                                      [--json benchmarks/results/finite_check.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tailorkit import ops
from tailorkit.merge import CHUNK_ELEMENTS, check_finite, new_counter, raise_if_nonfinite

FRESH = "counted, a fresh output tensor per chunk"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=64 << 20, help="elements per source")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/finite_check.json"))
    args = p.parse_args(argv)
    n = args.elements
    a, b = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    out = torch.empty(CHUNK_ELEMENTS, dtype=torch.bfloat16)

    def merge(check: str) -> None:
        counter = new_counter() if check.startswith("counted") else None
        for s in range(0, n, CHUNK_ELEMENTS):
            part = [a[s : s + CHUNK_ELEMENTS], b[s : s + CHUNK_ELEMENTS]]
            dest = None if check == FRESH else out[: len(part[0])]
            ops.weighted_sum(part, [0.5, 0.5], torch.bfloat16, dest, nonfinite=counter)
            if check == "second pass (aminmax)":
                check_finite(dest, "a")
            raise_if_nonfinite(counter, "a")

    ways = ("second pass (aminmax)", "counted in the kernel", "no check", FRESH)
    times: dict[str, list[float]] = {w: [] for w in ways}
    for way in ways:  # warm-up
        merge(way)
    for _ in range(args.reps):
        for way in ways:
            t0 = time.perf_counter()
            merge(way)
            times[way].append(time.perf_counter() - t0)
    rows = []
    bare = statistics.median(times["no check"])
    print(f"{n:,} bfloat16 elements x 2 sources, {ops.backend_reason()}; median of {args.reps}")
    print("| check | ms (median) | ms (min) | ns per element | x no check |")
    print("|---|---:|---:|---:|---:|")
    for way in ways:
        med = statistics.median(times[way])
        rows.append({"check": way, "median_s": med, "min_s": min(times[way])})
        print(
            f"| {way} | {med * 1e3:.1f} | {min(times[way]) * 1e3:.1f} | {med / n * 1e9:.2f} "
            f"| {med / bare:.2f} |"
        )
    record = {
        "benchmark": "finite_check",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "elements": n,
        "reps": args.reps,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
