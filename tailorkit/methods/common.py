"""Shared by the single-model methods: the removal budget and plans of the base's layers.

A single-model plan is a list of output layers (``OutputLayer``), each made of source
layers of the base with affine weights summing to 1: one layer with weight 1 passes
through; ``theta_l + sum_k (theta_{l+k} - theta_l)`` over consecutive layers is LaCo's
fold (``laco``); anything else is a ``linear`` merge with explicit weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from tailorkit.checkpoint.source import Source
from tailorkit.errors import MethodError
from tailorkit.recipe import OutputLayer
from tailorkit.trials import BASE, keep

FUSIONS = ("laco", "average")
BISECTION_STEPS = 10


def fold(layers: Sequence[int], fusion: str = "laco") -> OutputLayer:
    """Fuse consecutive base layers into one: ``laco`` (theta_l + sum_k (theta_{l+k} -
    theta_l)) or ``average``."""
    sources = tuple((BASE, i) for i in layers)
    if fusion == "laco":
        return OutputLayer("laco", sources)
    return OutputLayer("linear", sources, (1.0 / len(sources),) * len(sources))


def coefficients(layer: OutputLayer) -> dict[int, float]:
    """The affine weight of each base layer in a single-model ``layer``."""
    depths = [i for _, i in layer.sources]
    if layer.method == "passthrough":
        return {depths[0]: 1.0}
    if layer.method == "laco":
        return dict(zip(depths, [2.0 - len(depths)] + [1.0] * (len(depths) - 1)))
    return dict(zip(depths, layer.weights))


def combine(layer: OutputLayer, above: Sequence[OutputLayer]) -> OutputLayer:
    """LaCo's fold of output ``layer`` with the output layers ``above`` it: their
    coefficients compose, layers whose weight cancels drop out."""
    total: dict[int, float] = {}
    for part, scale in [(layer, 2.0 - (len(above) + 1))] + [(a, 1.0) for a in above]:
        for depth, weight in coefficients(part).items():
            total[depth] = total.get(depth, 0.0) + scale * weight
    depths = sorted(d for d, w in total.items() if w != 0.0)
    weights = [total[d] for d in depths]
    if len(depths) == 1:
        return keep(depths[0])
    laco = [2.0 - len(depths)] + [1.0] * (len(depths) - 1)
    if depths == list(range(depths[0], depths[-1] + 1)) and weights == laco:
        return fold(depths)
    return OutputLayer("linear", tuple((BASE, d) for d in depths), tuple(weights))


def layer_fraction(source: Source) -> float:
    """The share of ``source``'s parameters one layer holds, on average."""
    counts = layer_parameter_counts(source)
    return sum(counts) / len(counts) / source.num_parameters()


def layer_parameter_counts(source: Source) -> list[int]:
    return [sum(t.numel for t in source.layer(i).values()) for i in range(source.num_layers)]


def removal_budget(source: Source, target_ratio: float, max_layers: int) -> int:
    """How many layers to remove so that ``target_ratio`` of the parameters go.

    The count whose parameter fraction is closest to the target; an error that lists
    the reachable ratios when no count between 1 and ``max_layers`` comes near.
    """
    per_layer = layer_fraction(source)
    layers = round(target_ratio / per_layer)
    lo, hi = per_layer, per_layer * max_layers
    if layers < 1 or layers > max_layers:
        raise MethodError(
            f"target_ratio {target_ratio:.3f} cannot be reached: each layer of "
            f"{source.name} holds {per_layer:.2%} of its parameters, so this method can "
            f"remove between {lo:.2%} (1 layer) and {hi:.2%} ({max_layers} layers), "
            f"in steps of {per_layer:.2%}"
        )
    return layers


def largest_threshold(run, budget: int, low: float, start: float, shortfall: str):
    """The largest threshold in [``low``, 1] whose pass removes ``budget`` layers, by
    bisection, and that pass's outcome. ``run(t)`` gives (layers removed, outcome); a pass
    at ``start``, where every fusion is accepted, must reach the budget, else
    ``shortfall`` (formatted with ``removed``) is the error."""
    removed, best = run(start)
    if removed < budget:
        raise MethodError(shortfall.format(removed=removed))
    lo, hi = low, 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        removed, outcome = run(mid)
        if removed >= budget:
            lo, best = mid, outcome
        else:
            hi = mid
    return lo, best


def check_target(method: str, target_ratio, threshold, similarity: str) -> None:
    """Exactly one of ``target_ratio`` and ``threshold``, a threshold in the range of the
    similarity (for settings validators: raises ValueError)."""
    if (target_ratio is None) == (threshold is None):
        raise ValueError(f"{method} takes either target_ratio or threshold (exactly one)")
    low = 0.0 if similarity == "cka" else -1.0
    if threshold is not None and not low <= threshold <= 1.0:
        raise ValueError(
            f"threshold {threshold} is outside [{low:g}, 1], the range of {similarity} similarity"
        )
