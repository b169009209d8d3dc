"""What a trial is scored by: the objectives the trial runner plugs in.

* :class:`Logits` -- GPTailor's fitness, lower is better: a weighted sum of ``kl``
  (default: KL(base || trial) of the next-token distributions, mean per token; cheap,
  smooth, needs no labels), ``loss`` (the trial's LM loss) and ``lm_eval`` (1 - the mean
  primary metric of lm-eval tasks with a sample limit: the paper's objective, slow).
  ``top_k`` makes ``kl`` cheap at a large vocabulary: the teacher's K likeliest tokens and
  one bucket for the rest (see :class:`TopKTeacher`).
* :class:`FinalStates` -- how alike the trial's final hidden states are to the base
  model's (linear CKA, or mean cosine per token), by default past the attention-sink
  tokens: what SLM and LaCo decide by.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack, Trace
from tailorkit.similarity import cka_from_hsic, hsic_minibatches

TOKEN_OBJECTIVES = ("kl", "loss")
OBJECTIVES = (*TOKEN_OBJECTIVES, "lm_eval")
SIMILARITIES = ("cka", "cosine")
# Tokens outside the teacher's top k whose logits estimate a trial's mass in the rest: one
# fixed random sample, the same for every trial and position.
TAIL_SAMPLE = 1024


class Objective:
    """How a trial is scored: ``on_batch(runner, batch, state)`` turns a calibration batch's
    last hidden state into a statistic, which the runner memoises per trial and batch (so
    objectives are frozen dataclasses, part of the key); ``reduce(runner, layers, parts)``
    turns the statistics into the score; ``reference(runner, batch)`` is what the base
    model gives on a batch (computed once, see ``TrialRunner.prepare``)."""

    per_batch = True  # False: the score needs no hidden states, only ``reduce`` runs


@dataclass(frozen=True)
class Logits(Objective):
    """A weighted sum of ``kl``, ``loss`` and ``lm_eval`` (lower is better)."""

    weights: tuple[tuple[str, float], ...] = (("kl", 1.0),)
    lm_eval: tuple[tuple[str, ...], int] | None = None  # (tasks, sample limit)
    # Score the token objectives on this many evenly spaced positions of each window, the
    # same for every trial (None: all): the LM head and the vocabulary-wide sums then cost
    # that share of a full pass.
    positions: int | None = None
    # Score the KL on the teacher's top_k tokens and one bucket for all others (None: on the
    # whole vocabulary): the LM head then computes top_k + TAIL_SAMPLE logits per position.
    top_k: int | None = None

    @classmethod
    def parse(
        cls,
        spec: str | dict[str, float],
        lm_eval: dict | None = None,
        positions: int | None = None,
        top_k: int | None = None,
    ) -> Logits:
        """``"kl"``, ``"kl+0.5*loss"`` or ``{"kl": 1, "loss": 0.5}``; ``lm_eval``:
        ``{"tasks": [...], "limit": N}`` for the ``lm_eval`` term; ``positions`` and
        ``top_k``: see the fields."""
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
                f"unknown objective {', '.join(unknown) or spec!r}; "
                f"choose from {', '.join(OBJECTIVES)}"
            )
        tasks = None
        if "lm_eval" in weights:
            settings = lm_eval or {}
            if not settings.get("tasks"):
                raise MethodError(
                    "the lm_eval objective needs tasks, e.g. lm_eval={'tasks': [...]}"
                )
            tasks = (tuple(settings["tasks"]), int(settings.get("limit", 100)))
        if positions is not None and positions < 1:
            raise MethodError(f"positions must be at least 1, got {positions}")
        if top_k is not None and (top_k < 1 or "loss" in weights):
            raise MethodError(
                f"top_k {top_k}: must be at least 1, and approximates the kl term only "
                "(the loss needs every logit of the target's softmax)"
            )
        return cls(tuple(weights.items()), tasks, positions, top_k)

    @property
    def tokens(self) -> list[str]:
        return [name for name, _ in self.weights if name in TOKEN_OBJECTIVES]

    @property
    def per_batch(self) -> bool:
        return bool(self.tokens)

    def scored(self, length: int) -> torch.Tensor | None:
        """The positions scored in a window of ``length`` tokens (None: all of them)."""
        if self.positions is None or self.positions >= length - 1:
            return None
        return torch.linspace(0, length - 2, self.positions).round().long().unique()

    def reference(self, runner, batch: int) -> Teacher | None:
        if "kl" not in self.tokens:
            return None
        at = self.scored(runner.traces[batch].input_ids.shape[1])
        name = ("teacher", self.positions, self.top_k)
        if self.top_k:
            make = lambda t: TopKTeacher.of(runner.stack, t, at, self.top_k)  # noqa: E731
        else:
            make = lambda t: Teacher.of(runner.stack, t, at)  # noqa: E731
        return runner.reference(name, batch, make)

    def on_batch(self, runner, batch: int, state: torch.Tensor) -> dict:
        trace = runner.traces[batch]
        at = self.scored(trace.input_ids.shape[1])
        teacher = self.reference(runner, batch)
        if self.top_k:
            return {"kl": top_k_kl(runner.stack, state, teacher, at)}
        return token_sums(self.tokens, runner.stack, state, trace, teacher, at)

    def reduce(self, runner, layers: tuple, parts: list) -> float:
        value = 0.0
        for name, weight in self.weights:
            if name == "lm_eval":
                tasks, limit = self.lm_eval
                part = runner.memo(
                    ("lm_eval", self.lm_eval, layers),
                    lambda: lm_eval_error(runner.recipe(layers), tasks, limit),
                )
            else:
                part = sum(p[name][0] for p in parts) / sum(p[name][1] for p in parts)
                if not math.isfinite(part):
                    raise MethodError(
                        f"objective {name} is {part}: the trial's logits are not finite"
                    )
            value += weight * part
        return value


@dataclass(frozen=True)
class FinalStates(Objective):
    """Similarity of the trial's final hidden states (after the final norm) to the base
    model's: minibatch linear CKA over all tokens, or their mean cosine."""

    kind: str = "cka"
    kernel: str = "linear"
    skip_sinks: bool = False  # leave the attention-sink tokens out (Activations.sinks)

    def reference(self, runner, batch: int) -> torch.Tensor:
        return runner.reference("final", batch, lambda t: runner.stack.final(t.states[-1]))

    def on_batch(self, runner, batch: int, state: torch.Tensor):
        d = state.shape[-1]
        out = runner.stack.final(state).reshape(-1, d)  # (B*T, d)
        ref = self.reference(runner, batch).reshape(-1, d)
        if self.skip_sinks:
            keep = ~runner.activations.sinks()[batch].to(out.device)
            out, ref = out[keep], ref[keep]
        if self.kind == "cosine":
            cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
            return float(cos.sum()), cos.numel()
        return list(hsic_minibatches(torch.stack([out, ref]), self.kernel))  # (2, B*T, d)

    def reduce(self, runner, layers: tuple, parts: list) -> float:
        if self.kind == "cosine":
            return sum(total for total, _ in parts) / sum(count for _, count in parts)
        value = float(cka_from_hsic(h for part in parts for h in part)[0, 1])
        if value != value:
            raise MethodError("CKA of the trial model is NaN: its hidden states are not finite")
        return value


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
    def of(cls, stack: DecoderStack, trace: Trace, at: torch.Tensor | None = None) -> Teacher:
        # In float64: a float32 log-softmax shifts every entry by the rounding error of
        # its log-sum-exp, which moves the mass by ~1e-6, times lse(z) on every token.
        state = trace.states[-1] if at is None else trace.states[-1][:, at]
        logp = torch.log_softmax(stack.logits(state).double(), dim=-1)
        probs = logp.exp()
        return cls(probs.float(), (probs * logp).sum(-1), probs.sum(-1))


