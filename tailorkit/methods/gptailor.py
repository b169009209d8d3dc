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
from typing import Literal

from pydantic import Field, model_validator

from tailorkit import citations
from tailorkit.checkpoint.source import Source
from tailorkit.checkpoint.writer import parse_size
from tailorkit.devices import computes_bfloat16, resolve_device
from tailorkit.errors import CheckpointError, MethodError, RecipeError
from tailorkit.methods.common import removal_budget
from tailorkit.methods.registry import Context, MethodResult, Settings, register
from tailorkit.objectives import Logits
from tailorkit.recipe import DTYPES, Recipe
from tailorkit.search.driver import SearchSettings, run_search
from tailorkit.search.executors import make_executor
from tailorkit.search.space import SearchSpace, encode
from tailorkit.similarity import block_influence
from tailorkit.trials import RunnerConfig, keep

AUTO_TOP_K = 256  # kl_top_k "auto": the base's likeliest tokens the KL keeps apart
AUTO_TOP_K_VOCAB = 8192  # ... from this vocabulary size on (below, the full head is cheap)


class GPTailorSettings(Settings):
    flags = ("target_ratio", "budget", "popsize", "objective", "executor", "workers")
    flags += ("device", "resume", "skip_sinks")

    target_ratio: float = Field(gt=0, lt=1, description=Settings.TARGET_RATIO)
    budget: int = Field(120, ge=1, description="candidate evaluations (on the small slice)")
    popsize: int = Field(12, ge=2, description="CMA-ES population per generation")
    sigma0: float = Field(0.5, gt=0, description="CMA-ES initial step size")
    seed: int | None = Field(None, description="the search's seed; None: the calibration seed")
    objective: str | dict[str, float] = Field(
        "kl", description="kl, loss, lm_eval, or a weighted sum like kl+0.5*loss"
    )
    lm_eval: dict | None = Field(None, description="{tasks: [...], limit: N} for lm_eval")
    kl_positions: int | None = Field(
        None,
        ge=1,
        description="score kl/loss on this many evenly spaced positions per window, the same "
        "for every candidate (None: all)",
    )
    kl_top_k: int | Literal["auto"] | None = Field(
        "auto",
        description="score kl on the base's top k tokens per position and one bucket for the "
        f"rest, the same tokens for every candidate (null: the whole vocabulary; auto: "
        f"{AUTO_TOP_K} where the vocabulary has {AUTO_TOP_K_VOCAB:,} tokens or more and the "
        "objective has no loss term, else the whole vocabulary)",
    )
    fidelity_windows: int | None = Field(
        None, ge=1, description="windows of the small slice every candidate is scored on"
    )
    reevaluate: int = Field(2, ge=0, description="best per generation re-scored on all windows")
    allow_linear: bool = Field(False, description="also search plain averages of candidates")
    removal_only: bool = Field(False, description="search removal only (the paper's ablation)")
    start: Path | Recipe | None = Field(None, description="recipe to start the search from")
    executor: Literal["local", "ray"] = Field("local", description="where candidates are scored")
    workers: int = Field(2, ge=1, description="Ray workers (executor ray)")
    dtype: Literal[("auto", *DTYPES)] = Field(
        "auto",
        description="the dtype candidates run in, and the recipe's: auto is bfloat16 for a "
        "bfloat16 checkpoint on a device that computes it natively (a CPU with AMX or "
        "AVX512-BF16, a CUDA GPU), else float32",
    )
    device: str = Field("cpu", description="where candidates run: cpu, cuda, cuda:N")
    state_cache: str | int = Field("1GiB", description="memory for cached prefix states")
    search_dir: Path | None = Field(None, exclude=True, description="the search's log folder")
    resume: bool = Field(False, description="continue the search logged in search_dir")
    skip_sinks: bool = Field(False, description=Settings.SKIP_SINKS)

    @model_validator(mode="after")
    def _consistent(self) -> GPTailorSettings:
        if self.budget < self.popsize:
            raise ValueError(
                f"budget {self.budget} is smaller than one generation (popsize {self.popsize})"
            )
        explicit = None if self.kl_top_k == "auto" else self.kl_top_k
        if explicit is not None and explicit < 1:
            raise ValueError(f"kl_top_k must be at least 1, 'auto' or null, got {explicit}")
        Logits.parse(self.objective, self.lm_eval, self.kl_positions, explicit)
        parse_size(self.state_cache, "state_cache")
        resolve_device(self.device)
        return self


