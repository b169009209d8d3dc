"""Load: peak memory and wall time of `tailorkit build` at the extremes of checkpoint shape.

Two synthetic jobs, each built by the real CLI in a child process:

- **many**: two checkpoints of 1,000 layers x 20 small tensors (20,003 tensors each,
  float32, 4 KB apiece, in 4 shards with an index; B = A + noise).  The recipe keeps
  A's layers 0-299, drops 300-399, merges 400-599 linearly 0.5/0.5 from A and B,
  and keeps B's 600-999: 18,003 output tensors, 4,000 of them merged.
- **big**: two one-layer checkpoints whose layer holds one 1 GiB float32 tensor
  (262,144 x 1,024, embedding-like; ``--big-gib`` changes it), merged 0.5/0.5: the
  merge streams it in 16M-element (64 MB) chunks.

The checkpoints are written a chunk at a time (this process stays small, so the
children's numbers are their own).  Peak RSS is the child's VmHWM polled from /proc
(with peak anonymous and file-backed RSS: mapped source pages a merge touches count
as file-backed RSS until they are released), plus ``ru_maxrss`` from wait4.  The
"floor" row is a child that only imports what the build imports.  The bound checked
is the one README.md states (see ``bound_mb``).

    python benchmarks/load.py                 # both jobs; ~3.5 GB of scratch disk
    python benchmarks/load.py --big-gib 0.25  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from build_speed import run_measured  # noqa: E402

CHUNK_ELEMENTS = 1 << 24  # tailorkit.merge.CHUNK_ELEMENTS: 64 MB of float32
MB = 1 << 20


def bound_mb(floor_mb: float, tensors: int, sources: int) -> float:
    """README's bound: the interpreter, then about one chunk per source plus the output
    chunk (each 64 MB of float32) and a few KB of metadata per tensor, whatever the size
    of the model or of any one tensor."""
    chunks = (sources + 1) * CHUNK_ELEMENTS * 4 / MB
    return floor_mb + chunks + 4 * tensors / 1024 + 64  # 4 KB per tensor, 64 MB slack


# --------------------------------------------------------------------------- writing


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], object]]) -> None:
    """A float32 safetensors file written tensor by tensor, chunk by chunk.

    ``entries``: (name, shape, fill) where fill(start, count) returns that slice of the
    flattened tensor; the file is never whole in memory.
    """
    header, pos = {}, 0
    for name, shape, _ in entries:
        nbytes = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape, fill in entries:
            n = _numel(shape)
            for start in range(0, n, CHUNK_ELEMENTS):
                f.write(fill(start, min(CHUNK_ELEMENTS, n - start)).numpy().tobytes())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random(seed: int):
    def fill(start: int, count: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        return torch.randn(count, generator=g) * 0.02

    return fill


def _plus_noise(fill_a, seed: int):
    def fill(start: int, count: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 7_000_003 + start)
        return fill_a(start, count) + torch.randn(count, generator=g) * 1e-3

    return fill


def _config(layers: int, hidden: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 1,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def write_model(folder: Path, config: dict, tensors: list, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors)
        return
    per = -(-len(tensors) // shards)
    weight_map = {}
    for i in range(shards):
        part = tensors[i * per : (i + 1) * per]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / name, part)
        weight_map.update((t[0], name) for t in part)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def make_many(root: Path, layers: int, per_layer: int) -> Path:
    """Two checkpoints of ``layers`` x ``per_layer`` small tensors; returns the recipe."""
    hidden, vocab, rows = 64, 128, 16  # each layer tensor (16, 64) float32: 4 KB
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    names += [
        (f"model.layers.{i}.part{j:02d}.weight", (rows, hidden))
        for i in range(layers)
        for j in range(per_layer)
    ]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    a = [(n, s, _random(k)) for k, (n, s) in enumerate(names)]
    b = [(n, s, _plus_noise(_random(k), k)) for k, (n, s) in enumerate(names)]
    write_model(root / "a", _config(layers, hidden, vocab), a, shards=4)
    write_model(root / "b", _config(layers, hidden, vocab), b, shards=4)
    q = layers // 10
    recipe = {
        "models": {"a": str(root / "a"), "b": str(root / "b")},
        "layers": [
            {"from": "a", "layers": [0, 3 * q]},
            *(
                {
                    "merge": "linear",
                    "sources": [{"from": "a", "layer": i}, {"from": "b", "layer": i}],
                }
                for i in range(4 * q, 6 * q)
            ),
            {"from": "b", "layers": [6 * q, layers]},
        ],
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def make_big(root: Path, gib: float) -> Path:
    """Two one-layer checkpoints whose layer is one huge tensor; returns the recipe."""
    hidden, vocab = 1024, 128
    rows = int(gib * (1 << 30)) // (4 * hidden)
    names = [
        ("model.embed_tokens.weight", (vocab, hidden)),
        ("model.layers.0.mlp.weight", (rows, hidden)),
        ("model.layers.0.norm.weight", (hidden,)),
        ("model.norm.weight", (hidden,)),
        ("lm_head.weight", (vocab, hidden)),
    ]
    a = [(n, s, _random(k)) for k, (n, s) in enumerate(names)]
    b = [(n, s, _plus_noise(_random(k), k)) for k, (n, s) in enumerate(names)]
    write_model(root / "a", _config(1, hidden, vocab), a, shards=1)
    write_model(root / "b", _config(1, hidden, vocab), b, shards=1)
    recipe = {
        "models": {"a": str(root / "a"), "b": str(root / "b")},
        "layers": [
            {"merge": "linear", "sources": [{"from": "a", "layer": 0}, {"from": "b", "layer": 0}]}
        ],
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- running

FLOOR_CODE = "import tailorkit.cli, tailorkit.builder, tailorkit.recipe, tailorkit.plan, torch"


def measure_build(recipe: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tailorkit.cli",
        "build",
        str(recipe),
        str(out),
        "-q",
        "--overwrite",
    ]
    result = run_measured(cmd)
    if result["rc"] != 0:
        raise SystemExit(f"build failed:\n{result['output_tail']}")
    header_tensors = 0
    for shard in out.glob("*.safetensors"):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header_tensors += len([k for k in json.loads(f.read(n)) if k != "__metadata__"])
    result["output_tensors"] = header_tensors
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1000, help="many: layers per checkpoint")
    p.add_argument("--per-layer", type=int, default=20, help="many: tensors per layer")
    p.add_argument("--big-gib", type=float, default=1.0, help="big: size of the one tensor")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", default="benchmarks/results/load.json")
    args = p.parse_args(argv)

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="tailorkit-load-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        floor = run_measured([sys.executable, "-c", FLOOR_CODE])
        floor_mb = floor["peak_rss_mb"]
        rows.append(
            {"job": "floor (imports only)", **floor, "bound_mb": None, "within_bound": None}
        )

        t0 = time.perf_counter()
        recipe = make_many(scratch / "many", args.layers, args.per_layer)
        made = time.perf_counter() - t0
        result = measure_build(recipe, scratch / "many" / "out")
        in_tensors = 3 + args.layers * args.per_layer
        bound = bound_mb(floor_mb, in_tensors * 2, sources=2)
        rows.append(
            {
                "job": f"many: {in_tensors:,} tensors x 2 sources",
                "input_tensors": in_tensors,
                "generate_seconds": round(made, 1),
                **result,
                "bound_mb": bound,
                "within_bound": result["peak_rss_mb"] <= bound,
            }
        )
        shutil.rmtree(scratch / "many")

        t0 = time.perf_counter()
        recipe = make_big(scratch / "big", args.big_gib)
        made = time.perf_counter() - t0
        result = measure_build(recipe, scratch / "big" / "out")
        bound = bound_mb(floor_mb, 10, sources=2)
        rows.append(
            {
                "job": f"big: one {args.big_gib:g} GiB tensor, merged from 2 sources",
                "input_tensors": 5,
                "generate_seconds": round(made, 1),
                **result,
                "bound_mb": bound,
                "within_bound": result["peak_rss_mb"] <= bound,
            }
        )
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"{'job':<46} {'out tensors':>11} {'out MB':>8} {'wall s':>7} {'CPU s':>6} "
        f"{'peak RSS MB':>11} {'anon':>6} {'file':>6} {'maxrss':>7} {'bound MB':>8}  ok"
    )
    for r in rows:
        bound = f"{r['bound_mb']:.0f}" if r["bound_mb"] else "-"
        ok = {None: "", True: "yes", False: "NO"}[r["within_bound"]]
        print(
            f"{r['job']:<46} {r.get('output_tensors', 0):>11,} {r.get('output_bytes', 0) / MB:>8.0f} "
            f"{r['seconds']:>7.2f} {r['cpu_seconds']:>6.1f} {r['peak_rss_mb']:>11.0f} "
            f"{r['peak_anon_mb']:>6.0f} {r['peak_file_mb']:>6.0f} {r['ru_maxrss_mb']:>7.0f} {bound:>8}  {ok}"
        )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "argv": sys.argv[1:],
        }
        for r in rows:
            r.pop("output_tail", None)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["within_bound"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
