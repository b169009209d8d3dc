"""Sliding Layer Merging (Ding, Zhu, Zhang, Xie, 2025, arXiv 2502.19159).

From the top of the network downward: the window's top (the anchor) starts at
the second-to-last layer (the last layer is never merged); the window grows
one layer down at a time while the model with the window fused into one layer
stays at least ``threshold``-similar to the original on the calibration
batch; then the largest window that passed is fused and the next anchor is
the layer just below it. Similarity is linear CKA of the final hidden states
(or their mean cosine), without the attention-sink tokens unless ``keep_sinks`` (after
the final norm their massive activations no longer dominate: on SmolLM2 leaving them out
moves the similarities in the third decimal and chooses the same windows). Fusion is applied to every tensor of the layers, norms
included: ``laco`` (theta_l + sum_k (theta_{l+k} - theta_l)) or ``average``.

With ``target_ratio`` the number of layers to remove is fixed; merging stops
once it is reached (the last window is cut to fit), and the threshold is the
largest one that still reaches it, found by bisection.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tailorkit import citations
from tailorkit.methods.common import FUSIONS, check_target, fold, largest_threshold, removal_budget
from tailorkit.methods.registry import Context, MethodResult, Settings, register
from tailorkit.objectives import SIMILARITIES, FinalStates
from tailorkit.trials import TrialRunner, keep


class SLMSettings(Settings):
    flags = ("target_ratio", "threshold", "similarity", "fusion", "keep_sinks")

    target_ratio: float | None = Field(None, gt=0, lt=1, description=Settings.TARGET_RATIO)
    threshold: float | None = Field(None, description=Settings.THRESHOLD)
    similarity: Literal[SIMILARITIES] = Field(
        "cka", description="how final hidden states are compared: linear CKA or mean cosine"
    )
    fusion: Literal[FUSIONS] = Field(
        "laco", description="how a window's layers become one: LaCo's fold, or their average"
    )
    keep_sinks: bool = Field(False, description=Settings.KEEP_SINKS)

    @model_validator(mode="after")
    def _target(self) -> SLMSettings:
        check_target("slm", self.target_ratio, self.threshold, self.similarity)
        return self


def slide(runner: TrialRunner, objective: FinalStates, threshold, max_removed: int, fusion: str):
    """One pass of the sliding window; returns (plan, windows) with each window's score."""
    num_layers = runner.num_layers
    identity = [keep(i) for i in range(num_layers)]
    above = [keep(num_layers - 1)]
    windows = []
    anchor, removed = num_layers - 2, 0
    while anchor >= 0:
        bottom, best = anchor, None
        lo = anchor - 1
        while lo >= 0 and removed + (anchor - lo) <= max_removed:
            trial = [*identity[:lo], fold(range(lo, anchor + 1), fusion), *above]
            value = runner.score(trial, objective)
            if value < threshold:
                break
            bottom, best = lo, value
            lo -= 1
        if bottom < anchor:
            above.insert(0, fold(range(bottom, anchor + 1), fusion))
            windows.append({"layers": [bottom, anchor], "similarity": best})
            removed += anchor - bottom
        else:
            above.insert(0, keep(anchor))
        anchor = bottom - 1
    return above, windows


@register(
    "slm",
    settings=SLMSettings,
    summary="Sliding Layer Merging: fuse windows of similar layers, from the top down",
    label="Sliding Layer Merging (Ding et al., 2025, arXiv:2502.19159)",
    description="Layer outputs are compared with centered kernel alignment (CKA). From the top "
    "of the network downward, a window of consecutive layers grows while the model with that "
    "window fused into one layer stays above a similarity threshold; then the window is "
    "fused. No weights were retrained.",
    citation=citations.SLM,
)
def sliding_layer_merging(ctx: Context, settings: SLMSettings) -> MethodResult:
    runner = ctx.runner
    objective = FinalStates(settings.similarity, skip_sinks=not settings.keep_sinks)
    max_removable = runner.num_layers - 2  # one fused layer below the never-merged last layer
    if settings.threshold is not None:
        plan, windows = slide(runner, objective, settings.threshold, max_removable, settings.fusion)
        chosen = settings.threshold
    else:
        budget = removal_budget(ctx.runner.base, settings.target_ratio, max_removable)

        def run(t):
            plan, windows = slide(runner, objective, t, budget, settings.fusion)
            return runner.num_layers - len(plan), (plan, windows)

        low = 0.0 if settings.similarity == "cka" else -1.0
        shortfall = f"slm could remove only {{removed}} of the {budget} layers asked for"
        chosen, (plan, windows) = largest_threshold(run, budget, low, float("-inf"), shortfall)
    report = {
        "settings": {"threshold": chosen},
        "windows": windows,
        "runner": runner.cache_report(),
    }
    return MethodResult(ctx.recipe(plan), report)
