"""Fuzz the safetensors header parser and the recipe loader with a fixed number of inputs.

Runs the targets of tests/fuzzing.py (the same mutations and properties as
tests/test_fuzz.py, which runs a few hundred inputs per target in the test suite) on
``--inputs`` mutants per target, input ``i`` drawn from ``random.Random(i)``, so a run
is reproducible and any failure can be replayed with ``--replay TARGET:I``.  Unlike
hypothesis, it does not stop at the first failure: it counts every failing input and
prints one example per distinct failure.

    python benchmarks/fuzz.py                     # 100,000 inputs per target
    python benchmarks/fuzz.py --inputs 2000       # a quick look
    python benchmarks/fuzz.py --replay recipe:1573

Exit status 1 when any input failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzing  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _signature(e: BaseException) -> str:
    """The kind of a failure: its type and message with numbers and byte values blanked."""
    text = str(e).splitlines()[0] if str(e) else ""
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text)
    return f"{type(e).__name__}: {text[:120]}"


def _input(target: str, i: int):
    rng = random.Random(i)
    if target == "safetensors":
        seed = rng.choice(fuzzing.safetensors_seeds())
        return (fuzzing.mutate_safetensors(seed, rng),)
    seed = rng.choice(fuzzing.recipe_seeds())
    return fuzzing.mutate_recipe(seed, rng)


def _check(target: str, args: tuple, scratch: Path) -> str:
    if target == "safetensors":
        return fuzzing.check_safetensors(args[0], scratch / "fuzz.safetensors")
    return fuzzing.check_recipe(args[0], args[1], scratch / "fuzz-recipe")


def run_target(target: str, count: int, scratch: Path, verbose: bool) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, dict] = {}
    start = time.perf_counter()
    slowest = (0.0, -1)
    for i in tqdm(range(count), desc=target, mininterval=10, file=sys.stderr):
        args = _input(target, i)  # a mutator bug is the harness's: let it raise
        t0 = time.perf_counter()
        try:
            outcomes[_check(target, args, scratch)] += 1
        except BaseException as e:  # noqa: BLE001 - counting every failure is the point
            if isinstance(e, KeyboardInterrupt):
                raise
            outcomes["failed"] += 1
            key = _signature(e)
            entry = failures.setdefault(key, {"count": 0, "first_input": i})
            entry["count"] += 1
            if entry["count"] == 1 and verbose:
                traceback.print_exc(limit=-4)
        took = time.perf_counter() - t0
        slowest = max(slowest, (took, i))
    return {
        "target": target,
        "inputs": count,
        "loaded": outcomes["loaded"],
        "rejected": outcomes["rejected"],
        "failed": outcomes["failed"],
        "distinct_failures": failures,
        "seconds": round(time.perf_counter() - start, 2),
        "slowest_input": {"index": slowest[1], "seconds": round(slowest[0], 4)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    p.add_argument("--targets", default="safetensors,recipe")
    p.add_argument("--replay", help="TARGET:I: run one input and show its traceback")
    p.add_argument("--json", default="benchmarks/results/fuzz.json")
    p.add_argument("-v", "--verbose", action="store_true", help="traceback of each new failure")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tailorkit-fuzz-") as tmp:
        scratch = Path(tmp)
        if args.replay:
            target, _, i = args.replay.partition(":")
            inputs = _input(target, int(i))
            print(f"{target} input {i}: {inputs[0][:300]!r}{'...' if len(inputs[0]) > 300 else ''}")
            print(_check(target, inputs, scratch))
            return 0
        results = [
            run_target(t, args.inputs, scratch, args.verbose) for t in args.targets.split(",")
        ]
    print(f"{'target':<12} {'inputs':>8} {'loaded':>8} {'rejected':>9} {'failed':>7} {'s':>7}")
    for r in results:
        print(
            f"{r['target']:<12} {r['inputs']:>8} {r['loaded']:>8} {r['rejected']:>9} "
            f"{r['failed']:>7} {r['seconds']:>7}"
        )
        for key, entry in r["distinct_failures"].items():
            print(
                f"  {entry['count']:>6} x {key}  (first: --replay {r['target']}:{entry['first_input']})"
            )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        import tailorkit

        meta = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "tailorkit": str(Path(tailorkit.__file__).parent),
        }
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
