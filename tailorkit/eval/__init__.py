"""Evaluation: perplexity on text files, zero-shot tasks (lm-eval) and inference speed,
against the dense model.

    import tailorkit as tk
    ev = tk.evaluate("out/smol-22L", ppl=["book.txt"], tasks=["tk_next_line"], limit=100,
                     compare="builtin:smollm2-135m-instruct")
    print(ev.table())            # scores, dense scores, retention per task and on average
    ev.to_json("eval.json")
    tk.evaluate("out/smol-22L", speed=True, compare="builtin:smollm2-135m-instruct").speed
    # {"model": {...}, "base": {...}, "speedup": {"prefill": 1.31, "decode": 1.28}}

The same from the shell: ``tailorkit eval out/smol-22L --ppl book.txt --tasks tk_next_line
--limit 100 --compare builtin:smollm2-135m-instruct --json eval.json``.
"""

from tailorkit.errors import EvalError
from tailorkit.eval.compare import Evaluation, render_tables, retention
from tailorkit.eval.perplexity import Perplexity, perplexity, sliding_windows
from tailorkit.eval.run import evaluate, load_model
from tailorkit.eval.speed import SpeedResult, measure_speed, measure_speeds, speed_ratio
from tailorkit.eval.tasks import TASKS_DIR, builtin_tasks, run_tasks

__all__ = [
    "TASKS_DIR",
    "EvalError",
    "Evaluation",
    "Perplexity",
    "SpeedResult",
    "builtin_tasks",
    "evaluate",
    "load_model",
    "measure_speed",
    "measure_speeds",
    "perplexity",
    "render_tables",
    "retention",
    "run_tasks",
    "sliding_windows",
    "speed_ratio",
]
