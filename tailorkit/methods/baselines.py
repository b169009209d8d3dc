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

from pydantic import Field, model_validator

from tailorkit import citations
from tailorkit.errors import MethodError
from tailorkit.methods.common import check_target, combine, largest_threshold, removal_budget
from tailorkit.methods.registry import Context, MethodResult, Settings, register
from tailorkit.objectives import FinalStates
from tailorkit.similarity import angular_distance, block_influence
from tailorkit.trials import TrialRunner, keep


class RemovalSettings(Settings):
    flags = ("target_ratio", "skip_sinks")

    target_ratio: float = Field(gt=0, lt=1, description=Settings.TARGET_RATIO)
    skip_sinks: bool = Field(False, description=Settings.SKIP_SINKS)


@register(
    "shortgpt",
    settings=RemovalSettings,
    summary="drop the layers with the lowest Block Influence, 1 - cos(input, output)",
    label="ShortGPT (Men et al., 2024, arXiv:2403.03853)",
    description="The layers with the lowest Block Influence (1 - cos(input, output) of the "
    "layer on calibration text) are removed.",
    citation=citations.SHORTGPT,
)
def shortgpt(ctx: Context, settings: RemovalSettings) -> MethodResult:
    n = ctx.runner.num_layers
    budget = removal_budget(ctx.runner.base, settings.target_ratio, n - 1)
    influence = block_influence(ctx.runner.activations.boundaries(settings.skip_sinks))
    dropped = sorted(influence.argsort()[:budget].tolist())
    return _removal(ctx, dropped, block_influence=influence)


@register(
    "angular",
    settings=RemovalSettings,
    summary="drop the contiguous block whose input and output are closest in angle",
    label="angular distance (Gromov et al., 2024, arXiv:2403.17887)",
    description="The contiguous block of layers whose input and output are closest in angular "
    "distance on calibration text is removed.",
    citation=citations.ANGULAR,
)
def angular(ctx: Context, settings: RemovalSettings) -> MethodResult:
    n = ctx.runner.num_layers
    span = removal_budget(ctx.runner.base, settings.target_ratio, n - 1)
    boundaries = ctx.runner.activations.boundaries(settings.skip_sinks)
    distance = angular_distance(boundaries, span)  # (n - span + 1,)
    starts = distance[: n - span]  # blocks that end before the last layer
    start = int(starts.argmin())
    return _removal(ctx, list(range(start, start + span)), angular_distance=distance)


def _removal(ctx: Context, dropped: list[int], **figures) -> MethodResult:
    """The base without layers ``dropped``, with the per-layer ``figures`` that chose them."""
    plan = [keep(i) for i in range(ctx.runner.num_layers) if i not in dropped]
    report = {k: [round(float(x), 6) for x in v] for k, v in figures.items()}
    return MethodResult(ctx.recipe(plan), {**report, "dropped_layers": dropped})


class LacoSettings(Settings):
    flags = ("target_ratio", "threshold")

    target_ratio: float | None = Field(None, gt=0, lt=1, description=Settings.TARGET_RATIO)
    threshold: float | None = Field(None, description=Settings.THRESHOLD)
    fold: int = Field(4, ge=2, description="layers folded into one at a time")
    interval: int = Field(2, ge=1, description="layers to move down after a fold")
    lowest: int = Field(1, ge=0, description="the lowest layer a fold may start at")

    @model_validator(mode="after")
    def _target(self) -> LacoSettings:
        check_target("laco", self.target_ratio, self.threshold, "cosine")
        return self


def laco_pass(runner: TrialRunner, threshold: float, max_removed: int, settings: LacoSettings):
    """One top-down LaCo pass; returns (plan, folds)."""
    num_layers = runner.num_layers
    objective = FinalStates("cosine")
    plan = [keep(i) for i in range(num_layers)]
    folds = []
    removed = 0
    at = num_layers - settings.fold - 1  # the last layer is never folded
    while at >= settings.lowest and removed < max_removed:
        width = min(settings.fold, max_removed - removed + 1, len(plan) - 1 - at)
        merged = combine(plan[at], plan[at + 1 : at + width])
        # Everything below `at` is still the original model, so position == source index.
        value = runner.score([*plan[:at], merged, *plan[at + width :]], objective)
        if value >= threshold:
            plan[at : at + width] = [merged]
            removed += width - 1
            folds.append({"at": at, "layers": [i for _, i in merged.sources], "similarity": value})
            at -= settings.interval
        else:
            at -= 1
    return plan, folds


@register(
    "laco",
    settings=LacoSettings,
    summary="LaCo: fold runs of layers into one while the output stays cosine-similar",
    label="LaCo (Yang et al., 2024, arXiv:2402.11187)",
    description="Consecutive layers are folded into one: theta_l + sum_k (theta_(l+k) - theta_l).",
    citation=citations.LACO,
)
def laco(ctx: Context, settings: LacoSettings) -> MethodResult:
    n, runner = ctx.runner.num_layers, ctx.runner
    if settings.lowest >= n - 1:
        raise MethodError(f"laco needs lowest < {n - 1}; got lowest={settings.lowest}")
    max_removable = n - 1 - settings.lowest - 1
    threshold = settings.threshold
    if threshold is not None:
        plan, folds = laco_pass(runner, threshold, max_removable, settings)
    else:
        budget = removal_budget(ctx.runner.base, settings.target_ratio, max_removable)

        def run(t):
            plan, folds = laco_pass(runner, t, budget, settings)
            return n - len(plan), (plan, folds)

        shortfall = (
            f"laco with fold={settings.fold}, interval={settings.interval}, "
            f"lowest={settings.lowest} removes at most {{removed}} layers, fewer than the "
            f"{budget} asked for; lower `lowest` or `interval`, or raise `fold`"
        )
        threshold, (plan, folds) = largest_threshold(run, budget, -1.0, -1.0, shortfall)
    report = {"settings": {"threshold": threshold}, "folds": folds, "runner": runner.cache_report()}
    return MethodResult(ctx.recipe(plan), report)
