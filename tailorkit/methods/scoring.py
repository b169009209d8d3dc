"""Score a modified model against the original on the calibration batch, cheaply.

Sliding Layer Merging and LaCo modify the network from the top down, so every
model they try is the original up to some layer ``start`` and a short list of
(fused or kept) layers above it. The scorer starts each trial from the
recorded hidden state at ``start`` instead of running the unchanged bottom,
substitutes merged parameters instead of copying the model, caches merged
layers by their exact spec, and memoises scores of plans it has seen (the
bisection on the threshold revisits many).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tailorkit.errors import MethodError
from tailorkit.methods import Context
from tailorkit.methods.common import Fused, fused_step
from tailorkit.similarity import cka_matrix

SIMILARITIES = ("cka", "cosine")


def check_threshold(threshold: float, similarity: str) -> None:
    low = 0.0 if similarity == "cka" else -1.0
    if not low <= threshold <= 1.0:
        raise MethodError(
            f"threshold {threshold} is outside [{low:g}, 1], the range of {similarity} similarity"
        )


class SuffixScorer:
    """Similarity of ``original[:start] + plan_above`` to the original model's final states."""

    def __init__(self, ctx: Context, similarity: str = "cka", kernel: str = "linear"):
        if similarity not in SIMILARITIES:
            raise MethodError(
                f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}"
            )
        self.ctx = ctx
        self.similarity = similarity
        self.kernel = kernel
        self.stack = ctx.stack
        self.traces = ctx.activations.traces
        self.dtype = next(self.stack.model.parameters()).dtype
        self.reference = [self.stack.final(t.states[-1]) for t in self.traces]
        self.steps: dict[Fused, object] = {}
        self.memo: dict[tuple[int, tuple[Fused, ...]], float] = {}
        self.layer_forwards = 0
        self.trials = 0
        self.hits = 0

    def score(self, start: int, above: Sequence[Fused]) -> float:
        above = tuple(above)
        key = (start, above)
        if key in self.memo:
            self.hits += 1
            return self.memo[key]
        steps = [fused_step(self.stack, f, self.dtype, self.steps) for f in above]
        outputs = []
        for trace in self.traces:
            state = self.stack.run(trace.states[start], steps, trace)
            outputs.append(self.stack.final(state))
        self.layer_forwards += len(steps) * len(self.traces)
        self.trials += 1
        value = self._similarity(outputs)
        self.memo[key] = value
        return value

    def _similarity(self, outputs: list[torch.Tensor]) -> float:
        if self.similarity == "cosine":
            total, count = 0.0, 0
            for out, ref in zip(outputs, self.reference):
                cos = torch.nn.functional.cosine_similarity(
                    out.reshape(-1, out.shape[-1]).double(),
                    ref.reshape(-1, ref.shape[-1]).double(),
                    dim=-1,
                )
                total += float(cos.sum())
                count += cos.numel()
            return total / count
        pairs = (
            torch.stack([out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])])
            for out, ref in zip(outputs, self.reference)
        )  # each (2, B*T, d)
        value = float(cka_matrix(pairs, kernel=self.kernel)[0, 1])
        if value != value:
            raise MethodError("CKA of the trial model is NaN: its hidden states are not finite")
        return value

    def stats(self) -> dict:
        return {
            "trials": self.trials,
            "memo_hits": self.hits,
            "memo_entries": len(self.memo),
            "merged_layers_cached": len(self.steps),
            "layer_forwards": self.layer_forwards,
        }
