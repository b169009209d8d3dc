"""The result of an evaluation, its comparison with the dense model, and their tables.

Retention, as the depth-pruning papers report it: per task, the tailored model's score
divided by the dense model's (on each task's primary metric: acc_norm where the task
has it, else acc, ...); on average, the mean tailored score divided by the mean dense
score ("keeps 97.3% of the average score").  The mean of the per-task ratios is given
beside it.  A task scored by a lower-is-better metric (an lm-eval perplexity task) gets
dense / tailored instead, and stays out of the average.  Perplexity is lower-is-better, so it is compared as a ratio
(tailored / dense, above 1 is worse) and never averaged with task scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Evaluation:
    """Scores of one model: perplexity per text file and metrics per task.

    ``baseline`` holds the dense model's scores when the evaluation compared against
    one; ``retention()`` then relates the two.  ``speed`` holds measured inference
    speed (``evaluate(..., speed=True)``).  ``to_dict()`` / ``to_json()`` give the JSON
    form that ``tailorkit eval --json`` writes and the model card reads.
    """

    model: str
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    baseline: Evaluation | None = None
    # {"model": SpeedResult.to_dict(), "base": ... and "speedup": {"prefill", "decode"}
    # when compared}; None when speed was not measured.
    speed: dict[str, Any] | None = None

    # -- comparison --------------------------------------------------------------------
    def retention(self) -> dict[str, Any] | None:
        """Tailored vs dense per task, on average, and per text; None without a baseline."""
        if self.baseline is None:
            return None
        return retention(self, self.baseline)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "settings": self.settings,
            "perplexity": self.perplexity,
            "tasks": self.tasks,
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
            out["retention"] = self.retention()
        if self.speed is not None:
            out["speed"] = self.speed
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        base = data.get("baseline")
        return cls(
            model=data.get("model", "model"),
            perplexity=dict(data.get("perplexity", {})),
            tasks=dict(data.get("tasks", {})),
            settings=dict(data.get("settings", {})),
            baseline=cls.from_dict(base) if base else None,
            speed=dict(data["speed"]) if data.get("speed") else None,
        )

    def table(self) -> str:
        """Markdown tables: tasks (with dense and retention when compared), perplexity and
        speed."""
        return render_tables(self.to_dict())

    def __str__(self) -> str:
        return self.table()


def _score(row: dict[str, Any]) -> float | None:
    metric = row.get("metric")
    value = row.get(metric) if metric else None
    return float(value) if isinstance(value, (int, float)) else None


def retention(tailored: Evaluation, dense: Evaluation) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, row in tailored.tasks.items():
        other = dense.tasks.get(name)
        if other is None:
            continue
        t, d = _score(row), _score({**other, "metric": row.get("metric")})
        if t is None or d is None:
            continue
        higher = row.get("higher_is_better", True)
        # Lower-is-better metrics (perplexities) are inverted, so below 1 is worse either way.
        ratio = (t / d if d > 0 else None) if higher else (d / t if t > 0 else None)
        tasks[name] = {
            "metric": row["metric"],
            "higher_is_better": higher,
            "tailored": t,
            "dense": d,
            "retention": ratio,
        }
    average: dict[str, Any] | None = None
    scores = {k: r for k, r in tasks.items() if r["higher_is_better"]}  # not perplexities
    if scores:
        mean_t = sum(r["tailored"] for r in scores.values()) / len(scores)
        mean_d = sum(r["dense"] for r in scores.values()) / len(scores)
        ratios = [r["retention"] for r in scores.values() if r["retention"] is not None]
        average = {
            "tasks": len(scores),
            "tailored": mean_t,
            "dense": mean_d,
            "retention": mean_t / mean_d if mean_d > 0 else None,
            "mean_task_retention": sum(ratios) / len(ratios) if ratios else None,
        }
    ppl: dict[str, Any] = {}
    for path, row in tailored.perplexity.items():
        other = dense.perplexity.get(path)
        if other is None:
            continue
        ppl[path] = {
            "tailored": row["perplexity"],
            "dense": other["perplexity"],
            "ratio": row["perplexity"] / other["perplexity"],
        }
    return {"tasks": tasks, "average": average, "perplexity": ppl}


# --------------------------------------------------------------------------- tables


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _task_rows(tasks: dict[str, Any], indent: str = "") -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for name, row in tasks.items():
        rows.append((indent + name, row))
        rows += _task_rows(row.get("subtasks", {}), indent + "\u21b3 ")  # "↳ member"
    return rows


def render_tables(data: dict[str, Any]) -> str:
    """Markdown tables of an ``Evaluation.to_dict()``."""
    parts = []
    base = data.get("baseline")
    if data.get("tasks"):
        dense_rows = dict(_task_rows(base["tasks"])) if base else {}
        lines = (
            [
                "| task | metric | n | tailored | dense | retention |",
                "|---|---|---:|---:|---:|---:|",
            ]
            if base
            else ["| task | metric | n | score | stderr |", "|---|---|---:|---:|---:|"]
        )
        for name, row in _task_rows(data["tasks"]):
            metric = row.get("metric")
            value = row.get(metric) if metric else None
            n = row.get("samples", "-")
            if base:
                other = dense_rows.get(name, {})
                dense = other.get(metric) if metric else None
                ratio = None
                if isinstance(value, (int, float)) and isinstance(dense, (int, float)):
                    higher = row.get("higher_is_better", True)
                    num, den = (value, dense) if higher else (dense, value)
                    ratio = num / den if den else None
                lines.append(
                    f"| {name} | {metric or '-'} | {n} | {_num(value)} | {_num(dense)} "
                    f"| {_pct(ratio)} |"
                )
            else:
                err = row.get(f"{metric}_stderr") if metric else None
                lines.append(f"| {name} | {metric or '-'} | {n} | {_num(value)} | {_num(err)} |")
        average = (data.get("retention") or {}).get("average")
        if average:
            lines.append(
                f"| **average** ({average['tasks']} task{'s' if average['tasks'] != 1 else ''}) "
                f"| | | {_num(average['tailored'])} "
                f"| {_num(average['dense'])} | **{_pct(average['retention'])}** |"
            )
        parts.append("\n".join(lines))
    if data.get("perplexity"):
        if base:
            lines = [
                "| text | tokens | context / stride | perplexity | dense | ratio |",
                "|---|---:|---:|---:|---:|---:|",
            ]
        else:
            lines = [
                "| text | tokens | context / stride | perplexity | bits per byte |",
                "|---|---:|---:|---:|---:|",
            ]
        for path, row in data["perplexity"].items():
            name = Path(path).name
            head = f"| {name} | {row['tokens']} | {row['context_length']} / {row['stride']} "
            if base:
                dense = base["perplexity"].get(path, {}).get("perplexity")
                ratio = row["perplexity"] / dense if dense else None
                lines.append(
                    head + f"| {_num(row['perplexity'], 3)} | {_num(dense, 3)} | {_num(ratio, 3)} |"
                )
            else:
                lines.append(
                    head + f"| {_num(row['perplexity'], 3)} | {_num(row['bits_per_byte'], 4)} |"
                )
        parts.append("\n".join(lines))
    if data.get("speed"):
        parts.append(speed_table(data["speed"]))
    return "\n\n".join(parts)


def format_rate(value: Any) -> str:
    """Tokens per second as the tables show them (``1,234.5``; ``-`` when missing)."""
    return f"{value:,.1f}" if isinstance(value, (int, float)) else "-"


def format_speedup(value: Any) -> str:
    """A speed-up as the tables show it (``1.31x``; ``-`` when missing)."""
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def speed_note(row: dict[str, Any]) -> str:
    """Where and how a speed was measured, in one line."""
    s = row.get("settings", {})
    where = f"{row.get('device')}, {row.get('dtype')}"
    if str(row.get("device", "")).startswith("cpu"):
        where += f", {row.get('threads')} threads"
    return (
        f"Speed: a prompt of {s.get('batch_size', 1)} x {s.get('prompt_tokens')} random "
        f"tokens, then {s.get('new_tokens')} tokens decoded one at a time on the KV cache; "
        f"median of {s.get('repeats')} runs; {where}."
    )


def speed_table(speed: dict[str, Any]) -> str:
    """The ``speed`` of an ``Evaluation.to_dict()`` as a markdown table and its note."""
    mine, base = speed.get("model") or {}, speed.get("base")
    phases = (("prefill", "prefill tokens/s"), ("decode", "decode tokens/s"))
    if base:
        up = speed.get("speedup") or {}
        lines = ["| speed | tailored | dense | speed-up |", "|---|---:|---:|---:|"]
        lines += [
            f"| {label} | {format_rate(mine.get(f'{k}_tokens_per_s'))} "
            f"| {format_rate(base.get(f'{k}_tokens_per_s'))} | {format_speedup(up.get(k))} |"
            for k, label in phases
        ]
    else:
        lines = ["| speed | tokens/s | ms |", "|---|---:|---:|"]
        lines.append(
            f"| prefill | {format_rate(mine.get('prefill_tokens_per_s'))} "
            f"| {_num(mine.get('prefill_ms'), 1)} per prefill |"
        )
        lines.append(
            f"| decode | {format_rate(mine.get('decode_tokens_per_s'))} "
            f"| {_num(mine.get('decode_ms_per_token'), 2)} per step |"
        )
    note = speed_note(mine)
    if base:
        note += " The two models ran in turn within every repeat (dense, tailored, ...)."
    return "\n".join(lines) + "\n\n" + note
