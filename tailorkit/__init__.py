"""tailorkit: make a language model smaller by removing, stitching and merging whole layers.

import tailorkit as tk
recipe = tk.Recipe.load("recipe.yaml")
tk.build(recipe, "out/")          # stream a Hugging Face checkpoint to disk
model = tk.assemble(recipe)       # or get the transformers model in memory
result = tk.prune(method="slm", target_ratio=0.25)   # or let a method choose the plan
result.save_pretrained("out-slm/")
healed = tk.heal(result, steps=200)  # distil the dense model back in

The names below are imported when first used (PEP 562), so ``tailorkit build`` starts
copying bytes before torch has finished loading. The functions live in modules with other
names (``tailorkit.builder`` holds ``build``), so importing a module never hides a function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tailorkit.errors import CheckpointError, MergeError, RecipeError, TailorkitError
from tailorkit.version import __version__

_LAZY = {
    "DEFAULT_MODEL": "tailorkit.checkpoint.builtin",
    "Evaluation": "tailorkit.eval",
    "HealResult": "tailorkit.healing",
    "Plan": "tailorkit.plan",
    "PruneResult": "tailorkit.result",
    "Recipe": "tailorkit.recipe",
    "analyze": "tailorkit.analysis",
    "assemble": "tailorkit.assembly",
    "bridge": "tailorkit.pruning",
    "build": "tailorkit.builder",
    "evaluate": "tailorkit.eval",
    "heal": "tailorkit.healing",
    "prune": "tailorkit.pruning",
}

__all__ = [
    "CheckpointError",
    "MergeError",
    "RecipeError",
    "TailorkitError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tailorkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from tailorkit.analysis import analyze  # noqa: F401
    from tailorkit.assembly import assemble  # noqa: F401
    from tailorkit.builder import build  # noqa: F401
    from tailorkit.checkpoint.builtin import DEFAULT_MODEL  # noqa: F401
    from tailorkit.eval import Evaluation, evaluate  # noqa: F401
    from tailorkit.healing import HealResult, heal  # noqa: F401
    from tailorkit.plan import Plan  # noqa: F401
    from tailorkit.pruning import bridge, prune  # noqa: F401
    from tailorkit.recipe import Recipe  # noqa: F401
    from tailorkit.result import PruneResult  # noqa: F401
