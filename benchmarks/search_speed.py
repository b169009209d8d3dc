"""GPTailor search speed: candidate evaluations per minute with the evaluator's caches on
and off, on the same search (same family, calibration, seed), which must reach the same
result either way.

The caches: merged layers are computed once per exact spec, and the hidden states of
every prefix of output layers are kept, so a candidate only runs the layers after its
first difference from one already scored. Goal: at least 3x more evaluations per minute
with them.

    python benchmarks/search_speed.py            # SmolLM2 family from make_family.py
    python benchmarks/search_speed.py --budget 24 --windows 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from make_family import family_paths  # noqa: E402

from tailorkit.calibration import token_windows  # noqa: E402
from tailorkit.checkpoint.source import Source  # noqa: E402
from tailorkit.methods.common import removal_budget  # noqa: E402
from tailorkit.search.driver import SearchSettings, run_search  # noqa: E402
from tailorkit.search.evaluator import EvaluatorConfig  # noqa: E402
from tailorkit.search.executors import LocalExecutor  # noqa: E402
from tailorkit.search.space import SearchSpace  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--budget", type=int, default=48)
    p.add_argument("--popsize", type=int, default=12)
    p.add_argument("--windows", type=int, default=8, help="calibration windows (all fidelity)")
    p.add_argument("--fidelity", type=int, default=4, help="small-slice windows")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", default="benchmarks/results/search_speed.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    family = family_paths()
    base, candidates = str(family["base"]), [str(family[k]) for k in family if k != "base"]
    source = Source(base)
    windows = token_windows(
        AutoTokenizer.from_pretrained(source.path), seq_len=args.seq_len, num_windows=args.windows
    )
    space = SearchSpace(
        base=base,
        candidates=tuple(candidates),
        num_layers=source.num_layers,
        remove=removal_budget(source, args.ratio, source.num_layers - 1),
        dtype="float32",
    )
    # Start from the middle layers removed; Block Influence would need a capture pass.
    n = source.num_layers
    x0 = space.initial([abs(i - n / 2) for i in range(n)])
    settings = SearchSettings(
        budget=args.budget, popsize=args.popsize, seed=0, fidelity_windows=args.fidelity
    )
    rows, results = [], {}
    for caches in (True, False):
        config = EvaluatorConfig(
            base=base,
            candidates=dict(zip(space.names, candidates)),
            windows=windows,
            batch_size=args.fidelity,
            caches=caches,
        )
        executor = LocalExecutor(config)
        t0 = time.perf_counter()
        out = Path(f"/tmp/tailorkit-search-speed-{caches}")
        result = run_search(space, executor, x0, settings, out, progress=True)
        seconds = time.perf_counter() - t0
        report = executor.cache_report()
        results[caches] = result
        rows.append(
            {
                "caches": caches,
                "seconds": round(seconds, 1),
                "evaluations": report["evaluations"],
                "evaluations_per_minute": round(report["evaluations"] / seconds * 60, 1),
                "layer_forwards": report["layer_forwards"],
                "layers_reused": report["layers_reused"],
                "prefix_hit_rate": round(report["prefix_hit_rate"], 3),
                "best_fitness": result.fitness,
            }
        )
        print(rows[-1], flush=True)
    same = (
        results[True].recipe == results[False].recipe
        and results[True].fitness == results[False].fitness
    )
    speedup = rows[0]["evaluations_per_minute"] / rows[1]["evaluations_per_minute"]
    table = "\n".join(
        [
            "| caches | seconds | evaluations | eval/min | layer forwards | layers reused | "
            "prefix hit rate | best KL |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {'on' if r['caches'] else 'off'} | {r['seconds']} | {r['evaluations']} | "
                f"{r['evaluations_per_minute']} | {r['layer_forwards']} | {r['layers_reused']} | "
                f"{r['prefix_hit_rate']:.1%} | {r['best_fitness']:.5f} |"
                for r in rows
            ),
            "",
            f"speedup {speedup:.2f}x (goal >= 3x: {'met' if speedup >= 3 else 'NOT met'}); "
            f"same result with and without caches: {same}",
        ]
    )
    print(table)
    data = {
        "benchmark": "search_speed",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/search_speed.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args),
        "rows": rows,
        "speedup": speedup,
        "same_result": same,
        "table": table,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
