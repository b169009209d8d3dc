"""Should the CPU build stream its merges through the lanes? Measured, not guessed.

``tailorkit.gpu_build.DeviceStreamer`` also runs on the CPU: worker threads that ``pread``
each chunk's inputs into buffers, merge and ``pwrite`` it, so reads, merges and writes of
different chunks overlap. The CPU build instead merges on its own thread from the mapped
shards (no read copy) while a second thread copies the unchanged tensors. This times the
computed tensors of build_speed.py's job both ways, alternating (plain, lanes=1, lanes=2,
plain, ...), from a warm page cache, each into a fresh file, and checks the bytes agree.

    python benchmarks/build_speed.py --generate-only     # the checkpoints, once
    python benchmarks/build_lanes.py [--reps 5] [--json benchmarks/results/build_lanes.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from build_speed import ModelShape, default_intermediate, write_tailorkit_recipe  # noqa: E402
from quality import write_json  # noqa: E402

import tailorkit as tk  # noqa: E402
from tailorkit.builder import _write_tensor  # noqa: E402
from tailorkit.checkpoint.writer import ShardWriter, TensorSpec  # noqa: E402
from tailorkit.gpu_build import DeviceStreamer  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(way: str, jobs, out: Path) -> tuple[float, float, str]:
    """Write the computed tensors one way; (wall s, CPU s, sha256 of the file)."""
    out.unlink(missing_ok=True)
    os.sync()
    for job in jobs:  # warm: every input byte in the page cache, for every way alike
        for i in job.all_inputs():
            with open(i.info.file, "rb") as f:
                f.seek(i.info.start)
                f.read(i.info.nbytes)
    t0, c0 = time.perf_counter(), _cpu()
    writer = ShardWriter(out, [TensorSpec(j.name, j.dtype, j.shape) for j in jobs])
    try:
        if way == "plain":
            for job in jobs:
                _write_tensor(writer, job, job.chunks())
        else:
            with DeviceStreamer(torch.device("cpu"), lanes=int(way.split("=")[1])) as streamer:
                streamer.write([(writer, job) for job in jobs])
    finally:
        writer.close()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return wall, cpu, hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tailorkit/bench")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/build_lanes.json"))
    args = p.parse_args(argv)
    shape = ModelShape(
        layers=args.layers, hidden=args.hidden, intermediate=default_intermediate(args.hidden)
    )
    models = args.cache_dir.expanduser() / "models" / shape.tag
    if not (models / "a").is_dir():
        p.error(f"{models} is missing: run python benchmarks/build_speed.py --generate-only")
    work = args.cache_dir.expanduser() / "lanes"
    work.mkdir(parents=True, exist_ok=True)
    write_tailorkit_recipe(work / "recipe.yaml", shape, models / "a", models / "b")
    plan = tk.Recipe.load(work / "recipe.yaml").plan()
    jobs = [j for j in plan.jobs if not j.is_raw_copy]
    moved = sum(j.nbytes + sum(i.info.nbytes for i in j.all_inputs()) for j in jobs)
    ways = ["plain", "lanes=1", "lanes=2"]
    times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    digests = set()
    for rep in range(args.reps + 1):  # the first round is a warm-up
        for way in ways:
            wall, cpu, digest = run(way, jobs, work / "out.safetensors")
            digests.add(digest)
            if rep:
                times[way].append((wall, cpu))
            print(
                f"  {way:8s} {'warm-up' if not rep else f'rep {rep}'}: {wall:.2f} s, CPU {cpu:.2f} s"
            )
    (work / "out.safetensors").unlink(missing_ok=True)
    rows = []
    for way in ways:
        wall = statistics.median(t for t, _ in times[way])
        cpu = statistics.median(c for _, c in times[way])
        rows.append(
            {
                "way": way,
                "seconds": wall,
                "cpu_seconds": cpu,
                "gb_per_s": moved / 1e9 / wall,
                "all_seconds": [round(t, 3) for t, _ in times[way]],
            }
        )
    print(
        f"\n{len(jobs)} computed tensors, {moved / 1e9:.2f} GB read + written; "
        f"outputs identical: {len(digests) == 1}\n"
    )
    print("| way | seconds (median) | GB/s | CPU s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['way']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['cpu_seconds']:.2f} |")
    write_json(
        args.json,
        "build_lanes",
        argv,
        shape=dataclasses.asdict(shape),
        reps=args.reps,
        identical=len(digests) == 1,
        rows=rows,
    )
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
