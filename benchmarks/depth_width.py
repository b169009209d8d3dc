"""Depth, width, or both: what a parameter budget should take, on SmolLM2-135M-Instruct.

For each target ratio (fraction of the parameters removed) the same depth method
(ShortGPT by default) runs in three ways, calibrated on tailorkit's bundled text:

* depth: layers only (``width_share=0``), also with bridges (``+bridge``);
* width: every layer's MLP keeps the same number of its own channels (``width_share=1``);
* auto: ``width_share="auto"``, the best of the splits in tailorkit.width.SPLITS by KL
  on the calibration windows, also with bridges.

``--calibration mixed`` calibrates on the bundled text plus six standard-library modules
(benchmarks/heal.py's TRAIN_MODULES, none of them in the evaluation's code text nor in
tk_next_line), so that the channels kept are chosen on code as well as on verse; both
calibrations can run in one call (``--calibration bundled mixed``).

Each model is scored as benchmarks/quality.py scores (held-out log-perplexity on prose,
drama and code disjoint from the calibration text; tk_next_line with ``--tasks N``), then
built, loaded with plain transformers, and its prefill and decode speed measured beside
the dense model's, all models of a ratio alternating within each repeat.

Prints a table, writes JSON (benchmarks/results/depth_width.json by default).

    python benchmarks/depth_width.py --tasks 40          # ~30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit.checkpoint.source import Source
from tailorkit.eval.speed import measure_speeds, speed_ratio

sys.path.insert(0, str(Path(__file__).parent))
from heal import TRAIN_MODULES  # noqa: E402
from quality import add_eval_arguments, dense_baseline, evaluate, write_json  # noqa: E402

from tailorkit.calibration import default_texts  # noqa: E402

CONFIGS = {  # name -> (width_share, bridge)
    "depth": (0.0, False),
    "depth+bridge": (0.0, True),
    "width": (1.0, False),
    "auto": ("auto", False),
    "auto+bridge": ("auto", True),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(p)
    p.add_argument("--method", default="shortgpt", help="the depth method (default shortgpt)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.20, 0.25, 0.35])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument(
        "--calibration",
        nargs="+",
        default=["bundled"],
        choices=["bundled", "mixed"],
        help="bundled text, or bundled text + stdlib code (mixed); several: one run each",
    )
    p.add_argument("--prompt-tokens", type=int, default=256, help="speed: prompt length")
    p.add_argument("--new-tokens", type=int, default=32, help="speed: greedy tokens decoded")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed runs (median)")
    p.add_argument("--json", default="benchmarks/results/depth_width.json")
    args = p.parse_args(argv)

    started = time.time()
    source, tokenizer, evals, dense = dense_baseline(
        args.base, args.seq_len, args.windows, args.tasks
    )
    rows = [{"config": "dense", "target": 0.0, "ratio": 0.0, "layers": source.num_layers, **dense}]
    print(f"dense: {_scores(rows[0])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tailorkit-depth-width-") as tmp:
        for calibration, ratio in [(c, r) for c in args.calibration for r in args.ratios]:
            built = {}
            for name in args.configs:
                share, bridge = CONFIGS[name]
                t0 = time.time()
                result = tk.prune(
                    args.base,
                    method=args.method,
                    target_ratio=ratio,
                    width_share=share,
                    bridge=bridge,
                    calibration=calibration_texts(calibration),
                    num_windows=args.calibration_windows,
                    progress=False,
                )
                seconds = time.time() - t0
                plan = result.plan
                width = result.report.get("width", {})
                row = {
                    "config": name,
                    "calibration": calibration,
                    "target": ratio,
                    "ratio": round(plan.removed_parameter_fraction, 4),
                    "layers": plan.num_layers,
                    "intermediate_size": width.get("intermediate_size"),
                    "share": width.get("share", 0.0),
                    "splits": width.get("splits", []),
                    "seconds": round(seconds, 1),
                    **evaluate(result.recipe, evals, tokenizer, args.tasks),
                    "recipe": result.recipe.to_dict(),
                }
                rows.append(row)
                folder = Path(tmp) / f"{calibration}-{ratio}-{name}"
                built[name] = tk.build(result.recipe, folder, progress=False)
                print(
                    f"{calibration} {name} @ {ratio}: {_scores(row)}, {seconds:.0f} s", flush=True
                )
            _speeds(rows[-len(built) :], args, built)
    table = render(rows)
    print(table)
    write_json(
        args.json,
        "depth_width",
        argv,
        base=args.base,
        method=args.method,
        eval={"windows_per_text": args.windows, "seq_len": args.seq_len, "tasks": args.tasks},
        calibration_windows=args.calibration_windows,
        speed={"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens},
        seconds=round(time.time() - started, 1),
        rows=rows,
        table=table,
    )


def calibration_texts(kind: str) -> list[str] | None:
    """None (tailorkit's bundled text) or the bundled text and six stdlib modules."""
    if kind == "bundled":
        return None
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return default_texts() + [(stdlib / m).read_text() for m in TRAIN_MODULES]


def _speeds(rows: list[dict], args, built: dict[str, Path]) -> None:
    """Prefill and decode speed of the dense model and ``rows``' (``built``), alternating
    within each repeat; speed-ups against the dense model of the same run."""
    paths = [Source(args.base).path, *built.values()]
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in paths]
    speeds = measure_speeds(
        models, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats
    )
    dense = speeds[0]
    for row, speed in zip(rows, speeds[1:]):
        up = speed_ratio(dense, speed)
        row |= {
            "speed": speed.to_dict(),
            "dense_speed": dense.to_dict(),
            "prefill_x": up["prefill"],
            "decode_x": up["decode"],
        }


