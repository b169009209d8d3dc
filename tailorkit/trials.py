"""The trial runner: what would the model compute if its layers were these?

SLM and LaCo try fusions from the top down, GPTailor scores populations of plans: every
method asks this many times. A trial is a list of output layers (``OutputLayer``, the
recipe's own spec of a layer); the runner scores it with a pluggable objective
(:mod:`tailorkit.objectives`), reusing what trials share, each cache an :class:`LRU`:

* recorded states: a trial whose first k layers are the base's own starts from the
  base's recorded hidden state at k (:mod:`tailorkit.activations`);
* prefix states: the state after every prefix of output layers, per batch, bounded in
  bytes: a trial runs only the layers after its first difference from one already run;
* layers: a merged or candidate layer's parameters are computed once, by the build's code,
  so a built model computes exactly what was scored;
* scores: a trial's statistic on a batch is memoised (CMA-ES repeats, bisections revisit).

``caches=False`` turns them all off (the benchmarks' baseline).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tailorkit.activations import capture
from tailorkit.calibration import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_WINDOWS,
    DEFAULT_SEQ_LEN,
    calibration_windows,
)
from tailorkit.checkpoint.source import Source, resolve
from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack, Step, Trace
from tailorkit.objectives import Objective
from tailorkit.plan import layer_jobs
from tailorkit.recipe import OutputLayer, Recipe

BASE = "base"  # the recorded model's name in trial layers
DEFAULT_STATE_CACHE_BYTES = 1 << 30
# Layers whose parameters were computed (merged, gathered, bridged) are kept up to this
# many bytes: at 7B scale one merged layer is ~800 MB in float32, and a width split makes
# every layer one.
DEFAULT_LAYER_CACHE_BYTES = 2 << 30
SCORE_CACHE_ENTRIES = 1 << 16


def keep(layer: int, model: str = BASE) -> OutputLayer:
    """Layer ``layer`` of ``model`` passed through."""
    return OutputLayer("passthrough", ((model, layer),))


class LRU:
    """A mapping that forgets its least recently used entries beyond ``budget``, in the
    units ``size`` measures (entries by default). A budget of 0 keeps nothing."""

    def __init__(self, budget: int, size: Callable[[Any], int] = lambda value: 1):
        self.budget, self.size, self.used = budget, size, 0
        self._items: OrderedDict = OrderedDict()

    def clear(self) -> None:
        self._items.clear()
        self.used = 0

    def get(self, key) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if self.budget <= 0:
            return
        self._items[key] = value
        self.used += self.size(value)
        while self.used > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= self.size(old)


@dataclass
class RunnerStats:
    """What the runner did, in (layer, batch) units."""

    evaluations: int = 0  # trials scored
    layers_scored: int = 0  # layers the scored trials asked for, per batch
    layer_forwards: int = 0  # layers run on one batch
    layers_reused: int = 0  # layers skipped thanks to a recorded or cached prefix state
    objective_passes: int = 0  # statistics computed on one batch (kl/loss: one LM-head pass)
    scores_reused: int = 0  # statistics served from the memo
    merged_layers: int = 0  # layer parameters computed (merged, or from a candidate)

    def report(self) -> dict[str, Any]:
        """The counts, with the rates a person asks for: how often a prefix was reused, and
        how much of the layer work that running every trial from scratch needs was skipped."""
        run, reused, scored = self.layer_forwards, self.layers_reused, self.layers_scored
        return {
            **asdict(self),
            "prefix_hit_rate": reused / (run + reused) if run + reused else 0.0,
            "layer_work_saved": 1 - run / scored if scored else 0.0,
        }


@dataclass
class RunnerConfig:
    """Everything needed to build a runner (picklable: each Ray worker builds its own)."""

    base: str  # model reference
    windows: torch.Tensor  # (N, T) calibration token ids
    candidates: dict[str, str] = field(default_factory=dict)  # name in trials -> reference
    objective: Objective | None = None  # the default objective of ``score``
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None  # where trials run: cpu (default), cuda, cuda:N
    threads: int | None = None  # torch threads; equal counts give equal floating-point sums
    state_cache_bytes: int = DEFAULT_STATE_CACHE_BYTES
    layer_cache_bytes: int = DEFAULT_LAYER_CACHE_BYTES
    caches: bool = True  # off: every trial runs all its layers and merges (benchmarks)
    offload: bool | str | None = False  # recorded states on disk (see activations.capture)
    progress: bool = False
    base_name: str = BASE  # the base's name in trial layers (a recipe's base model)


class TrialRunner:
    """Recorded states of the base model in, a trial's score out, caches inside."""

    def __init__(self, config: RunnerConfig):
        """Open the models, assemble the base and record its states on the windows."""
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.sources = {config.base_name: Source(config.base, config.base_name)}
        self.sources |= {name: Source(ref, name) for name, ref in config.candidates.items()}
        self.stack = DecoderStack.load(self.base, config.dtype, config.device)
        self.activations = capture(
            self.stack,
            config.windows,
            batch_size=config.batch_size,
            offload=config.offload,
            progress=config.progress,
        )
        self.traces: list[Trace] = self.activations.traces
        parameter = next(self.stack.model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self._identity = tuple(keep(i, config.base_name) for i in range(self.stack.num_layers))
        on = int(config.caches)
        self._steps = LRU(config.layer_cache_bytes * on, lambda step: step.nbytes)
        self._states = LRU(config.state_cache_bytes * on, lambda t: t.numel() * t.element_size())
        self._scores = LRU(SCORE_CACHE_ENTRIES * on)
        self._references: dict[tuple[str, int], Any] = {}
        self.fitted: dict[str, torch.Tensor] = {}  # the bridges trial layers may name
        self.stats = RunnerStats()
        if config.objective is not None:
            self.prepare(config.objective)

    @classmethod
    def calibrate(
        cls,
        base: str,
        calibration: Any = None,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        num_windows: int = DEFAULT_NUM_WINDOWS,
        seed: int = 0,
        **config: Any,
    ) -> TrialRunner:
        """The start pruning and analysis share: ``calibration`` (text, or token ids) cut
        into windows with the base's tokenizer, then the runner on them."""
        windows = calibration_windows(
            resolve(base), calibration, seq_len=seq_len, num_windows=num_windows, seed=seed
        )
        return cls(RunnerConfig(base, windows, **config))

    # -- what the base model is ---------------------------------------------------------
    @property
    def base(self) -> Source:
        return self.sources[self.config.base_name]

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    def opened_on(self, recipe: Recipe) -> bool:
        """Whether this runner holds ``recipe``'s models, by name and reference, with its
        base as the one recorded: then it can run, score and bridge the recipe's layers."""
        refs = {name: source.ref for name, source in self.sources.items()}
        return self.config.base_name == recipe.base_model and all(
            refs.get(name) == ref for name, ref in recipe.models.items()
        )

    def reference(self, name: str, batch: int, compute: Callable[[Trace], Any]) -> Any:
        """What the base model itself gives on ``batch`` (its next-token distribution, its
        final states), computed once."""
        key = (name, batch)
        if key not in self._references:
            self._references[key] = compute(self.traces[batch])
        return self._references[key]

    def prepare(self, objective: Objective) -> None:
        """Compute ``objective``'s references on every batch now, not in the first trial."""
        for batch in range(len(self.traces)):
            objective.reference(self, batch)

    def recipe(self, layers: Sequence[OutputLayer]) -> Recipe:
        """A trial as a recipe (for objectives that assemble the whole model)."""
        models = {name: source.ref for name, source in self.sources.items()}
        fitted = {layer.bridge: self.fitted[layer.bridge] for layer in layers if layer.bridge}
        return Recipe.from_layers(models, layers, str(self.dtype).removeprefix("torch."), fitted)

    def add_fitted(self, tensors: dict[str, torch.Tensor]) -> None:
        """Bridges that trial layers may name from now on; a name stands for one tensor."""
        for name, tensor in tensors.items():
            if name in self.fitted and not torch.equal(self.fitted[name], tensor):
                raise MethodError(f"fitted tensor {name!r} is already a different tensor")
            self.fitted[name] = tensor

    def forget_fitted(self) -> None:
        """Drop the bridges and everything computed with them (layers, states, scores), so
        that the same names may stand for other tensors: e.g. the bridges of another plan."""
        self.fitted.clear()
        for cache in (self._steps, self._states, self._scores):
            cache.clear()

    # -- running a trial ----------------------------------------------------------------
    def step(self, layer: OutputLayer) -> Step:
        """The forward step of one output layer; a new layer's parameters computed once."""
        step = self._steps.get(layer)
        if step is None:
            model, depth = layer.first
            if (
                layer.method == "passthrough"
                and model == self.config.base_name
                and not layer.bridge
                and layer.channels is None
            ):
                step = Step(depth)
            else:
                params, nbytes = self._parameters(layer)
                step = Step(depth, params, nbytes)
                self.stats.merged_layers += 1
            self._steps.put(layer, step)
        return step

    def _parameters(self, layer: OutputLayer) -> tuple[dict[str, torch.Tensor], int]:
        """The layer's parameters, and the bytes of those computed (not mapped views)."""
        jobs = layer_jobs(0, layer, self.sources, self.dtype, self.config.base_name, self.fitted)
        params, nbytes = {}, 0
        for name, _ in self.stack.layers[layer.first[1]].named_parameters():
            if name not in jobs:
                raise MethodError(
                    f"layer {layer.describe()}: the checkpoint has no tensor {name!r} that the "
                    "model's layer module expects"
                )
            params[name] = jobs[name].compute().to(self.device)
            mapped = jobs[name].is_raw_copy and self.device.type == "cpu"
            nbytes += 0 if mapped else params[name].numel() * params[name].element_size()
        return params, nbytes

    def recorded_prefix(self, layers: Sequence[OutputLayer]) -> int:
        """How many of ``layers`` are the base's own first layers: their output states are
        recorded, so a trial need not run them."""
        n = 0
        while n < min(len(layers), len(self._identity)) and layers[n] == self._identity[n]:
            n += 1
        return n

    def final_state(self, layers: tuple[OutputLayer, ...], batch: int) -> torch.Tensor:
        """Batch ``batch``'s last hidden state (before the final norm) under ``layers``,
        run from the longest prefix already known: recorded, or cached."""
        trace = self.traces[batch]
        recorded = self.recorded_prefix(layers) if self.config.caches else 0
        start, state = len(layers), None
        while start > recorded:
            state = self._states.get((batch, layers[:start]))
            if state is not None:
                break
            start -= 1
        if state is None:
            state = trace.states[start]
        self.stats.layers_reused += start
        for i in range(start, len(layers)):
            state = self.stack.run(state, [self.step(layers[i])], trace)
            self.stats.layer_forwards += 1
            self._states.put((batch, layers[: i + 1]), state)
        return state

    def score(
        self,
        trial: Recipe | Sequence[OutputLayer],
        objective: Objective | None = None,
        windows: int | None = None,
        batches: Sequence[int] | None = None,
    ) -> float:
        """``objective`` (the runner's own by default) of the model whose decoder layers are
        ``trial``, on the first ``windows`` calibration windows (all by default) or on the
        calibration batches numbered ``batches``."""
        objective = objective or self.config.objective
        layers = tuple(trial.output_layers() if isinstance(trial, Recipe) else trial)
        self.stats.evaluations += 1
        if batches is None:
            batches = range(self._batches(windows))
        batches = batches if objective.per_batch else ()
        parts = [self._batch_part(objective, b, layers) for b in batches]
        return objective.reduce(self, layers, parts)

    def _batch_part(self, objective: Objective, batch: int, layers: tuple) -> Any:
        self.stats.layers_scored += len(layers)

        def compute():
            self.stats.objective_passes += 1
            return objective.on_batch(self, batch, self.final_state(layers, batch))

        return self.memo((objective, batch, layers), compute)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value when ``key`` was computed before."""
        value = self._scores.get(key)
        if value is None:
            self._scores.put(key, value := compute())
        else:
            self.stats.scores_reused += 1
        return value

    def _batches(self, windows: int | None) -> int:
        if windows is None or windows >= len(self.config.windows):
            return len(self.traces)
        size = self.config.batch_size
        if windows % size:
            raise MethodError(f"a fidelity of {windows} windows is not whole batches of {size}")
        return windows // size

    def logits(self, trial: Recipe | Sequence[OutputLayer]) -> list[torch.Tensor]:
        """The trial's logits on every calibration batch (what a built model returns)."""
        layers = tuple(trial.output_layers() if isinstance(trial, Recipe) else trial)
        return [self.stack.logits(self.final_state(layers, b)) for b in range(len(self.traces))]

    def cache_report(self) -> dict[str, Any]:
        return {**self.stats.report(), "state_cache_mb": round(self._states.used / 2**20, 1)}
