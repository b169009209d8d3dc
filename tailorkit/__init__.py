"""tailorkit: make a language model smaller by removing, stitching and merging whole layers.

import tailorkit as tk
recipe = tk.Recipe.load("recipe.yaml")
tk.build(recipe, "out/")          # stream a Hugging Face checkpoint to disk
model = tk.assemble(recipe)       # or get the transformers model in memory
result = tk.prune(method="slm", target_ratio=0.25)   # or let a method choose the plan
result.save_pretrained("out-slm/")
healed = tk.heal(result, steps=200)  # distil the dense model back in
"""

from tailorkit.analyze import analyze
from tailorkit.assemble import assemble
from tailorkit.build import build
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.errors import CheckpointError, MergeError, RecipeError, TailorkitError
from tailorkit.eval import Evaluation, evaluate
from tailorkit.heal import HealResult, heal
from tailorkit.plan import Plan
from tailorkit.prune import bridge, prune
from tailorkit.recipe import Recipe
from tailorkit.result import PruneResult
from tailorkit.version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "Evaluation",
    "HealResult",
    "MergeError",
    "Plan",
    "PruneResult",
    "Recipe",
    "RecipeError",
    "TailorkitError",
    "__version__",
    "analyze",
    "assemble",
    "bridge",
    "build",
    "evaluate",
    "heal",
    "prune",
]
