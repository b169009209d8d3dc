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

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class Teacher:
    """The base model's next-token distribution on one batch, kept for the ``kl`` objective.

    ``probs`` ``(B, T, V)``, ``neg_entropy`` (``sum p log p``) and ``mass`` (``sum p``:
    1 up to rounding, but the rounding times a log-sum-exp is not negligible), both
    ``(B, T)`` float64, are computed once, so a candidate's KL needs only its logits'
    log-sum-exp and one product per token: ``KL = sum p log p - p . z + mass * lse(z)``.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    mass: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, stack: DecoderStack, trace: Trace) -> Teacher:
        # In float64: a float32 log-softmax shifts every entry by the rounding error of
        # its log-sum-exp, which moves the mass by ~1e-6, times lse(z) on every token.
        logp = torch.log_softmax(stack.logits(trace.states[-1]).double(), dim=-1)
        probs = logp.exp()
        return cls(probs.float(), (probs * logp).sum(-1), probs.sum(-1))


@torch.no_grad()
def token_sums(
    names: Sequence[str], stack: DecoderStack, state: torch.Tensor, trace: Trace, teacher: Teacher
) -> dict[str, tuple[float, int]]:
    """For each token objective in ``names``: (sum over tokens, token count) on one batch.

    One pass of the LM head serves them all. The logits are worked on in place (they
    are ``stack.logits``' fresh output): at a 49k vocabulary every ``(B, T, V)`` pass
    costs about as much as a decoder layer.
    """
    for name in names:
        if name not in TOKEN_OBJECTIVES:
            raise MethodError(f"unknown token objective {name!r}")
    z = stack.logits(state).float()  # (B, T, V)
    # Shift each token's logits by their max (KL and loss do not change): the sums below
    # then stay near zero, where float32 keeps the digits a logit of ~20 would lose.
    z.sub_(z.amax(dim=-1, keepdim=True))
    cross = (teacher.probs * z).sum(-1).double() if "kl" in names else None
    targets = trace.input_ids[:, 1:].unsqueeze(-1)
    picked = z[:, :-1].gather(-1, targets).squeeze(-1).double() if "loss" in names else None
    lse = z.exp_().sum(-1).log().double()  # (B, T); z is spent
    per_token = {}
    if "kl" in names:
        per_token["kl"] = teacher.neg_entropy - cross + teacher.mass * lse
    if "loss" in names:
        per_token["loss"] = lse[:, :-1] - picked
    return {n: (float(per_token[n].sum()), per_token[n].numel()) for n in names}


def mean_or_fail(name: str, total: float, count: int) -> float:
    value = total / count
    if not math.isfinite(value):
        raise MethodError(f"objective {name} is {value}: the candidate's logits are not finite")
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
