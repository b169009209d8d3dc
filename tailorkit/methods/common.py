"""Shared by the single-model methods: the removal budget and layer plans as Recipes.

A single-model plan is a list of output layers, each made of consecutive-or-not
source layers of the base with affine weights summing to 1: one layer with
weight 1 passes through; ``theta_l + sum_k (theta_{l+k} - theta_l)`` over
consecutive layers is LaCo's fold; anything else is a ``linear`` merge with
explicit weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tailorkit.checkpoint.source import Source
from tailorkit.errors import MethodError
from tailorkit.forward import Step
from tailorkit.merge import merge_tensor
from tailorkit.recipe import OutputLayer, Recipe

MODEL_NAME = "base"


@dataclass(frozen=True)
class Fused:
    """One output layer of a single-model plan: source layers and their affine weights."""

    layers: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def keep(cls, layer: int) -> Fused:
        return cls((layer,), (1.0,))

    @classmethod
    def fold(cls, layers: Sequence[int], fusion: str = "laco") -> Fused:
        """Fuse layers into one: ``laco`` (theta_l + sum_k (theta_{l+k} - theta_l)) or
        ``average``."""
        layers = tuple(layers)
        k = len(layers)
        if fusion == "laco":
            return cls(layers, (2.0 - k, *([1.0] * (k - 1))))
        if fusion == "average":
            return cls(layers, tuple([1.0 / k] * k))
        raise MethodError(f"fusion must be 'laco' or 'average', got {fusion!r}")

    def combine(self, others: Sequence[Fused]) -> Fused:
        """LaCo's fold of this output layer with the ones above it (weights compose)."""
        total: dict[int, float] = {}
        for f, coef in [(self, 2.0 - (len(others) + 1))] + [(o, 1.0) for o in others]:
            for layer, w in zip(f.layers, f.weights):
                total[layer] = total.get(layer, 0.0) + coef * w
        layers = tuple(sorted(i for i, w in total.items() if w != 0.0))
        return Fused(layers, tuple(total[i] for i in layers))

    @property
    def is_laco(self) -> bool:
        k = len(self.layers)
        consecutive = self.layers == tuple(range(self.layers[0], self.layers[0] + k))
        return k >= 2 and consecutive and self.weights == Fused.fold(self.layers).weights

    @property
    def is_average(self) -> bool:
        return len(self.layers) >= 2 and self.weights == Fused.fold(self.layers, "average").weights

    def output_layer(self) -> OutputLayer:
        """The recipe's expansion of this layer (what build and assemble will compute)."""
        recipe = Recipe.from_dict({"models": {MODEL_NAME: "x"}, "layers": [self.recipe_entry()]})
        return recipe.output_layers()[0]

    def recipe_entry(self) -> dict:
        refs = [{"from": MODEL_NAME, "layer": layer} for layer in self.layers]
        if len(self.layers) == 1:
            return refs[0]
        if self.is_laco:
            return {"merge": "laco", "sources": refs}
        if self.is_average:
            return {"merge": "linear", "sources": refs}
        weighted = [dict(r, weight=w) for r, w in zip(refs, self.weights)]
        return {"merge": "linear", "sources": weighted}

    def describe(self) -> str:
        return self.output_layer().describe()


def plan_recipe(base: str, plan: Sequence[Fused], dtype: str | None = None) -> Recipe:
    """The Recipe of a single-model plan; runs of kept layers become ranges."""
    entries: list[dict] = []
    for f in plan:
        entry = f.recipe_entry()
        last = entries[-1] if entries else None
        if "layer" in entry and last is not None and "merge" not in last:
            start, stop = last.get("layers") or (last["layer"], last["layer"] + 1)
            if entry["layer"] == stop:
                entries[-1] = {"from": MODEL_NAME, "layers": [start, stop + 1]}
                continue
        entries.append(entry)
    data: dict = {"models": {MODEL_NAME: base}, "layers": entries}
    if dtype:
        data["dtype"] = dtype
    return Recipe.from_dict(data)


def layer_parameter_counts(source: Source) -> list[int]:
    return [sum(t.numel for t in source.layer(i).values()) for i in range(source.num_layers)]


def removal_budget(source: Source, target_ratio: float, max_layers: int) -> int:
    """How many layers to remove so that ``target_ratio`` of the parameters go.

    The count whose parameter fraction is closest to the target; an error that lists
    the reachable ratios when no count between 1 and ``max_layers`` comes near.
    """
    if not 0 < target_ratio < 1:
        raise MethodError(f"target_ratio must be in (0, 1), got {target_ratio}")
    counts = layer_parameter_counts(source)
    total = source.num_parameters()
    per_layer = sum(counts) / len(counts) / total
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


def fused_step(stack, fused: Fused, dtype: torch.dtype, cache: dict | None = None) -> Step:
    """A :class:`Step` that runs ``fused`` with its merged parameters, computed as build does."""
    if len(fused.layers) == 1:
        return Step(fused.layers[0], None, fused)
    if cache is not None and fused in cache:
        return cache[fused]
    layer = fused.output_layer()
    per_layer = [stack.layer_params(i) for i in fused.layers]
    params = {
        name: merge_tensor(
            layer, [p[name] for p in per_layer], None, dtype, where=f"{fused.describe()} {name}"
        )
        for name in per_layer[0]
    }
    step = Step(fused.layers[0], params, fused)
    if cache is not None:
        cache[fused] = step
    return step
