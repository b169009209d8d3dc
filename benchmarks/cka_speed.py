"""Batched all-pairs CKA against the pairwise Python loop of the reference SLM code.

The reference computes CKA one layer pair at a time, building both Gram matrices and
their HSIC terms inside the double loop. tailorkit builds the L Gram matrices once
(one batched GEMM) and gets every pair's unbiased HSIC from two more GEMMs
(``tailorkit.ops.hsic_all_pairs``). Both compute the same estimator on the same
features (a random walk across layers, hidden size 576 like SmolLM2), so the values
must agree to 1e-5. Goal: at least 20x faster at L = 30. The loop is timed on a spread
sample of pairs (``--loop-pairs``) and its L x L time taken at that measured per-pair
rate: the full loop at L = 60, n = 1024 would run for hours.

    python benchmarks/cka_speed.py                # table + benchmarks/results/cka_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tailorkit import ops
from tailorkit.similarity import cka_matrix


def features(layers: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``(layers, n, d)`` float32: each layer a noisy step from the one below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    out = []
    for _ in range(layers):
        x = x + 0.3 * torch.randn(n, d, generator=g)
        out.append(x.clone())
    return torch.stack(out)


def unbiased_hsic(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    m = m.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    term1 = torch.trace(k @ m)
    term2 = (ones.T @ k @ ones) * (ones.T @ m @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones.T @ k @ m @ ones)
    return (term1 + term2.squeeze() - term3.squeeze()) / (n * (n - 3))


def pair_cka(feats: torch.Tensor, i: int, j: int) -> float:
    """One pair, Gram matrices rebuilt for it, as the reference code's double loop does."""
    xi = feats[i].double() - feats[i].double().mean(0)
    xj = feats[j].double() - feats[j].double().mean(0)
    ki, kj = xi @ xi.T, xj @ xj.T
    return float(unbiased_hsic(ki, kj) / torch.sqrt(unbiased_hsic(ki, ki) * unbiased_hsic(kj, kj)))


def sample_pairs(layers: int, count: int) -> list[tuple[int, int]]:
    """``count`` pairs spread over the L x L grid (all of them when count >= L^2)."""
    every = [(i, j) for i in range(layers) for j in range(layers)]
    if count >= len(every):
        return every
    step = len(every) / count
    return [every[int(k * step)] for k in range(count)]


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[30, 60])
    p.add_argument("--samples", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--loop-pairs",
        type=int,
        default=60,
        help="pairs the loop is timed on (spread over the grid); its L x L time is "
        "extrapolated from their mean, and its values are compared on them",
    )
    p.add_argument("--json", default="benchmarks/results/cka_speed.json")
    args = p.parse_args(argv)

    rows = []
    for layers in args.layers:
        for n in args.samples:
            feats = features(layers, n, args.hidden)
            batched_s, batched = timed(lambda: cka_matrix([feats], minibatch=n), args.reps)
            pairs = sample_pairs(layers, args.loop_pairs)
            t0 = time.perf_counter()
            looped = [pair_cka(feats, i, j) for i, j in pairs]
            per_pair = (time.perf_counter() - t0) / len(pairs)
            loop_s = per_pair * layers * layers  # the full L x L loop, at the measured rate
            err = max(abs(float(batched[i, j]) - v) for (i, j), v in zip(pairs, looped))
            rows.append(
                {
                    "layers": layers,
                    "samples": n,
                    "batched_s": round(batched_s, 4),
                    "loop_pairs_timed": len(pairs),
                    "loop_s": round(loop_s, 3),
                    "speedup": round(loop_s / batched_s, 1),
                    "max_abs_diff": err,
                }
            )
            print(rows[-1], flush=True)

    lines = [
        f"kernels: {ops.backend()} ({ops.backend_reason()}), torch threads "
        f"{torch.get_num_threads()}",
        "",
        "| layers | samples | batched (s) | pairwise loop, L x L (s) | speedup | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['samples']} | {r['batched_s']:.4f} | {r['loop_s']:.3f} | "
            f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    at30 = [r for r in rows if r["layers"] == 30]
    if at30:
        worst = min(r["speedup"] for r in at30)
        ok = worst >= 20 and all(r["max_abs_diff"] <= 1e-5 for r in rows)
        lines.append(
            f"\nL = 30: slowest speedup {worst:.1f}x; goal (>= 20x, <= 1e-5) "
            f"{'met' if ok else 'NOT met'}"
        )
    table = "\n".join(lines)
    print(table)
    out = {
        "benchmark": "cka_speed",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/cka_speed.py " + " ".join(argv or sys.argv[1:]),
        "hidden": args.hidden,
        "rows": rows,
        "table": table,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
