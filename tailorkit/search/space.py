"""The search space: a real vector that always decodes to a valid Recipe.

Genes, for a base model of L layers, K candidate fine-tunes and R layers to remove:

* ``keep[l]`` (L): the L - R layers with the highest scores are kept, in order, so
  every vector removes exactly R layers (ties go to the lower layer index);
* ``pick[l, k]`` (L x K): candidate k supplies kept layer l when its gene is > 0;
  none -> the base's layer l passes through; one -> that candidate's layer l;
  several -> task arithmetic against the base's layer at the SAME depth l;
* ``lam[l]`` (L): that merge's coefficient, ``sigmoid(gene)`` rounded to a grid of
  ``LAMBDA_STEPS`` (so equal merges are recognised and cached);
* ``mode[l]`` (L, only with ``allow_linear``): > 0 makes a multi-candidate layer a
  plain average instead of task arithmetic.

``removal_only`` keeps just the ``keep`` genes (every kept layer from the base): the
paper's removal-only ablation. Genes of the other kinds are ignored for removed
layers; no other two vectors decode to different encodings of one plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tailorkit.errors import MethodError
from tailorkit.recipe import Recipe
from tailorkit.trials import BASE

LAMBDA_STEPS = 20  # lambda in {0, 0.05, ..., 1}


@dataclass(frozen=True)
class SearchSpace:
    base: str  # model reference
    candidates: tuple[str, ...]  # model references of the fine-tunes
    num_layers: int
    remove: int
    allow_linear: bool = False
    removal_only: bool = False
    dtype: str | None = None  # the recipes' dtype (the dtype candidates are evaluated in)

    def __post_init__(self):
        if not 0 < self.remove < self.num_layers:
            raise MethodError(
                f"the search must remove between 1 and {self.num_layers - 1} layers, "
                f"got {self.remove}"
            )
        if not self.candidates and not self.removal_only:
            raise MethodError("gptailor needs at least one candidate model (or removal_only)")

    @property
    def names(self) -> list[str]:
        return [f"c{i + 1}" for i in range(len(self.candidates))]

    @property
    def dimension(self) -> int:
        n, k = self.num_layers, len(self.candidates)
        if self.removal_only:
            return n
        return n + n * k + n + (n if self.allow_linear else 0)

    def split(self, x: Sequence[float]):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dimension,):
            raise MethodError(f"a genome has {self.dimension} genes, got shape {x.shape}")
        n, k = self.num_layers, len(self.candidates)
        keep = x[:n]
        if self.removal_only:
            return keep, np.full((n, 0), -1.0), np.zeros(n), np.zeros(n)
        pick = x[n : n + n * k].reshape(n, k)
        lam = x[n + n * k : 2 * n + n * k]
        mode = x[2 * n + n * k :] if self.allow_linear else np.zeros(n)
        return keep, pick, lam, mode

    def kept_layers(self, keep: np.ndarray) -> list[int]:
        order = sorted(range(self.num_layers), key=lambda i: (-keep[i], i))
        return sorted(order[: self.num_layers - self.remove])

    def decode(self, x: Sequence[float]) -> Recipe:
        keep, pick, lam, mode = self.split(x)
        names = self.names
        layers = []
        for layer in self.kept_layers(keep):
            chosen = [names[k] for k in range(pick.shape[1]) if pick[layer, k] > 0]
            if not chosen:
                layers.append({"from": BASE, "layer": layer})
            elif len(chosen) == 1:
                layers.append({"from": chosen[0], "layer": layer})
            elif mode[layer] > 0:
                layers.append(
                    {"merge": "linear", "sources": [{"from": c, "layer": layer} for c in chosen]}
                )
            else:
                layers.append(
                    {
                        "merge": "task_arithmetic",
                        "base": {"from": BASE, "layer": layer},
                        "sources": [{"from": c, "layer": layer} for c in chosen],
                        "lambda": quantise_lambda(lam[layer]),
                    }
                )
        data = {"models": {BASE: self.base, **dict(zip(names, self.candidates))}, "layers": layers}
        if self.dtype:
            data["dtype"] = self.dtype
        return Recipe.from_dict(data)

    def initial(self, keep_scores: Sequence[float]) -> np.ndarray:
        """The starting mean: keep the layers ``keep_scores`` ranks highest, all from the base
        (pick genes at -1), lambda 0.5. It decodes to a plain removal baseline."""
        n = self.num_layers
        scores = np.asarray(keep_scores, dtype=np.float64)
        # Ranks spread over [-1, 1] so sigma0 moves a few layers in and out, not all.
        ranks = np.empty(n)
        ranks[np.argsort(scores, kind="stable")] = np.linspace(-1.0, 1.0, n)
        if self.removal_only:
            return ranks
        k = len(self.candidates)
        parts = [ranks, np.full(n * k, -1.0), np.zeros(n)]
        if self.allow_linear:
            parts.append(np.full(n, -1.0))
        return np.concatenate(parts)


def quantise_lambda(gene: float) -> float:
    lam = 1.0 / (1.0 + math.exp(-float(gene)))
    return round(lam * LAMBDA_STEPS) / LAMBDA_STEPS


def encode(space: SearchSpace, recipe: Recipe) -> np.ndarray:
    """The genome of a recipe made of this space's moves (to start the search from it)."""
    names = {name: i for i, name in enumerate(space.names)}
    n, k = space.num_layers, len(space.candidates)
    keep = np.full(n, -1.0)
    pick = np.full((n, k), -1.0)
    lam = np.zeros(n)
    mode = np.full(n, -1.0)
    layers = recipe.output_layers()
    if len(layers) != n - space.remove:
        raise MethodError(
            f"the starting recipe has {len(layers)} layers; the search keeps {n - space.remove}"
        )
    for out in layers:
        depth = out.sources[0][1]
        if any(i != depth for _, i in out.sources) or keep[depth] > 0:
            raise MethodError(
                f"starting recipe layer {out.describe()}: the search takes each kept layer "
                "from one source depth, once"
            )
        keep[depth] = 1.0
        for model, _ in out.sources:
            if model != BASE:
                pick[depth, names[model]] = 1.0
        if out.method == "task_arithmetic":
            p = min(max(out.param("lambda"), 1e-3), 1 - 1e-3)
            lam[depth] = math.log(p / (1 - p))
        elif out.method == "linear":
            mode[depth] = 1.0
    if space.removal_only:
        return keep
    parts = [keep, pick.reshape(-1), lam] + ([mode] if space.allow_linear else [])
    return np.concatenate(parts)