@register(
    "gptailor",
    settings=GPTailorSettings,
    summary="CMA-ES search over removing, selecting and merging layers of --candidate fine-tunes",
    label="GPTailor (Su et al., 2025, arXiv:2506.20480)",
    description="A zero-order search over one operation per layer: remove it, take it from one "
    "of several fine-tuned candidates of the same base model, or merge it across candidates "
    "(task arithmetic against the base layer of the same depth). tailorkit searches the plan "
    "with CMA-ES; no weights were retrained.",
    citation=citations.GPTAILOR,
    takes_candidates=True,
)
def gptailor(ctx: Context, settings: GPTailorSettings) -> MethodResult:
    s = settings
    if not ctx.candidates and not s.removal_only:
        raise MethodError("gptailor needs candidate models (fine-tunes of the base)")
    n = ctx.runner.num_layers
    for ref in ctx.candidates:
        _check_candidate(ctx.base, n, ref)
    dtype = trial_dtype(s.dtype, ctx.runner.base, s.device)
    top_k = kl_top_k(s.kl_top_k, Logits.parse(s.objective, s.lm_eval), ctx.runner.base)
    space = SearchSpace(
        base=ctx.base,
        candidates=tuple(ctx.candidates),
        num_layers=n,
        remove=removal_budget(ctx.runner.base, s.target_ratio, n - 1),
        allow_linear=s.allow_linear,
        removal_only=s.removal_only,
        dtype=dtype,
    )
    influence = block_influence(ctx.runner.activations.boundaries(s.skip_sinks))
    if s.start is None:
        x0 = space.initial(influence.tolist())
    else:
        x0 = encode(space, s.start if isinstance(s.start, Recipe) else Recipe.load(s.start))
    windows = ctx.runner.config.windows
    fidelity = s.fidelity_windows if (s.fidelity_windows or 0) < len(windows) else None
    # The small slice must be whole batches: shrink the batch to divide it.
    batch = ctx.runner.config.batch_size
    batch = math.gcd(batch, fidelity) if fidelity else batch
    config = RunnerConfig(
        base=ctx.base,
        windows=windows,
        candidates=dict(zip(space.names, space.candidates)),
        objective=Logits.parse(s.objective, s.lm_eval, s.kl_positions, top_k),
        dtype=dtype,
        batch_size=batch,
        device=s.device,
        state_cache_bytes=parse_size(s.state_cache, "state_cache"),
    )
    seed = ctx.seed if s.seed is None else s.seed
    objective = config.objective
    scoring = (
        f"{'+'.join(f'{w:g}*{n}' for n, w in objective.weights)}, kl_top_k={objective.top_k}, "
        f"kl_positions={objective.positions}, lm_eval={objective.lm_eval}, dtype={dtype}"
    )
    search = SearchSettings(
        s.budget, s.popsize, s.sigma0, seed, fidelity, s.reevaluate, scoring=scoring
    )
    out = s.search_dir or ctx.work_dir / "search"
    options = {}
    if s.executor == "ray":  # one GPU per actor when the candidates run on GPUs
        options = {"workers": s.workers, "gpus_per_worker": 1 if s.device != "cpu" else 0}
    executor = make_executor(s.executor, config, **options)
    try:
        progress = ctx.runner.config.progress
        result = run_search(space, executor, x0, search, out, resume=s.resume, progress=progress)
        cache = executor.cache_report()
    finally:
        executor.close()
    report = {
        "settings": {
            "seed": seed,
            "fidelity_windows": fidelity,
            "candidates": ctx.candidates,
            "dtype": dtype,  # what "auto" resolved to
            "kl_top_k": top_k,  # likewise
        },
        "search": {
            "start_fitness": result.start_fitness,
            "best_fitness": result.fitness,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "history": result.history,
            "runner": cache,
        },
        "block_influence": [round(float(x), 6) for x in influence],
    }
    images = {"CMA-ES search: objective against evaluations": result.plot}
    return MethodResult(result.recipe, report, images, files={"search": out})


def _check_candidate(base: str, num_layers: int, ref: str) -> None:
    """A candidate must be a fine-tune of the base: the same layers, tensors and shapes."""
    try:
        every_layer = [keep(i, "candidate") for i in range(num_layers)]
        plan = Recipe.from_layers({"base": base, "candidate": ref}, every_layer).plan()
        if plan.sources["candidate"].num_layers != num_layers:
            raise RecipeError(f"it has {plan.sources['candidate'].num_layers} layers")
    except (RecipeError, CheckpointError) as e:
        raise MethodError(
            f"candidate {ref}: {e}; candidates must be fine-tunes of the same base model, "
            f"with its {num_layers} layers"
        ) from None


def kl_top_k(requested: int | str | None, objective: Logits, base: Source) -> int | None:
    """``requested``; for "auto", :data:`AUTO_TOP_K` where the vocabulary is large enough
    for the LM head to be a large part of a candidate's cost and the objective has no loss
    term (which needs every logit), else None (the whole vocabulary). On SmolLM2 (49,152
    tokens) top 256 gave 1.7x the evaluations per minute of the full KL in bfloat16, and
    plans whose held-out loss was as good or better on the mean of three seeds at all
    three ratios measured (benchmarks/RESULTS.md, "Search cost per candidate, third")."""
    if requested != "auto":
        return requested
    vocab = base.config.get("vocab_size") or 0
    with_loss = "loss" in dict(objective.weights)
    return AUTO_TOP_K if vocab >= AUTO_TOP_K_VOCAB and not with_loss else None


def trial_dtype(requested: str, base: Source, device: str) -> str:
    """``requested``; for "auto", bfloat16 where the checkpoint is bfloat16 and the device
    computes it natively, else float32. On SmolLM2 with AMX the search ran 1.9x faster in
    bfloat16 and its plans scored better held out at all three ratios measured
    (benchmarks/RESULTS.md, "Search cost per candidate")."""
    if requested != "auto":
        return requested
    native = str(base.dtype) == "bfloat16" and computes_bfloat16(device)
    return "bfloat16" if native else "float32"
