"""Perplexity of a causal LM on text files, with sliding windows of a stated length.

The text is tokenized whole, preceded by one prefix token (the tokenizer's BOS, else
its EOS) so that its first token is scored too.  Windows of ``context_length`` tokens
start every ``stride`` tokens; each token is scored exactly once, in the first window
that contains it after the part already scored, so every token but those of the first
window sees at least ``context_length - stride`` tokens of context::

    tokens   p t1 t2 t3 t4 t5 t6 t7 t8 t9        (p = prefix, n = 10, C = 4, S = 2)
    window 0 [p  t1 t2 t3]                        scores t1 t2 t3
    window 1       [t2 t3 t4 t5]                  scores t4 t5
    window 2             [t4 t5 t6 t7]            scores t6 t7
    window 3                   [t6 t7 t8 t9]      scores t8 t9

A window must overlap the part already scored by at least one token (the model cannot
predict a window's first token), so ``stride`` is at most ``context_length - 1``: that
gives the cheapest, least-context number; a small stride approaches the model's
"full context" perplexity at a higher cost.
Negative log-likelihoods are summed in float64; log-softmax runs in float32.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tailorkit.errors import EvalError

DEFAULT_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the model; tokens ``[first, end)`` are scored."""

    begin: int
    end: int
    first: int

    @property
    def targets(self) -> int:
        return self.end - self.first


@dataclass
class Perplexity:
    """The perplexity of one text; ``nll`` is the mean negative log-likelihood in nats."""

    path: str
    perplexity: float
    nll: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    bits_per_byte: float  # tokenizer-independent: comparable across vocabularies
    context_length: int
    stride: int
    windows: int
    prefix_token: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n: int, context_length: int, stride: int) -> list[Window]:
    """The windows over ``n`` tokens (token 0 is the prefix: never scored)."""
    if context_length < 2:
        raise EvalError(f"context_length must be at least 2 tokens, got {context_length}")
    if not 1 <= stride < context_length:
        raise EvalError(
            f"stride must be between 1 and context_length - 1 ({context_length - 1}), "
            f"got {stride}: consecutive windows must overlap for every token to be scored"
        )
    windows: list[Window] = []
    scored_to, begin = 1, 0
    while True:
        end = min(begin + context_length, n)
        if end > scored_to:
            windows.append(Window(begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == n:
            return windows
        begin += stride


def max_context(config) -> int | None:
    """The longest sequence the model takes, from its config (None when not stated)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_context(model, context_length: int | None, stride: int | None) -> tuple[int, int]:
    """Default context: the model's maximum, at most 2048; default stride: half of it."""
    limit = max_context(model.config)
    if context_length is None:
        context_length = min(limit or DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_LENGTH)
    elif limit is not None and context_length > limit:
        raise EvalError(
            f"context_length {context_length} is longer than the model takes ({limit} positions)"
        )
    if stride is None:
        stride = max(1, context_length // 2)
    sliding_windows(context_length, context_length, stride)  # validates both
    return context_length, stride


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EvalError(f"{path}: no such text file") from None
    except IsADirectoryError:
        raise EvalError(f"{path}: is a directory; --ppl takes text files") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(
            f"{path}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); "
            "perplexity is measured on plain text files"
        ) from None
    if not text.strip():
        raise EvalError(f"{path}: the file is empty")
    return text


def tokenize(text: str, tokenizer) -> tuple[list[int], int | None]:
    """Token ids of ``text`` after the prefix token, and the prefix token (or None)."""
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    prefix = tokenizer.bos_token_id
    if prefix is None:
        prefix = tokenizer.eos_token_id
    return ([prefix] if prefix is not None else []) + ids, prefix


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, windows: list[Window], batch_size: int = 1) -> float:
    """Sum of the negative log-likelihoods (nats) of every scored token of ``windows``."""
    device = next(model.parameters()).device
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    total = 0.0
    # Windows of equal length batch together (all but the last are full).
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.end - w.begin, []).append(w)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            ids = torch.stack([tokens[w.begin : w.end] for w in batch]).to(device)  # (B, T)
            # Logits at position j predict token begin + j + 1: only the last `keep`
            # positions are needed, which saves the (B, T, vocab) tensor on long windows.
            keep = max(w.targets for w in batch) + 1
            kwargs = {"logits_to_keep": keep} if keep_ok else {}
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # (B, keep|T, V)
            logits = logits[:, -keep:]
            for row, w in enumerate(batch):
                pred = logits[row, keep - 1 - w.targets : keep - 1].float()  # (targets, V)
                target = ids[row, length - w.targets :]  # (targets,)
                total += F.cross_entropy(pred, target, reduction="sum").double().item()
    return total


def perplexity(
    model,
    tokenizer,
    path: str | Path,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
) -> Perplexity:
    """Perplexity of ``model`` on the text file ``path`` (sliding windows, see module doc).

    Raises EvalError when the file cannot be read, or holds fewer tokens than one window.
    """
    context_length, stride = resolve_context(model, context_length, stride)
    text = read_text(path)
    ids, prefix = tokenize(text, tokenizer)
    if len(ids) < context_length:
        raise EvalError(
            f"{path}: {len(ids)} tokens, shorter than one window of {context_length} tokens; "
            f"use a longer text or a smaller context length (--context-length {len(ids)} "
            "or less)"
        )
    windows = sliding_windows(len(ids), context_length, stride)
    model_was_training = model.training
    model.eval()
    try:
        nll = window_nll(model, torch.tensor(ids, dtype=torch.long), windows, batch_size)
    finally:
        model.train(model_was_training)
    scored = len(ids) - 1
    n_bytes = len(text.encode("utf-8"))
    return Perplexity(
        path=str(path),
        perplexity=math.exp(nll / scored),
        nll=nll / scored,
        tokens=scored,
        bytes=n_bytes,
        bits_per_byte=nll / math.log(2) / n_bytes,
        context_length=context_length,
        stride=stride,
        windows=len(windows),
        prefix_token=prefix,
    )