def _scores(row: dict) -> dict:
    keys = ("mean", "tk_next_line")
    return {k: round(row[k], 3) for k in keys if k in row}


def render(rows: list[dict]) -> str:
    """Markdown table and, per ratio, whether auto is at least as good as the better of
    depth only and width only."""
    dense = rows[0]
    tasks = "tk_next_line" in dense
    lines = [
        "| calibration | target | config | width share | params removed | layers | MLP channels | "
        "mean log-ppl | ppl / dense |"
        + (" tk_next_line | retention |" if tasks else "")
        + " prefill | decode |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if tasks else "")
        + "---:|---:|",
    ]
    for r in rows[1:]:
        task = (
            f" {r['tk_next_line']:.3f} | {r['tk_next_line'] / dense['tk_next_line']:.1%} |"
            if tasks
            else ""
        )
        lines.append(
            f"| {r['calibration']} | {r['target']:.2f} | {r['config']} | {r['share']} | {r['ratio']:.1%} | "
            f"{r['layers']} | {r['intermediate_size'] or 'all'} | {r['mean']:.3f} | "
            f"{math.exp(r['mean'] - dense['mean']):.2f}x |{task} {_x(r.get('prefill_x'))} | "
            f"{_x(r.get('decode_x'))} |"
        )
    verdicts = []
    for calibration, target in sorted({(r["calibration"], r["target"]) for r in rows[1:]}):
        at = {
            r["config"]: r["mean"]
            for r in rows[1:]
            if (r["calibration"], r["target"]) == (calibration, target)
        }
        if {"auto", "depth", "width"} <= set(at):
            better = min(at["depth"], at["width"])
            met = at["auto"] <= better + 1e-9
            verdicts.append(
                f"- {calibration}, {target:.2f}: auto {at['auto']:.3f} vs the better of depth "
                f"and width {better:.3f}: {'met' if met else 'NOT met'}"
            )
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def _x(value) -> str:
    return f"{value:.2f}x" if isinstance(value, float) else ""


if __name__ == "__main__":
    main()
