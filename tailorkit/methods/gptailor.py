"""GPTailor (Su, Shen, Yin, Liu, Yang, Geiping, 2025, arXiv 2506.20480), searched with CMA-ES.

Per layer of the base: remove it, take it from one of several fine-tunes of the
base, or merge it across them (task arithmetic against the base's layer at the same
depth). Exactly the removal budget goes; the rest is searched (see
:mod:`tailorkit.search.space`). The search starts from Block-Influence removal with
base layers (or from a recipe you give), scored first, so the result is never worse
than that baseline on the objective.

Unlike the released code, the task vector is taken against the base layer at the
SOURCE depth (not the output index), and nothing is searched that is not applied.
"""

from __future__ import annotations

import math
from pathlib import Path

from tailorkit.checkpoint.source import Source
from tailorkit.checkpoint.writer import parse_size
from tailorkit.errors import MethodError
from tailorkit.methods import Context, MethodResult, register
from tailorkit.methods.common import removal_budget
from tailorkit.recipe import Recipe
from tailorkit.search.driver import SearchSettings, run_search
from tailorkit.search.evaluator import EvaluatorConfig
from tailorkit.search.executors import make_executor
from tailorkit.search.objectives import parse_objective
from tailorkit.search.space import SearchSpace, encode
from tailorkit.similarity import block_influence


@register("gptailor")
def gptailor(
    ctx: Context,
    *,
    target_ratio: float,
    budget: int = 120,
    popsize: int = 12,
    sigma0: float = 0.5,
    seed: int = 0,
    objective: str | dict = "kl",
    fidelity_windows: int | None = None,
    reevaluate: int = 2,
    allow_linear: bool = False,
    removal_only: bool = False,
    start: str | Recipe | None = None,
    executor: str = "local",
    workers: int = 2,
    dtype: str = "float32",
    device: str = "cpu",
    state_cache: str | int = "1GiB",
    search_dir: str | Path | None = None,
    resume: bool = False,
    lm_eval: dict | None = None,
) -> MethodResult:
    if not ctx.candidates and not removal_only:
        raise MethodError("gptailor needs candidate models (fine-tunes of the base)")
    n = ctx.stack.num_layers
    for ref in ctx.candidates:
        _check_candidate(ctx.source, Source(ref))
    space = SearchSpace(
        base=ctx.base,
        candidates=tuple(ctx.candidates),
        num_layers=n,
        remove=removal_budget(ctx.source, target_ratio, n - 1),
        allow_linear=allow_linear,
        removal_only=removal_only,
        dtype=dtype,
    )
    influence = block_influence(ctx.activations.boundaries())
    if start is None:
        x0 = space.initial(influence.tolist())
    else:
        x0 = encode(space, start if isinstance(start, Recipe) else Recipe.load(start))
    if fidelity_windows is not None and fidelity_windows >= len(ctx.windows):
        fidelity_windows = None
    # The small slice must be whole batches: shrink the batch to divide it.
    batch = math.gcd(ctx.batch_size, fidelity_windows) if fidelity_windows else ctx.batch_size
    config = EvaluatorConfig(
        base=ctx.base,
        candidates=dict(zip(space.names, space.candidates)),
        windows=ctx.windows,
        objective=parse_objective(objective),
        dtype=dtype,
        batch_size=batch,
        lm_eval=lm_eval,
        device=device,
        state_cache_bytes=parse_size(state_cache, "state_cache"),
    )
    settings = SearchSettings(budget, popsize, sigma0, seed, fidelity_windows, reevaluate)
    out = Path(search_dir) if search_dir else ctx.work_dir / "search"
    options = {}
    if executor == "ray":  # one GPU per actor when the candidates run on GPUs
        options = {"workers": workers, "gpus_per_worker": 1 if device != "cpu" else 0}
    runner = make_executor(executor, config, **options)
    try:
        result = run_search(space, runner, x0, settings, out, resume=resume, progress=ctx.progress)
        cache = runner.cache_report()
    finally:
        runner.close()
    report = {
        "method": "gptailor",
        "settings": {
            "target_ratio": target_ratio,
            "budget": budget,
            "popsize": popsize,
            "sigma0": sigma0,
            "seed": seed,
            "objective": config.objective,
            "fidelity_windows": fidelity_windows,
            "reevaluate": reevaluate,
            "allow_linear": allow_linear,
            "removal_only": removal_only,
            "executor": executor,
            "candidates": list(ctx.candidates),
            "dtype": dtype,
            "device": device,
            "state_cache": state_cache,
        },
        "search": {
            "start_fitness": result.start_fitness,
            "best_fitness": result.fitness,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "history": result.history,
            "evaluator_cache": cache,
        },
        "block_influence": [round(float(x), 6) for x in influence],
    }
    images = {"CMA-ES search: objective against evaluations": result.plot}
    return MethodResult(result.recipe, report, images, files={"search": out})


def _check_candidate(base: Source, candidate: Source) -> None:
    if candidate.num_layers != base.num_layers:
        raise MethodError(
            f"candidate {candidate.ref} has {candidate.num_layers} layers, the base "
            f"{base.num_layers}: candidates must be fine-tunes of the base"
        )
    for i in range(base.num_layers):
        ours, theirs = base.layer(i), candidate.layer(i)
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            raise MethodError(
                f"candidate {candidate.ref}: layer {i} does not have the base's tensors "
                "and shapes; candidates must be fine-tunes of the same base model"
            )
