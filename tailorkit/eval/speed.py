"""Inference speed: prefill and decode tokens per second with plain transformers.

    from tailorkit.eval.speed import measure_speed, measure_speeds, speed_ratio
    s = measure_speed(model)                         # one model
    dense, pruned = measure_speeds([dense_model, pruned_model])   # alternating
    speed_ratio(dense, pruned)                       # {"prefill": 1.31, "decode": 1.28}

One measurement is one generation as an application would run it: the prompt through
the model once (prefill, ``use_cache=True``, logits of the last position only where
the model supports ``logits_to_keep``), then ``new_tokens`` greedy steps, each feeding
one token with the key/value cache of the steps before (decode).  The loop calls
``model(...)`` directly, so no generation config, stopping criterion or logits
processor of the checkpoint changes what is timed.

**Fixed token ids.** The prompt is drawn uniformly below the vocabulary size from a
seeded generator, so every model, every repeat and every run sees the same ids: speed
does not depend on what the ids say (no early stop, every step runs), and a comparison
is never between two different inputs.  No tokenizer is needed.

**Median.** The reported time is the median over ``repeats`` runs after ``warmup``
untimed ones (the first runs pay for allocator growth, kernel selection and cold
caches).  A busy neighbour, a page fault or a frequency change slows one run a lot
and never speeds one up; the median ignores a minority of such runs where a mean
would carry them.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tailorkit.errors import EvalError
from tailorkit.eval.perplexity import max_context

DEFAULT_SEED = 0


@dataclass
class SpeedResult:
    """Speed of one model.  ``prefill_tokens_per_s``: prompt tokens processed per second
    (all sequences of the batch); ``decode_tokens_per_s``: new tokens per second during
    decoding (all sequences); ``prefill_ms``: one prefill, milliseconds;
    ``decode_ms_per_token``: one decode step (one new token for each sequence),
    milliseconds.  ``device``, ``dtype``, ``threads`` (torch's CPU threads) say where it
    ran; ``settings`` holds the sizes; ``prefill_runs_ms`` / ``decode_runs_ms`` every
    timed run, for a look at the noise."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_ms: float
    decode_ms_per_token: float
    device: str
    dtype: str
    threads: int
    settings: dict[str, Any] = field(default_factory=dict)
    prefill_runs_ms: list[float] = field(default_factory=list)
    decode_runs_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedResult:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class GreedyRun:
    """One timed generation: seconds of the prefill and of all decode steps, the greedy
    tokens, (B, new_tokens), and with ``keep_logits`` the logits that chose each of them,
    (B, new_tokens, V): the prefill's last position, then one per decode step but the last."""

    prefill_s: float
    decode_s: float
    tokens: torch.Tensor
    logits: torch.Tensor | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vocab_size(model) -> int:
    """The number of token ids the model takes: its embedding's rows, or the config's
    ``vocab_size`` if that is smaller."""
    rows = model.get_input_embeddings().num_embeddings
    stated = getattr(model.config, "vocab_size", None)
    return min(rows, stated) if isinstance(stated, int) and stated > 0 else rows


def prompt_ids(
    model, prompt_tokens: int, batch_size: int = 1, seed: int = DEFAULT_SEED
) -> torch.Tensor:
    """(batch_size, prompt_tokens) token ids, uniform below the model's vocabulary, from a
    CPU generator seeded with ``seed`` (the same ids on every machine and device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size(model), (batch_size, prompt_tokens), generator=gen)


@torch.inference_mode()
def timed_greedy(
    model, input_ids: torch.Tensor, new_tokens: int, *, keep_logits: bool = False
) -> GreedyRun:
    """Prefill ``input_ids`` (B, T) with ``use_cache=True``, then ``new_tokens`` greedy
    steps of one token each on the returned cache; each phase timed on its own (CUDA
    synchronised at both ends).  ``keep_logits`` keeps the logits of every chosen token
    (for tests: they must equal a full forward's at the same positions)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    params = inspect.signature(model.forward).parameters
    keep = "logits_to_keep" in params
    # transformers 5.x names the key/value cache ``cache``; 4.x ``past_key_values``.
    cache = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if keep and not keep_logits else {}
    kept = []

    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **extra)
    last = out.logits[:, -1, :]  # (B, V)
    token = last.argmax(dim=-1, keepdim=True)  # (B, 1)
    _sync(device)
    prefill_s = time.perf_counter() - start

    past = getattr(out, cache)
    tokens = [token]
    if keep_logits:
        kept.append(last.float())
    start = time.perf_counter()
    for step in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache: past})
        past = getattr(out, cache)
        if step + 1 < new_tokens:  # the last step only extends the cache
            last = out.logits[:, -1, :]  # (B, V)
            token = last.argmax(dim=-1, keepdim=True)  # (B, 1)
            tokens.append(token)
            if keep_logits:
                kept.append(last.float())
    _sync(device)
    decode_s = time.perf_counter() - start
    return GreedyRun(
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens=torch.cat(tokens, dim=1).cpu(),  # (B, new_tokens)
        logits=torch.stack(kept, dim=1).cpu() if keep_logits else None,  # (B, new, V)
    )


