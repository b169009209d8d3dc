"""Zero-shot tasks through lm-eval, on a model already in memory.

``lm_eval.simple_evaluate`` runs with lm-eval's ``HFLM`` wrapping the transformers
model object, so an assembled candidate is scored without being written to disk.
Task names come from lm-eval's registry (whose data sets download from the Hub) or
from local task folders (YAML + local data, offline).  tailorkit ships one such
folder, ``tailorkit/eval/tasks_data``, built by ``scripts/make_tasks.py``:

- ``tk_next_line_prose``, ``tk_next_line_verse``, ``tk_next_line_code``: "which line
  comes next" in the style of HellaSwag, 300 items each, scored by acc and acc_norm;
- ``tk_next_line``: the group of the three (their unweighted mean).

Listing lm-eval's whole registry takes seconds, so names that the local folders
define are resolved without it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from pathlib import Path
from typing import Any

from tailorkit.errors import EvalError

TASKS_DIR = Path(__file__).resolve().parent / "tasks_data"
BUILTIN_GROUP = "tk_next_line"
#: Metrics tried in order for the one number a task is compared by.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            "zero-shot tasks need lm-eval, which is not installed; run: "
            'pip install "tailorkit[eval]"  (or: pip install lm-eval)'
        ) from None


def _task_paths(task_paths) -> list[str]:
    paths = [str(TASKS_DIR)]
    for p in task_paths or []:
        path = Path(p)
        if not path.is_dir():
            raise EvalError(f"task folder {p}: no such directory")
        paths.append(str(path.resolve()))
    return paths


def builtin_tasks() -> list[str]:
    """The offline tasks that ship with tailorkit."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(names: list[str], task_paths=None):
    """An lm-eval TaskManager that knows every name in ``names``.

    Raises EvalError for an unknown name, listing close matches.
    """
    _require_lm_eval()
    paths = tuple(_task_paths(task_paths))
    local = _indexed(paths, False)
    if all(n in local.all_tasks for n in names):
        return local
    manager = _indexed(paths, True)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvalError(
                f"unknown task {name!r}{hint} (tailorkit's offline tasks: "
                f"{', '.join(builtin_tasks())}; lm-eval knows {len(known)} names; "
                "a folder of task YAMLs is added with --task-path)"
            )
    return manager


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple[str, ...], defaults: bool):
    """A TaskManager over ``paths`` (and lm-eval's registry); indexing is slow, so kept."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=list(paths), include_defaults=defaults)


@contextlib.contextmanager
def quiet_lm_eval():
    """Hold lm-eval's loggers at ERROR unless tailorkit logs at INFO (``-v``)."""
    log = logging.getLogger("lm_eval")
    old = log.level
    if not logging.getLogger("tailorkit").isEnabledFor(logging.INFO):
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def run_tasks(
    model,
    tokenizer,
    names: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    task_paths=None,
    manager=None,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on lm-eval tasks; one entry per requested name (see ``parse_results``)."""
    manager = manager or task_manager(names, task_paths)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=list(names),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
            verbosity=None,
        )
    return parse_results(out, names)


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.02}`` -> ``{"acc": 0.5, "acc_stderr": 0.02}``."""
    metrics = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        if not math.isfinite(value):
            continue
        metrics[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
    return metrics


def primary_metric(metrics: dict[str, float]) -> str | None:
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    rest = [m for m in metrics if not m.endswith("_stderr") and "_stderr[" not in m]
    return rest[0] if rest else None


def parse_results(out: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """The requested tasks' metrics from ``simple_evaluate``'s output.

    Each entry: ``{"metric": <primary>, "higher_is_better": bool, "samples": n,
    "<metric>": value, ...}``; a group also has ``"subtasks"`` with an entry per member.
    """
    results = out["results"]
    samples = out.get("n-samples", {})
    members = out.get("group_subtasks", {})
    better = out.get("higher_is_better", {})

    def entry(name: str) -> dict[str, Any]:
        metrics = _metrics(results.get(name, {}))
        subs = members.get(name) or []
        metric = primary_metric(metrics)
        row: dict[str, Any] = {"metric": metric}
        if metric is not None:
            row["higher_is_better"] = bool(better.get(name, {}).get(metric.split("[")[0], True))
        if name in samples:
            row["samples"] = int(samples[name]["effective"])
        elif subs:
            row["samples"] = sum(int(samples.get(s, {}).get("effective", 0)) for s in subs)
        row.update(metrics)
        if subs:
            row["subtasks"] = {s: entry(s) for s in subs}
        return row

    return {name: entry(name) for name in names}
