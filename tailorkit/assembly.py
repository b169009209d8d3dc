"""Assemble a recipe into a transformers model in memory, without writing to disk.

Parameters are created on the meta device and then assigned the plan's
tensors: passed-through tensors are zero-copy views of the memory-mapped
source shards (several output layers taken from one source share its
memory), merged ones are computed once.  The result equals, logit for logit,
the built checkpoint loaded with ``from_pretrained``.
"""

from __future__ import annotations

from tailorkit.errors import CheckpointError
from tailorkit.plan import Plan
from tailorkit.recipe import Recipe


def config_from_dict(config: dict, trust_remote_code: bool = False):
    """A transformers config object from a config.json dict."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError(
            "config.json has no model_type; transformers cannot tell the architecture"
        )
    if "auto_map" in config and not trust_remote_code:
        raise CheckpointError(
            f"model_type {model_type!r} needs custom code from the model repo (auto_map); "
            "tailorkit does not run remote code unless you pass trust_remote_code=True"
        )
    try:
        return AutoConfig.for_model(**config)
    except ValueError as e:
        raise CheckpointError(f"transformers does not know model_type {model_type!r}: {e}") from e


def assemble(recipe: Recipe | Plan | str, *, dtype: str | None = None):
    """Return the recipe's model as a ``transformers`` causal LM, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if isinstance(recipe, Plan):
        plan = recipe
    else:
        plan = (recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)).plan(dtype)
    config = config_from_dict(plan.config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype.torch)
    state = {job.name: job.compute() for job in plan.jobs}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(
            f"the model class {type(model).__name__} has no parameter for tensor "
            f"{result.unexpected_keys[0]!r}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the recipe's checkpoint has no tensor for parameter {missing[0]!r}")
    return model.eval()