def check_settings(
    model,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int = 1,
    repeats: int = 1,
    warmup: int = 0,
) -> None:
    """Raise EvalError for a size below its minimum, or a prompt plus new tokens longer than
    the model's positions (before any time is spent)."""
    for name, value, least in (
        ("prompt_tokens", prompt_tokens, 1),
        ("new_tokens", new_tokens, 1),
        ("batch_size", batch_size, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or value < least:
            raise EvalError(f"speed: {name} must be a whole number >= {least}, got {value!r}")
    limit = max_context(model.config)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise EvalError(
            f"speed: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is longer than "
            f"the model takes ({limit} positions); use fewer (--speed-prompt-tokens, "
            "--speed-new-tokens)"
        )


def measure_speeds(
    models: list,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = DEFAULT_SEED,
) -> list[SpeedResult]:
    """The speed of several models, measured in turn within every repeat (A, B, A, B, ...),
    so that a slow spell of the machine falls on all of them rather than on one.  All see
    the same prompt ids (the same ``seed``).  See :func:`measure_speed`."""
    for model in models:
        check_settings(model, prompt_tokens, new_tokens, batch_size, repeats, warmup)
    prompts = [prompt_ids(m, prompt_tokens, batch_size, seed) for m in models]
    modes = [m.training for m in models]
    runs: list[list[GreedyRun]] = [[] for _ in models]
    try:
        for m in models:
            m.eval()
        for i in range(warmup + repeats):
            for k, m in enumerate(models):
                run = timed_greedy(m, prompts[k], new_tokens)
                if i >= warmup:
                    runs[k].append(run)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

    settings = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
    }
    results = []
    for m, timed in zip(models, runs):
        prefill = statistics.median(r.prefill_s for r in timed)
        decode = statistics.median(r.decode_s for r in timed)
        param = next(m.parameters())
        results.append(
            SpeedResult(
                prefill_tokens_per_s=batch_size * prompt_tokens / prefill,
                decode_tokens_per_s=batch_size * new_tokens / decode,
                prefill_ms=1000 * prefill,
                decode_ms_per_token=1000 * decode / new_tokens,
                device=str(param.device),
                dtype=str(param.dtype).removeprefix("torch."),
                threads=torch.get_num_threads(),
                settings=dict(settings),
                prefill_runs_ms=[1000 * r.prefill_s for r in timed],
                decode_runs_ms=[1000 * r.decode_s for r in timed],
            )
        )
    return results


def measure_speed(
    model,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = DEFAULT_SEED,
) -> SpeedResult:
    """Prefill and decode speed of a transformers causal LM, where it lies (device, dtype).

    Prefill: one forward of (``batch_size``, ``prompt_tokens``) seeded random token ids
    with ``use_cache=True``.  Decode: ``new_tokens`` greedy steps, one token each, on the
    prefill's key/value cache.  Each is timed on its own under ``torch.inference_mode``
    (CUDA synchronised around it); the median of ``repeats`` runs after ``warmup``
    untimed ones is reported (the module docstring says why the median and why fixed
    ids).  Raises EvalError for sizes below 1 or longer than the model's positions.
    """
    return measure_speeds(
        [model],
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch_size=batch_size,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
    )[0]


def _tokens_per_s(result: SpeedResult | dict[str, Any], key: str) -> float | None:
    value = getattr(result, key, None) if isinstance(result, SpeedResult) else result.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def speed_ratio(
    dense: SpeedResult | dict[str, Any], pruned: SpeedResult | dict[str, Any]
) -> dict[str, float | None]:
    """Speed-ups of ``pruned`` over ``dense``: ``{"prefill": x, "decode": y}``, each the
    pruned model's tokens/s divided by the dense model's (above 1 is faster); None where
    a figure is missing.  Takes SpeedResults or their ``to_dict()``."""
    out: dict[str, float | None] = {}
    for phase in ("prefill", "decode"):
        d = _tokens_per_s(dense, f"{phase}_tokens_per_s")
        p = _tokens_per_s(pruned, f"{phase}_tokens_per_s")
        out[phase] = p / d if d and p is not None else None
    return out
