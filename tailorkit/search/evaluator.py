"""Score candidate recipes on a fixed calibration batch, reusing all they share.

* Source tensors are memory-mapped once (``Source``); a passed-through base layer is
  the assembled base model's own module, run with its own parameters.
* A layer taken from a candidate, or merged, gets its parameters computed once, by
  the same code the build uses (so a built model computes exactly what was scored),
  and cached by its exact spec.
* Hidden states after every prefix of output layers are cached per calibration
  batch (LRU, bounded in bytes): a candidate only runs the layers after its first
  difference from a candidate already evaluated on that batch.
* A candidate's objective on a batch is kept, so a recipe that CMA-ES samples again,
  or the full-fidelity re-scoring of one scored on the small slice, reruns nothing
  for the batches already scored.

``stats`` counts in (layer, batch) units: ``layer_forwards`` layers run on one batch,
``layers_reused`` layers skipped thanks to a cached prefix, ``head_passes`` LM-head
and objective passes over one batch, ``scores_reused`` batch scores served from the
memo.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tailorkit.assemble import assemble
from tailorkit.checkpoint.source import Source
from tailorkit.devices import resolve_device
from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack, Step, Trace
from tailorkit.merge import merge_tensor
from tailorkit.prune import identity_recipe
from tailorkit.recipe import OutputLayer, Recipe
from tailorkit.search import objectives

DEFAULT_STATE_CACHE_BYTES = 1 << 30
DEFAULT_LAYER_CACHE = 256
SCORE_CACHE_ENTRIES = 1 << 16


def layer_key(layer: OutputLayer) -> tuple:
    """Hashable identity of an output layer (OutputLayer holds a dict, so is not)."""
    return (
        layer.method,
        layer.sources,
        layer.weights,
        layer.base,
        tuple(sorted(layer.params.items())),
    )


@dataclass
class EvaluatorConfig:
    """Everything a worker needs to build its own evaluator (picklable, for Ray)."""

    base: str
    candidates: dict[str, str]  # name in the recipes -> model reference
    windows: torch.Tensor  # (N, T) calibration token ids
    objective: dict[str, float] = field(default_factory=lambda: {"kl": 1.0})
    dtype: str = "float32"
    batch_size: int = 8
    threads: int | None = None  # torch threads; equal counts give equal floating-point sums
    state_cache_bytes: int = DEFAULT_STATE_CACHE_BYTES
    lm_eval: dict | None = None  # {"tasks": [...], "limit": N} for the lm_eval objective
    caches: bool = True  # off: every candidate runs all its layers and merges (benchmarks)
    device: str = "cpu"  # where candidates run: cpu, cuda, cuda:N


class Evaluator:
    def __init__(self, config: EvaluatorConfig):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        base = Source(config.base, "base")
        self.sources = {"base": base}
        for name, ref in config.candidates.items():
            self.sources[name] = Source(ref, name)
        self.dtype = getattr(torch, config.dtype)
        self.device = resolve_device(config.device)
        model = assemble(identity_recipe(config.base, base.num_layers), dtype=config.dtype)
        self.stack = DecoderStack(model.to(self.device))
        self.traces: list[Trace] = [
            self.stack.trace(config.windows[i : i + config.batch_size].to(self.device))
            for i in range(0, len(config.windows), config.batch_size)
        ]
        self.teacher = [objectives.Teacher.of(self.stack, t) for t in self.traces]
        self._steps: OrderedDict[tuple, Step] = OrderedDict()
        self._states: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (batch, *keys)
        self._state_bytes = 0
        self._scores: OrderedDict[tuple, object] = OrderedDict()
        self.stats = dict.fromkeys(
            (
                "evaluations",
                "layers_scored",
                "layer_forwards",
                "layers_reused",
                "head_passes",
                "scores_reused",
                "cached_merges",
            ),
            0,
        )

    # -- layers ----------------------------------------------------------------------------
    def step(self, layer: OutputLayer) -> Step:
        key = layer_key(layer)
        if self.config.caches and key in self._steps:
            self._steps.move_to_end(key)
            return self._steps[key]
        model, depth = layer.first
        if layer.method == "passthrough" and model == "base":
            step = Step(depth, None, key)
        else:
            step = Step(depth, self._merged_params(layer), key)
            self.stats["cached_merges"] += 1
        self._steps[key] = step
        if len(self._steps) > DEFAULT_LAYER_CACHE:
            self._steps.popitem(last=False)
        return step

    def _merged_params(self, layer: OutputLayer) -> dict[str, torch.Tensor]:
        module_names = [n for n, _ in self.stack.layers[layer.first[1]].named_parameters()]
        inputs = [self.sources[m].layer(i) for m, i in layer.sources]
        base = self.sources[layer.base[0]].layer(layer.base[1]) if layer.base else None
        params = {}
        for name in module_names:
            if name not in inputs[0]:
                raise MethodError(
                    f"layer {layer.describe()}: the checkpoint has no tensor {name!r} that the "
                    "model's layer module expects"
                )
            views = [self.sources[m].view(t[name]) for (m, _), t in zip(layer.sources, inputs)]
            base_view = self.sources[layer.base[0]].view(base[name]) if base else None
            params[name] = merge_tensor(
                layer, views, base_view, self.dtype, where=f"{layer.describe()} {name}"
            ).to(self.device)
        return params

    # -- forward with prefix reuse ----------------------------------------------------------
    def final_states(self, recipe: Recipe, windows: int | None = None) -> list[torch.Tensor]:
        """The last hidden states (before the norm), one ``(B, T, d)`` per batch."""
        layers = recipe.output_layers()
        keys = tuple(layer_key(layer) for layer in layers)
        return [self._final_state(b, layers, keys) for b in range(self._batches(windows))]

    def _final_state(self, batch: int, layers: list[OutputLayer], keys: tuple) -> torch.Tensor:
        """Batch ``batch``'s last hidden state, run from the longest prefix seen on that batch.

        Prefixes are cached per batch, so the full-fidelity re-scoring of a candidate
        reuses what its small-slice scoring computed for the first batches.
        """
        trace = self.traces[batch]
        start = len(keys) if self.config.caches else 0
        while start > 0 and (batch, *keys[:start]) not in self._states:
            start -= 1
        if start:
            state = self._states[(batch, *keys[:start])]
            self._states.move_to_end((batch, *keys[:start]))
        else:
            state = trace.states[0]
        self.stats["layers_reused"] += start
        for i in range(start, len(layers)):
            state = self.stack.run(state, [self.step(layers[i])], trace)
            self.stats["layer_forwards"] += 1
            if self.config.caches:
                self._remember((batch, *keys[: i + 1]), state)
        return state

    def _batches(self, windows: int | None) -> int:
        if windows is None or windows >= len(self.config.windows):
            return len(self.traces)
        size = self.config.batch_size
        if windows % size:
            raise MethodError(f"a fidelity of {windows} windows is not whole batches of {size}")
        return windows // size

    def _remember(self, key: tuple, state: torch.Tensor) -> None:
        self._states[key] = state
        self._state_bytes += state.numel() * state.element_size()
        while self._state_bytes > self.config.state_cache_bytes and len(self._states) > 1:
            _, old = self._states.popitem(last=False)
            self._state_bytes -= old.numel() * old.element_size()

    # -- scoring -------------------------------------------------------------------------
    def evaluate(self, recipe: Recipe, windows: int | None = None) -> float:
        """The weighted objective (lower is better) of ``recipe`` on the first ``windows``."""
        self.stats["evaluations"] += 1
        layers = recipe.output_layers()
        keys = tuple(layer_key(layer) for layer in layers)
        names = [n for n in self.config.objective if n in objectives.TOKEN_OBJECTIVES]
        sums = {n: (0.0, 0) for n in names}
        for b in range(self._batches(windows) if names else 0):
            for name, (total, count) in self._batch_sums(b, layers, keys, names).items():
                sums[name] = (sums[name][0] + total, sums[name][1] + count)
        value = 0.0
        for name, weight in self.config.objective.items():
            if name == "lm_eval":
                settings = self.config.lm_eval or {}
                part = self._memo(
                    ("lm_eval", keys), lambda: objectives.lm_eval_error(recipe, settings)
                )
            else:
                part = objectives.mean_or_fail(name, *sums[name])
            value += weight * part
        return value

    def _batch_sums(self, batch, layers, keys, names) -> dict[str, tuple[float, int]]:
        """The token objectives' sums on one batch; a recipe already scored there is not rerun."""
        self.stats["layers_scored"] += len(layers)

        def compute():
            self.stats["head_passes"] += 1
            state = self._final_state(batch, layers, keys)
            trace = self.traces[batch]
            return objectives.token_sums(names, self.stack, state, trace, self.teacher[batch])

        return self._memo(("tokens", tuple(names), batch, keys), compute)

    def _memo(self, key: tuple, compute):
        if not self.config.caches:
            return compute()
        if key in self._scores:
            self._scores.move_to_end(key)
            self.stats["scores_reused"] += 1
            return self._scores[key]
        self._scores[key] = value = compute()
        if len(self._scores) > SCORE_CACHE_ENTRIES:
            self._scores.popitem(last=False)
        return value

    def logits(self, recipe: Recipe) -> list[torch.Tensor]:
        """The candidate's logits on every calibration batch (what a built model returns)."""
        return [self.stack.logits(s) for s in self.final_states(recipe)]

    def cache_report(self) -> dict:
        return {**summarise(self.stats), "state_cache_mb": round(self._state_bytes / 2**20, 1)}


def summarise(stats: dict) -> dict:
    """``stats`` with the rates a person asks for: how often a prefix was reused, and how
    much of the layer work that scoring every candidate from scratch needs was skipped."""
    run, reused, scored = stats["layer_forwards"], stats["layers_reused"], stats["layers_scored"]
    return {
        **stats,
        "prefix_hit_rate": reused / (run + reused) if run + reused else 0.0,
        "layer_work_saved": 1 - run / scored if scored else 0.0,
    }