@dataclass
class TopKTeacher:
    """The base model's next-token distribution on one batch, reduced for a cheap KL: its
    ``k`` likeliest tokens per position (``ids``, ``probs``) and the rest as one bucket
    (``tail``: its mass). A trial's mass in that bucket is estimated from the logits of a
    fixed random sample of tokens (``sample``), each standing for ``weight`` tokens (0 where
    it is among the position's top k). The KL between the bucketed distributions is at most
    the full KL (merging outcomes loses information) and equals it when the top k hold all
    the mass. A trial's head computes only the logits of ``tokens``, the tokens any position
    needs (a few thousand of SmolLM2's 49k, where one shared matrix product is cheaper
    than gathering weight rows per position).
    """

    tokens: torch.Tensor  # (U,) int64: the top-k tokens of every position and the sample
    ids: torch.Tensor  # (B, T, k) int64: each position's top k, as indices into ``tokens``
    probs: torch.Tensor  # (B, T, k) float64
    tail: torch.Tensor  # (B, T) float64
    neg_entropy: torch.Tensor  # (B, T) float64, of the bucketed distribution
    mass: torch.Tensor  # (B, T) float64: sum of probs and tail (1 up to rounding)
    sample: torch.Tensor  # (m,) int64: the sample, as indices into ``tokens``
    weight: torch.Tensor  # (B, T, m) float64

    @classmethod
    @torch.no_grad()
    def of(cls, stack: DecoderStack, trace: Trace, at: torch.Tensor | None, k: int):
        state = trace.states[-1] if at is None else trace.states[-1][:, at]
        logp = torch.log_softmax(stack.logits(state).double(), dim=-1)
        vocab = logp.shape[-1]
        top, ids = logp.topk(min(k, vocab), dim=-1)
        probs = top.exp()
        tail = (1 - probs.sum(-1)).clamp_min(0)
        neg_entropy = (probs * top).sum(-1) + torch.xlogy(tail, tail)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(vocab, generator=generator)[: min(TAIL_SAMPLE, vocab)]
        sample = sample.to(ids.device)
        in_top = (ids.unsqueeze(-1) == sample).any(-2)  # (B, T, m)
        others = (~in_top).sum(-1, keepdim=True).clamp_min(1)
        weight = (~in_top).double() * (vocab - ids.shape[-1]) / others
        tokens, at = torch.cat([ids.reshape(-1), sample]).unique(return_inverse=True)
        top_at, sample_at = at[: ids.numel()].reshape(ids.shape), at[ids.numel() :]
        mass = probs.sum(-1) + tail
        return cls(tokens, top_at, probs, tail, neg_entropy, mass, sample_at, weight)


