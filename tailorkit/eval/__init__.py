"""Evaluation: perplexity on text files and zero-shot tasks (lm-eval), against the dense model.

    import tailorkit as tk
    ev = tk.evaluate("out/smol-22L", ppl=["book.txt"], tasks=["tk_next_line"], limit=100,
                     compare="builtin:smollm2-135m-instruct")
    print(ev.table())            # scores, dense scores, retention per task and on average
    ev.to_json("eval.json")

The same from the shell: ``tailorkit eval out/smol-22L --ppl book.txt --tasks tk_next_line
--limit 100 --compare builtin:smollm2-135m-instruct --json eval.json``.
"""

from tailorkit.errors import EvalError
from tailorkit.eval.compare import Evaluation, render_tables, retention
from tailorkit.eval.perplexity import Perplexity, perplexity, sliding_windows
from tailorkit.eval.run import evaluate, load_model
from tailorkit.eval.tasks import TASKS_DIR, builtin_tasks, run_tasks

__all__ = [
    "TASKS_DIR",
    "EvalError",
    "Evaluation",
    "Perplexity",
    "builtin_tasks",
    "evaluate",
    "load_model",
    "perplexity",
    "render_tables",
    "retention",
    "run_tasks",
    "sliding_windows",
]
