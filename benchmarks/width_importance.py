"""Which MLP channels to keep: tailorkit's importance against the simpler scores, width only.

SmolLM2-135M-Instruct, every layer keeping the same number of MLP channels
(``width_share=1``) at each target ratio, calibrated as benchmarks/depth_width.py does
(``--calibration mixed``: the bundled text and six stdlib modules). Only the score that
ranks a layer's channels changes:

* ``output``: E|a_j| x |W[:, j]|: what the channel writes, to first order;
* ``activation``: E|a_j|, activation magnitude alone (Minitron's ranking; tailorkit's);
* ``energy``: E[a_j^2] x |W[:, j]|^2, the squared contribution;
* ``random``: a seeded random ranking, the control.

An experiment, so it swaps the score in place (``_ChannelStats.importance``) rather than
adding an option no user needs. Held-out scoring as benchmarks/quality.py. Prints a
table, writes JSON (benchmarks/results/width_importance.json by default).

    python benchmarks/width_importance.py                 # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import tailorkit as tk
from tailorkit import width

sys.path.insert(0, str(Path(__file__).parent))
from depth_width import calibration_texts  # noqa: E402
from quality import add_eval_arguments, dense_baseline, evaluate, write_json  # noqa: E402

OURS = width._ChannelStats.importance


def _output(stats) -> torch.Tensor:
    return (stats.abs / max(stats.tokens, 1) * stats.norm).cpu()


def _energy(stats) -> torch.Tensor:
    return (stats.square / max(stats.tokens, 1) * stats.norm.square()).cpu()


def _random(stats) -> torch.Tensor:
    return torch.rand(len(stats.abs), generator=_RANDOM, dtype=torch.float64)


_RANDOM = torch.Generator().manual_seed(0)
SCORES = {"output": _output, "activation": OURS, "energy": _energy, "random": _random}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(p)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25])
    p.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    p.add_argument("--calibration", default="mixed", choices=["bundled", "mixed"])
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--json", default="benchmarks/results/width_importance.json")
    args = p.parse_args(argv)

    started = time.time()
    source, tokenizer, evals, dense = dense_baseline(
        args.base, args.seq_len, args.windows, args.tasks
    )
    rows = [{"score": "dense", "target": 0.0, **dense}]
    print(f"dense: {round(dense['mean'], 3)}", flush=True)
    try:
        for ratio in args.ratios:
            for name in args.scores:
                width._ChannelStats.importance = SCORES[name]
                result = tk.prune(
                    args.base,
                    method="shortgpt",
                    target_ratio=ratio,
                    width_share=1.0,
                    calibration=calibration_texts(args.calibration),
                    num_windows=args.calibration_windows,
                    progress=False,
                )
                row = {
                    "score": name,
                    "target": ratio,
                    "intermediate_size": result.report["width"]["intermediate_size"],
                    **evaluate(result.recipe, evals, tokenizer, args.tasks),
                }
                rows.append(row)
                print(f"{name} @ {ratio}: {round(row['mean'], 3)}", flush=True)
    finally:
        width._ChannelStats.importance = OURS
    table = render(rows)
    print(table)
    write_json(
        args.json,
        "width_importance",
        argv,
        base=args.base,
        calibration=args.calibration,
        calibration_windows=args.calibration_windows,
        eval={"windows_per_text": args.windows, "seq_len": args.seq_len, "tasks": args.tasks},
        seconds=round(time.time() - started, 1),
        rows=rows,
        table=table,
    )


def render(rows: list[dict]) -> str:
    dense = rows[0]
    tasks = "tk_next_line" in dense
    lines = [
        "| target | score | MLP channels | prose | drama | code | mean log-ppl | ppl / dense |"
        + (" tk_next_line |" if tasks else ""),
        "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if tasks else ""),
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['target']:.2f} | {r['score']} | {r['intermediate_size']} | {r['prose']:.3f} | "
            f"{r['drama']:.3f} | {r['code']:.3f} | {r['mean']:.3f} | "
            f"{math.exp(r['mean'] - dense['mean']):.2f}x |"
            + (f" {r['tk_next_line']:.3f} |" if tasks else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
