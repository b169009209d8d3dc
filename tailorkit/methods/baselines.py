"""The baselines Sliding Layer Merging is measured against, each a few dozen lines.

* ``shortgpt`` (Men et al. 2024): drop the layers with the lowest Block Influence.
* ``angular`` (Gromov et al. 2024): drop the contiguous block whose input and
  output hidden states are closest in angle; the last layer is kept.
* ``laco`` (Yang et al. 2024): from the top down, fold ``fold`` consecutive layers
  into one (theta_l + sum_k (theta_{l+k} - theta_l)) when the folded model's final
  hidden states stay ``threshold``-similar (cosine) to the original's; move down
  ``interval`` layers after a fold, one after a refusal.
"""

from __future__ import annotations

from tailorkit.errors import MethodError
from tailorkit.methods import Context, MethodResult, register
from tailorkit.methods.common import Fused, plan_recipe, removal_budget
from tailorkit.methods.scoring import SuffixScorer, check_threshold
from tailorkit.similarity import angular_distance, block_influence

LACO_BISECTION_STEPS = 10


@register("shortgpt")
def shortgpt(ctx: Context, *, target_ratio: float) -> MethodResult:
    n = ctx.stack.num_layers
    budget = removal_budget(ctx.source, target_ratio, n - 1)
    influence = block_influence(ctx.activations.boundaries())
    dropped = sorted(influence.argsort()[:budget].tolist())
    plan = [Fused.keep(i) for i in range(n) if i not in dropped]
    report = {
        "method": "shortgpt",
        "settings": {"target_ratio": target_ratio},
        "block_influence": [round(float(x), 6) for x in influence],
        "dropped_layers": dropped,
    }
    return MethodResult(plan_recipe(ctx.base, plan), report)


@register("angular")
def angular(ctx: Context, *, target_ratio: float) -> MethodResult:
    n = ctx.stack.num_layers
    span = removal_budget(ctx.source, target_ratio, n - 1)
    distance = angular_distance(ctx.activations.boundaries(), span)  # (n - span + 1,)
    starts = distance[: n - span]  # blocks that end before the last layer
    start = int(starts.argmin())
    plan = [Fused.keep(i) for i in range(n) if not start <= i < start + span]
    report = {
        "method": "angular",
        "settings": {"target_ratio": target_ratio},
        "angular_distance": [round(float(x), 6) for x in distance],
        "dropped_layers": list(range(start, start + span)),
    }
    return MethodResult(plan_recipe(ctx.base, plan), report)


def laco_pass(
    scorer: SuffixScorer,
    num_layers: int,
    threshold: float,
    max_removed: int,
    fold: int,
    interval: int,
    lowest: int,
):
    """One top-down LaCo pass; returns (plan, folds)."""
    plan = [Fused.keep(i) for i in range(num_layers)]
    folds = []
    removed = 0
    at = num_layers - fold - 1  # the last layer is never folded
    while at >= lowest and removed < max_removed:
        width = min(fold, max_removed - removed + 1, len(plan) - 1 - at)
        merged = plan[at].combine(plan[at + 1 : at + width])
        trial = [merged, *plan[at + width :]]
        # Everything below `at` is still the original model, so position == source index.
        value = scorer.score(at, trial)
        if value >= threshold:
            plan[at : at + width] = [merged]
            removed += width - 1
            folds.append({"at": at, "layers": list(merged.layers), "similarity": value})
            at -= interval
        else:
            at -= 1
    return plan, folds


@register("laco")
def laco(
    ctx: Context,
    *,
    target_ratio: float | None = None,
    threshold: float | None = None,
    fold: int = 4,
    interval: int = 2,
    lowest: int = 1,
) -> MethodResult:
    n = ctx.stack.num_layers
    if (target_ratio is None) == (threshold is None):
        raise MethodError("laco takes either target_ratio or threshold (exactly one)")
    if fold < 2 or interval < 1 or not 0 <= lowest < n - 1:
        raise MethodError(
            f"laco needs fold >= 2, interval >= 1 and 0 <= lowest < {n - 1}; "
            f"got fold={fold}, interval={interval}, lowest={lowest}"
        )
    scorer = SuffixScorer(ctx, "cosine")
    max_removable = n - 1 - lowest - 1
    if threshold is not None:
        check_threshold(threshold, "cosine")
        plan, folds = laco_pass(scorer, n, threshold, max_removable, fold, interval, lowest)
    else:
        budget = removal_budget(ctx.source, target_ratio, max_removable)

        def run(t):
            return laco_pass(scorer, n, t, budget, fold, interval, lowest)

        plan, folds = run(-1.0)
        if n - len(plan) < budget:
            raise MethodError(
                f"laco with fold={fold}, interval={interval}, lowest={lowest} removes at most "
                f"{n - len(plan)} layers, fewer than the {budget} asked for; lower `lowest` "
                "or `interval`, or raise `fold`"
            )
        lo, hi = -1.0, 1.0
        for _ in range(LACO_BISECTION_STEPS):
            mid = (lo + hi) / 2
            trial = run(mid)
            if n - len(trial[0]) >= budget:
                lo, (plan, folds) = mid, trial
            else:
                hi = mid
        threshold = lo
    report = {
        "method": "laco",
        "settings": {
            "threshold": threshold,
            "target_ratio": target_ratio,
            "fold": fold,
            "interval": interval,
            "lowest": lowest,
        },
        "folds": folds,
        "scorer": scorer.stats(),
    }
    return MethodResult(plan_recipe(ctx.base, plan), report)
