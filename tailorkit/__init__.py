"""tailorkit: make a language model smaller by removing, stitching and merging whole layers.

import tailorkit as tk
recipe = tk.Recipe.load("recipe.yaml")
tk.build(recipe, "out/")          # stream a Hugging Face checkpoint to disk
model = tk.assemble(recipe)       # or get the transformers model in memory
"""

from tailorkit.assemble import assemble
from tailorkit.build import build
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.errors import CheckpointError, MergeError, RecipeError, TailorkitError
from tailorkit.plan import Plan
from tailorkit.recipe import Recipe

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "MergeError",
    "Plan",
    "Recipe",
    "RecipeError",
    "TailorkitError",
    "__version__",
    "assemble",
    "build",
]
