"""What the search minimises.

* ``kl`` (default): KL(base || candidate) of the next-token distributions, mean per
  token on the calibration windows: how far the candidate's predictions moved from
  the model it should imitate. Cheap, smooth, needs no labels.
* ``loss``: the candidate's LM loss (next-token cross-entropy) on the same windows.
* ``lm_eval``: 1 - mean primary metric over lm-eval tasks with a sample limit (the
  paper's objective; slow: the candidate is assembled and evaluated whole).

Several can be combined with weights: ``{"kl": 1.0, "loss": 0.5}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack, Trace

TOKEN_OBJECTIVES = ("kl", "loss")
OBJECTIVES = (*TOKEN_OBJECTIVES, "lm_eval")


def parse_objective(spec: str | dict[str, float]) -> dict[str, float]:
    """``"kl"``, ``"kl+0.5*loss"`` or ``{"kl": 1, "loss": 0.5}`` -> weights by name."""
    if isinstance(spec, dict):
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for term in str(spec).replace(" ", "").split("+"):
            weight, _, name = term.rpartition("*")
            try:
                weights[name] = float(weight) if weight else 1.0
            except ValueError as e:
                raise MethodError(f"objective term {term!r} is not NAME or WEIGHT*NAME") from e
    unknown = [n for n in weights if n not in OBJECTIVES]
    if unknown or not weights:
        raise MethodError(
            f"unknown objective {', '.join(unknown) or spec!r}; choose from {', '.join(OBJECTIVES)}"
        )
    return weights


@torch.no_grad()
def teacher_log_probs(stack: DecoderStack, trace: Trace) -> torch.Tensor:
    """The base model's next-token log-probabilities on one batch, ``(B, T, V)`` float32."""
    return torch.log_softmax(stack.logits(trace.states[-1]).float(), dim=-1)


@torch.no_grad()
def token_objective(
    name: str,
    stack: DecoderStack,
    states: Sequence[torch.Tensor],
    traces: Sequence[Trace],
    teacher: Sequence[torch.Tensor],
) -> float:
    total, count = 0.0, 0
    for state, trace, t_logp in zip(states, traces, teacher):
        logp = torch.log_softmax(stack.logits(state).float(), dim=-1)  # (B, T, V)
        if name == "kl":
            per_token = (t_logp.exp() * (t_logp - logp)).sum(-1)  # (B, T)
        elif name == "loss":
            targets = trace.input_ids[:, 1:]
            per_token = -logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            raise MethodError(f"unknown token objective {name!r}")
        total += float(per_token.double().sum())
        count += per_token.numel()
    value = total / count
    if value != value:
        raise MethodError(f"objective {name} is NaN: the candidate's logits are not finite")
    return value


def lm_eval_error(recipe, settings: dict) -> float:
    """1 - the mean primary metric of ``settings["tasks"]`` (sample ``limit``)."""
    from transformers import AutoTokenizer

    from tailorkit.assemble import assemble
    from tailorkit.eval.tasks import run_tasks

    tasks = settings.get("tasks")
    if not tasks:
        raise MethodError("the lm_eval objective needs tasks, e.g. lm_eval={'tasks': [...]}")
    plan = recipe.plan()
    model = assemble(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.base.path)
    results = run_tasks(model, tokenizer, list(tasks), limit=settings.get("limit", 100))
    scores = [row[row["metric"]] for row in results.values() if row.get("metric")]
    if not scores:
        raise MethodError(f"lm-eval returned no metric for {', '.join(tasks)}")
    return 1.0 - sum(scores) / len(scores)
