"""Score candidate recipes on a fixed calibration batch, reusing all they share.

* Source tensors are memory-mapped once (``Source``); a passed-through base layer is
  the assembled base model's own module, run with its own parameters.
* A layer taken from a candidate, or merged, gets its parameters computed once, by
  the same code the build uses (so a built model computes exactly what was scored),
  and cached by its exact spec.
* Hidden states after every prefix of output layers are cached (LRU, bounded in
  bytes): a candidate only runs the layers after its first difference from a
  candidate already evaluated.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tailorkit.assemble import assemble
from tailorkit.checkpoint.source import Source
from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack, Step, Trace
from tailorkit.merge import merge_tensor
from tailorkit.prune import identity_recipe
from tailorkit.recipe import OutputLayer, Recipe
from tailorkit.search import objectives

DEFAULT_STATE_CACHE_BYTES = 1 << 30
DEFAULT_LAYER_CACHE = 256


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
        model = assemble(identity_recipe(config.base, base.num_layers), dtype=config.dtype)
        self.stack = DecoderStack(model)
        self.traces: list[Trace] = [
            self.stack.trace(config.windows[i : i + config.batch_size])
            for i in range(0, len(config.windows), config.batch_size)
        ]
        self.teacher = [objectives.teacher_log_probs(self.stack, t) for t in self.traces]
        self._steps: OrderedDict[tuple, Step] = OrderedDict()
        self._states: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._state_bytes = 0
        self.stats = {"evaluations": 0, "layer_forwards": 0, "layers_reused": 0, "cached_merges": 0}

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
            )
        return params

    # -- forward with prefix reuse ----------------------------------------------------------
    def final_states(self, recipe: Recipe, windows: int | None = None) -> list[torch.Tensor]:
        """The last hidden states (before the norm), one ``(B, T, d)`` per batch."""
        layers = recipe.output_layers()
        traces = self._traces_for(windows)
        keys = [layer_key(layer) for layer in layers]
        tag = len(traces)
        start = len(keys) if self.config.caches else 0
        while start > 0 and (tag, *keys[:start]) not in self._states:
            start -= 1
        if start:
            states = self._states[(tag, *keys[:start])]
            self._states.move_to_end((tag, *keys[:start]))
        else:
            states = [t.states[0] for t in traces]
        self.stats["layers_reused"] += start
        for i in range(start, len(layers)):
            step = self.step(layers[i])
            states = [self.stack.run(s, [step], t) for s, t in zip(states, traces)]
            self.stats["layer_forwards"] += 1
            if self.config.caches:
                self._remember((tag, *keys[: i + 1]), states)
        return states

    def _traces_for(self, windows: int | None) -> list[Trace]:
        if windows is None or windows >= len(self.config.windows):
            return self.traces
        size = self.config.batch_size
        if windows % size:
            raise MethodError(f"a fidelity of {windows} windows is not whole batches of {size}")
        return self.traces[: windows // size]

    def _remember(self, key: tuple, states: list[torch.Tensor]) -> None:
        size = sum(s.numel() * s.element_size() for s in states)
        self._states[key] = states
        self._state_bytes += size
        while self._state_bytes > self.config.state_cache_bytes and len(self._states) > 1:
            _, old = self._states.popitem(last=False)
            self._state_bytes -= sum(s.numel() * s.element_size() for s in old)

    # -- scoring -------------------------------------------------------------------------
    def evaluate(self, recipe: Recipe, windows: int | None = None) -> float:
        """The weighted objective (lower is better) of ``recipe`` on the first ``windows``."""
        self.stats["evaluations"] += 1
        total = 0.0
        for name, weight in self.config.objective.items():
            if name == "lm_eval":
                value = objectives.lm_eval_error(recipe, self.config.lm_eval or {})
            else:
                states = self.final_states(recipe, windows)
                traces = self._traces_for(windows)
                value = objectives.token_objective(
                    name, self.stack, states, traces, self.teacher[: len(traces)]
                )
            total += weight * value
        return total

    def logits(self, recipe: Recipe) -> list[torch.Tensor]:
        """The candidate's logits on every calibration batch (what a built model returns)."""
        return [self.stack.logits(s) for s in self.final_states(recipe)]

    def cache_report(self) -> dict:
        run, reused = self.stats["layer_forwards"], self.stats["layers_reused"]
        return {
            **self.stats,
            "prefix_hit_rate": reused / (run + reused) if run + reused else 0.0,
            "state_cache_mb": round(self._state_bytes / 2**20, 1),
        }
