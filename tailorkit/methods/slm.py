"""Sliding Layer Merging (Ding, Zhu, Zhang, Xie, 2025, arXiv 2502.19159).

From the top of the network downward: the window's top (the anchor) starts at
the second-to-last layer (the last layer is never merged); the window grows
one layer down at a time while the model with the window fused into one layer
stays at least ``threshold``-similar to the original on the calibration
batch; then the largest window that passed is fused and the next anchor is
the layer just below it. Similarity is linear CKA of the final hidden states
(or their mean cosine). Fusion is applied to every tensor of the layers, norms
included: ``laco`` (theta_l + sum_k (theta_{l+k} - theta_l)) or ``average``.

With ``target_ratio`` the number of layers to remove is fixed; merging stops
once it is reached (the last window is cut to fit), and the threshold is the
largest one that still reaches it, found by bisection.
"""

from __future__ import annotations

from tailorkit.errors import MethodError
from tailorkit.methods import Context, MethodResult, register
from tailorkit.methods.common import Fused, plan_recipe, removal_budget
from tailorkit.methods.scoring import SuffixScorer, check_threshold

BISECTION_STEPS = 10


def slide(scorer: SuffixScorer, num_layers: int, threshold: float, max_removed: int, fusion: str):
    """One pass of the sliding window; returns (plan, windows) with each window's score."""
    above = [Fused.keep(num_layers - 1)]
    windows = []
    anchor, removed = num_layers - 2, 0
    while anchor >= 0:
        bottom, best = anchor, None
        lo = anchor - 1
        while lo >= 0 and removed + (anchor - lo) <= max_removed:
            fused = Fused.fold(range(lo, anchor + 1), fusion)
            value = scorer.score(lo, (fused, *above))
            if value < threshold:
                break
            bottom, best = lo, value
            lo -= 1
        if bottom < anchor:
            above.insert(0, Fused.fold(range(bottom, anchor + 1), fusion))
            windows.append({"layers": [bottom, anchor], "similarity": best})
            removed += anchor - bottom
        else:
            above.insert(0, Fused.keep(anchor))
        anchor = bottom - 1
    return above, windows


@register("slm")
def sliding_layer_merging(
    ctx: Context,
    *,
    target_ratio: float | None = None,
    threshold: float | None = None,
    similarity: str = "cka",
    fusion: str = "laco",
) -> MethodResult:
    num_layers = ctx.stack.num_layers
    if (target_ratio is None) == (threshold is None):
        raise MethodError("slm takes either target_ratio or threshold (exactly one)")
    Fused.fold((0, 1), fusion)  # validates the fusion name before any work
    scorer = SuffixScorer(ctx, similarity)
    max_removable = num_layers - 2  # one fused layer below the never-merged last layer
    if threshold is not None:
        check_threshold(threshold, similarity)
        plan, windows = slide(scorer, num_layers, threshold, max_removable, fusion)
        chosen = threshold
    else:
        budget = removal_budget(ctx.source, target_ratio, max_removable)
        chosen, plan, windows = _bisect(scorer, num_layers, budget, fusion, similarity)
    recipe = plan_recipe(ctx.base, plan)
    report = {
        "method": "slm",
        "settings": {
            "similarity": similarity,
            "fusion": fusion,
            "threshold": chosen,
            "target_ratio": target_ratio,
        },
        "windows": windows,
        "scorer": scorer.stats(),
    }
    return MethodResult(recipe, report)


def _bisect(scorer: SuffixScorer, num_layers: int, budget: int, fusion: str, similarity: str):
    """The largest threshold whose sliding pass removes ``budget`` layers."""

    def run(t):
        plan, windows = slide(scorer, num_layers, t, budget, fusion)
        return num_layers - len(plan), plan, windows

    lo, hi = (0.0 if similarity == "cka" else -1.0), 1.0
    removed, plan, windows = run(float("-inf"))  # every window passes: the budget is reached
    if removed < budget:
        raise MethodError(f"slm could remove only {removed} of the {budget} layers asked for")
    best = (lo, plan, windows)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        removed, plan, windows = run(mid)
        if removed >= budget:
            lo, best = mid, (mid, plan, windows)
        else:
            hi = mid
    return best