@torch.no_grad()
def top_k_kl(
    stack: DecoderStack, state: torch.Tensor, teacher: TopKTeacher, at: torch.Tensor | None
) -> tuple[float, int]:
    """(sum over tokens, token count) of the bucketed KL(base || trial) on one batch."""
    hidden = state if at is None else state[:, at]
    logits = stack.token_logits(hidden, teacher.tokens).double()  # (B, T, U)
    top = logits.gather(-1, teacher.ids)  # (B, T, k)
    rest = logits[..., teacher.sample]  # (B, T, m)
    shift = torch.maximum(top.amax(-1), rest.amax(-1)).unsqueeze(-1)
    top, rest = top - shift, rest - shift
    tail = (rest.exp() * teacher.weight).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    log_z = (top.exp().sum(-1) + tail).log()
    # KL = sum_S p (log p - log q) + p_T (log p_T - log q_T), log q = z - log Z.
    per_token = (
        teacher.neg_entropy
        - (teacher.probs * top).sum(-1)
        - teacher.tail * tail.log()
        + teacher.mass * log_z
    )
    return float(per_token.sum()), per_token.numel()


@torch.no_grad()
def token_sums(
    names: Sequence[str],
    stack: DecoderStack,
    state: torch.Tensor,
    trace: Trace,
    teacher: Teacher,
    at: torch.Tensor | None = None,
) -> dict[str, tuple[float, int]]:
    """For each token objective in ``names``: (sum over tokens, token count) on one batch,
    at positions ``at`` of each window (None: every position; each must have a next token).

    One pass of the LM head serves them all. The logits are worked on in place (they
    are ``stack.logits``' fresh output): at a 49k vocabulary every ``(B, T, V)`` pass
    costs about as much as a decoder layer.
    """
    for name in names:
        if name not in TOKEN_OBJECTIVES:
            raise MethodError(f"unknown token objective {name!r}")
    z = stack.logits(state if at is None else state[:, at]).float()  # (B, T, V)
    # Shift each token's logits by their max (KL and loss do not change): the sums below
    # then stay near zero, where float32 keeps the digits a logit of ~20 would lose.
    z.sub_(z.amax(dim=-1, keepdim=True))
    cross = (teacher.probs * z).sum(-1).double() if "kl" in names else None
    scored = slice(None, -1) if at is None else slice(None)  # positions with a next token
    targets = (trace.input_ids[:, 1:] if at is None else trace.input_ids[:, at + 1]).unsqueeze(-1)
    picked = z[:, scored].gather(-1, targets).squeeze(-1).double() if "loss" in names else None
    lse = z.exp_().sum(-1).log().double()  # (B, T); z is spent
    per_token = {}
    if "kl" in names:
        per_token["kl"] = teacher.neg_entropy - cross + teacher.mass * lse
    if "loss" in names:
        per_token["loss"] = lse[:, scored] - picked
    return {n: (float(per_token[n].sum()), per_token[n].numel()) for n in names}


def lm_eval_error(recipe, tasks: Sequence[str], limit: int) -> float:
    """1 - the mean primary metric of lm-eval ``tasks`` (at most ``limit`` documents each)."""
    from transformers import AutoTokenizer

    from tailorkit.assembly import assemble
    from tailorkit.eval.tasks import run_tasks

    plan = recipe.plan()
    model = assemble(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.base.path)
    results = run_tasks(model, tokenizer, list(tasks), limit=limit)
    scores = [row[row["metric"]] for row in results.values() if row.get("metric")]
    if not scores:
        raise MethodError(f"lm-eval returned no metric for {', '.join(tasks)}")
    return 1.0 - sum(scores) / len(scores)
