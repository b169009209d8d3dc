"""Inference speed of pruned checkpoints against their dense model, with plain transformers.

Each model is loaded with ``AutoModelForCausalLM.from_pretrained`` and timed by
``tailorkit.eval.speed``: a prefill of ``--batch-size`` x ``--prompt-tokens`` seeded random
token ids (``use_cache=True``), then ``--new-tokens`` greedy decode steps of one token on
the key/value cache, each phase timed on its own (CUDA synchronised), median of
``--repeats`` runs after one warm-up.  All models are held in memory and run in turn
within every repeat (dense, pruned 1, pruned 2, dense, ...), so a slow spell of the
machine falls on all of them; all see the same token ids.

Prints a table (parameters, layers, intermediate size, prefill and decode tokens/s, the
speed-ups over the dense model) and writes JSON (benchmarks/results/speed_of_pruned.json).

    python benchmarks/speed_of_pruned.py --pruned out/smol-shortgpt          # vs the built-in
    python benchmarks/speed_of_pruned.py --dense DIR --pruned A B --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from quality import write_json  # noqa: E402

from tailorkit.checkpoint.builtin import DEFAULT_MODEL  # noqa: E402
from tailorkit.devices import resolve_device  # noqa: E402
from tailorkit.errors import TailorkitError  # noqa: E402
from tailorkit.eval.compare import format_rate, format_speedup  # noqa: E402
from tailorkit.eval.run import check_checkpoint_dir  # noqa: E402
from tailorkit.eval.speed import measure_speeds, speed_ratio  # noqa: E402
from tailorkit.recipe import DTYPES  # noqa: E402


def checkpoint_dir(ref: str) -> Path:
    """A checkpoint directory, or a model reference (``builtin:NAME``, ``org/name``) resolved."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        from tailorkit.checkpoint.source import resolve

        path = resolve(ref)
    check_checkpoint_dir(path)
    return path


def load(path: Path, device: torch.device, dtype: str):
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    return model.to(device).eval()


def describe(name: str, path: Path, model) -> dict:
    config = model.config
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if isinstance(inter, (list, tuple)):  # per-layer widths
        inter = f"{min(inter)}-{max(inter)}" if min(inter) != max(inter) else inter[0]
    return {
        "model": name,
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "intermediate_size": inter,
    }


def render(rows: list[dict]) -> str:
    lines = [
        "| model | parameters | layers | intermediate | prefill tok/s | decode tok/s "
        "| prefill speed-up | decode speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, up = r["speed"], r["speedup"]
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['layers']} | {r['intermediate_size']} "
            f"| {format_rate(s['prefill_tokens_per_s'])} | {format_rate(s['decode_tokens_per_s'])} "
            f"| {format_speedup(up['prefill'])} | {format_speedup(up['decode'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default=DEFAULT_MODEL, help=f"dense model (default {DEFAULT_MODEL})")
    p.add_argument("--pruned", nargs="+", default=[], metavar="PATH", help="built checkpoints")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs, median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: saved")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default="benchmarks/results/speed_of_pruned.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    refs = [("dense", args.dense)] + [(Path(r).name or r, r) for r in args.pruned]
    paths = [checkpoint_dir(ref) for _, ref in refs]
    models = [load(path, device, args.dtype) for path in paths]
    print(
        f"{len(models)} models on {device}, {args.batch_size} x {args.prompt_tokens} prompt "
        f"tokens + {args.new_tokens} new, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    speeds = measure_speeds(
        models,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    rows = []
    for (name, _), path, model, speed in zip(refs, paths, models, speeds):
        row = describe(name, path, model)
        row["speed"] = speed.to_dict()
        row["speedup"] = speed_ratio(speeds[0], speed)
        rows.append(row)
    print(render(rows))
    first = speeds[0]
    write_json(
        args.json,
        "speed_of_pruned",
        argv,
        device=first.device,
        dtype=first.dtype,
        threads=first.threads,
        torch=torch.__version__,
        settings=first.settings,
        models=rows,
    )


if __name__ == "__main__":
    try:
        main()
    except TailorkitError as e:  # a bad path or size: one line, not a traceback
        sys.exit(f"error: {e}")
