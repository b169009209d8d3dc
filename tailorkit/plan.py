"""From a Recipe to a Plan: every output tensor's name, shape, dtype and inputs.

Making a plan opens the sources (config.json and safetensors headers only) and
checks everything that can be checked before a tensor byte is read: layer
indices, tensor names and shapes inside every merge, hidden size and
vocabulary across models.  Build and assemble both consume the plan, so the
streamed checkpoint and the in-memory model cannot disagree.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tailorkit import combine
from tailorkit.checkpoint.architecture import (
    get_path,
    intermediate_key,
    mlp_channels,
    mlp_output,
    set_path,
)
from tailorkit.checkpoint.safetensors_format import DType, TensorInfo, as_dtype
from tailorkit.checkpoint.source import Source
from tailorkit.errors import CheckpointError, RecipeError, TailorkitError
from tailorkit.recipe import DTYPES, LayerRange, OutputLayer, Recipe

if TYPE_CHECKING:  # a plan is made without torch: only its merges need it
    import torch

    from tailorkit.merge import Gather

PASSTHROUGH = OutputLayer("passthrough", (("", 0),))


@dataclass(frozen=True)
class Input:
    source: Source
    info: TensorInfo

    def view(self) -> torch.Tensor:
        return self.source.view(self.info)


@dataclass(frozen=True, eq=False)
class Fold:
    """A bridge T folded into a merged tensor, in float64: ``T^T W`` for an nn.Linear
    weight (hidden, intermediate) (``left``), ``W T`` for a Conv1D weight (intermediate,
    hidden) or ``b T`` for a bias (``right``)."""

    bridge: torch.Tensor  # (hidden, hidden)
    side: str

    def apply(self, merged: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
        import torch

        from tailorkit.merge import check_finite

        t, m = self.bridge.to(merged.device, torch.float64), merged.double()
        out = (t.T @ m if self.side == "left" else m @ t).to(dtype)
        check_finite(out, where)
        return out


@dataclass(frozen=True, eq=False)
class TensorJob:
    """How to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    layer: OutputLayer  # the method and its coefficients (passthrough for non-layer tensors)
    inputs: tuple[Input, ...]
    base: Input | None = None
    out_index: int | None = None  # output layer index, None for embeddings / head
    fold: Fold | None = None  # a bridge applied after the merge
    gather: Gather | None = None  # the MLP channels kept (width pruning)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_raw_copy(self) -> bool:
        """A passthrough whose bytes do not change: copied without decoding."""
        same = self.inputs[0].info.dtype == self.dtype
        plain = self.fold is None and self.gather is None
        return self.layer.method == "passthrough" and same and plain

    @property
    def where(self) -> str:
        at = (
            f"output layer {self.out_index} ({self.layer.describe()}), "
            if self.out_index is not None
            else ""
        )
        return f"{at}tensor {self.name!r}"

    def all_inputs(self) -> tuple[Input, ...]:
        return self.inputs + ((self.base,) if self.base else ())

    def compute(self) -> torch.Tensor:
        """The whole output tensor in memory: a zero-copy view for raw passthroughs."""
        if self.is_raw_copy:
            return self.inputs[0].view()
        return self.merge([i.view() for i in self.inputs], self.base.view() if self.base else None)

    def merge(self, inputs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """The whole output tensor from its inputs' tensors (mapped views, or device copies)."""
        import torch

        from tailorkit.merge import merge_tensor

        if self.fold is None:
            return merge_tensor(
                self.layer, inputs, base, self.dtype.torch, where=self.where, gather=self.gather
            )
        # Kept channels are rows or columns the fold does not mix: gather first, it is less.
        merged = merge_tensor(
            self.layer, inputs, base, torch.float32, where=self.where, gather=self.gather
        )
        return self.fold.apply(merged, self.dtype.torch, self.where)

    @property
    def torch_free(self) -> bool:
        """Whether :meth:`chunks` makes this tensor without torch (tailorkit/combine.py): a
        fixed linear combination of aligned float tensors, without a fold or a gather."""
        if self.fold is not None or self.gather is not None:
            return False
        inputs = self.all_inputs()
        if any(i.info.start % i.info.dtype.itemsize for i in inputs):
            return False
        dtypes = [self.dtype, *(i.info.dtype for i in inputs)]
        return combine.can_compute(self.layer.method, dtypes)

    def chunks(
        self, buffer: combine.ChunkBuffer | None = None, chunk_elements: int | None = None
    ) -> Iterator[torch.Tensor | memoryview]:
        """The output a chunk at a time, in order (for the streaming writer), made in
        ``buffer`` if given: its bytes where :attr:`torch_free`, else flat tensors; a
        folded tensor in one piece, as the fold's product needs all of it. Chunks hold
        ``chunk_elements`` output elements (combine.CHUNK_ELEMENTS by default)."""
        chunk_elements = chunk_elements or combine.CHUNK_ELEMENTS
        if self.torch_free:
            combination = combine.COMBINATIONS[self.layer.method]
            operands, coefficients = combination(self.layer, self.inputs, self.base)
            return combine.weighted_sum_chunks(
                [i.source.buffer(i.info) for i in operands],
                [i.info.dtype for i in operands],
                coefficients,
                self.dtype,
                buffer or combine.ChunkBuffer(),
                where=self.where,
                checked=self.layer.method != "passthrough",
                chunk_elements=chunk_elements,
            )
        from tailorkit.merge import merge_chunks

        if self.fold is not None:
            return iter([self.compute().reshape(-1)])
        base = self.base.view() if self.base else None
        inputs = [i.view() for i in self.inputs]
        return merge_chunks(
            self.layer,
            inputs,
            base,
            self.dtype.torch,
            where=self.where,
            chunk_elements=chunk_elements,
            gather=self.gather,
            buffer=buffer,
        )

    def check_unchanged(self) -> None:
        """Fail if a shard this job reads changed on disk: a mapped read past the end of a
        file another process truncated would kill the process (SIGBUS), not raise."""
        for i in self.all_inputs():
            i.source.check_unchanged(i.info.file)

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Drop the mapped source pages behind output elements [start, end) (all by default).
        A gathered tensor's output does not map onto its sources' layout: all at the end."""
        if self.gather is not None and (start, end) != (0, None):
            return
        for i in self.all_inputs():
            size = i.info.dtype.itemsize
            i.source.release(i.info, start * size, None if end is None else end * size)


@dataclass
class Plan:
    """A validated recipe bound to its opened sources."""

    recipe: Recipe
    sources: dict[str, Source]
    jobs: list[TensorJob]
    config: dict[str, Any]
    dtype: DType
    layers: list[OutputLayer]

    @property
    def base(self) -> Source:
        return self.sources[self.recipe.base_model]

    @property
    def num_parameters(self) -> int:
        return sum(j.numel for j in self.jobs)

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    @property
    def base_parameters(self) -> int:
        return self.base.num_parameters()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def removed_layer_fraction(self) -> float:
        return 1 - self.num_layers / self.base.num_layers

    @property
    def removed_parameter_fraction(self) -> float:
        return 1 - self.num_parameters / self.base_parameters

    def check_unchanged(self) -> None:
        for s in self.sources.values():
            s.check_unchanged()

    def summary(self) -> str:
        width = self.recipe.width
        return (
            f"{self.num_layers} layers (base has {self.base.num_layers}; "
            f"{self.removed_layer_fraction:.1%} removed), "
            + (f"{width.intermediate_size} MLP channels per layer, " if width else "")
            + f"{self.num_parameters:,} parameters ({self.removed_parameter_fraction:.1%} removed), "
            f"dtype {self.dtype}"
        )


def open_sources(recipe: Recipe) -> dict[str, Source]:
    sources = {}
    for name, ref in recipe.models.items():
        try:
            sources[name] = Source(ref, name)
        except TailorkitError as e:
            raise type(e)(f"model {name!r}: {e}") from e
    return sources


def make_plan(
    recipe: Recipe,
    dtype: str | DType | torch.dtype | None = None,
    sources: dict[str, Source] | None = None,
) -> Plan:
    """Validate ``recipe`` against its sources and list every output tensor."""
    sources = sources or open_sources(recipe)
    base = sources[recipe.base_model]
    _check_compatible(base, sources)
    out_dtype = plan_dtype(dtype or recipe.dtype or base.dtype)

    _check_ranges(recipe, sources)  # before expanding them: [0, 10**12) must not be listed
    layers = recipe.output_layers()
    jobs: list[TensorJob] = []
    for name in base.arch.embedding_tensors:
        jobs.append(_passthrough_job(name, sources[recipe.embeddings_model], base, out_dtype))
    fitted = recipe.fitted() if any(layer.bridge for layer in layers) else {}
    for out_index, layer in enumerate(layers):
        jobs += layer_jobs(out_index, layer, sources, out_dtype, recipe.base_model, fitted).values()
    for name in base.arch.head_tensors:
        jobs.append(_passthrough_job(name, sources[recipe.head_model], base, out_dtype))
    config = _output_config(base, sources, layers, out_dtype)
    if recipe.width is not None:
        set_path(config, intermediate_key(base.config, "width"), recipe.width.intermediate_size)
    return Plan(recipe, sources, jobs, config, out_dtype, layers)


def _check_ranges(recipe: Recipe, sources: dict[str, Source]) -> None:
    for i, entry in enumerate(recipe.layers):
        if isinstance(entry, LayerRange):
            have = sources[entry.model].num_layers
            start, stop = entry.layers
            if stop > have:
                raise RecipeError(
                    f"layers[{i}]: range [{start}, {stop}) of model {entry.model!r} goes past "
                    f"its {have} layers (0-{have - 1})"
                )


def plan_dtype(dtype: str | DType | torch.dtype) -> DType:
    """A dtype name (one of ``recipe.DTYPES``), a DType or a torch.dtype, checked."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise RecipeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return as_dtype(dtype)


def torch_dtype(dtype: str | DType | torch.dtype) -> torch.dtype:
    """``plan_dtype``'s answer as a torch.dtype."""
    return plan_dtype(dtype).torch


def _check_compatible(base: Source, sources: dict[str, Source]) -> None:
    for name, src in sources.items():
        for what, a, b in (
            ("hidden size", base.arch.hidden_size, src.arch.hidden_size),
            ("vocabulary size", base.arch.vocab_size, src.arch.vocab_size),
            ("model_type", base.config.get("model_type"), src.config.get("model_type")),
        ):
            if a != b:
                raise RecipeError(
                    f"model {name!r} has {what} {b}, but the base model {base.name!r} has {a}; "
                    "all models in a recipe must share architecture, hidden size and vocabulary"
                )


def _passthrough_job(name: str, src: Source, base: Source, dtype: DType) -> TensorJob:
    ref = base.tensors[name]
    info = src.tensors.get(name)
    if info is None:
        raise CheckpointError(f"model {src.name!r} has no tensor {name!r} (the base model has it)")
    if info.shape != ref.shape:
        raise RecipeError(
            f"tensor {name!r}: shape {list(info.shape)} in {src.name!r} "
            f"but {list(ref.shape)} in the base"
        )
    return TensorJob(name, info.shape, _out_dtype(info, dtype), PASSTHROUGH, (Input(src, info),))


def _out_dtype(info: TensorInfo, dtype: DType) -> DType:
    # Integer and bool buffers keep their type; only floating tensors are cast.
    return dtype if info.dtype.is_floating_point else info.dtype


def layer_jobs(
    out_index: int,
    layer: OutputLayer,
    sources: dict[str, Source],
    dtype: DType | torch.dtype,
    base_model: str = "base",
    fitted: dict[str, torch.Tensor] | None = None,
) -> dict[str, TensorJob]:
    """The jobs of output layer ``out_index``, by tensor name inside the layer (``mlp.up_proj.
    weight``): what the build writes, and what the trial runner runs a candidate layer with.
    ``base_model`` names the model whose layout and tensor names the output takes;
    ``fitted`` holds the bridges the layer may name."""
    base, dtype = sources[base_model], as_dtype(dtype)
    where = f"output layer {out_index} ({layer.describe()})"
    refs = list(layer.sources) + ([layer.base] if layer.base else [])
    tensors = []
    for model, index in refs:
        try:
            tensors.append(sources[model].layer(index))
        except CheckpointError as e:
            raise RecipeError(f"{where}: {e}") from None
    first = tensors[0]
    # The output layer must look like the base model's layer at the same depth.
    reference = base.layer(min(layer.first[1], base.num_layers - 1))
    for (model, index), layer_tensors in zip(refs, tensors):
        _same_layout(
            where, f"{model}[{index}]", layer_tensors, f"{base.name}[layer layout]", reference
        )
    folds = _folds(layer, first, fitted or {}, where)
    gathers = _gathers(layer, first, where)
    jobs = {}
    for rest, info in first.items():
        inputs = tuple(Input(sources[m], t[rest]) for (m, _), t in zip(layer.sources, tensors))
        base_input = Input(sources[layer.base[0]], tensors[-1][rest]) if layer.base else None
        name = base.arch.layer_name(out_index, rest)
        job_layer = layer if info.dtype.is_floating_point else PASSTHROUGH
        gather = gathers.get(rest)
        jobs[rest] = TensorJob(
            name,
            gather.shape(info.shape) if gather else info.shape,
            _out_dtype(info, dtype),
            job_layer,
            inputs,
            base_input,
            out_index,
            folds.get(rest),
            gather,
        )
    return jobs


def _gathers(layer: OutputLayer, tensors: dict[str, TensorInfo], where: str) -> dict[str, Gather]:
    """The tensors of ``layer`` that keep only its channels, by name inside the layer."""
    if layer.channels is None:
        return {}
    import torch

    from tailorkit.merge import Gather

    try:
        mlp = mlp_channels({name: info.shape for name, info in tensors.items()}, where)
    except CheckpointError as e:
        raise RecipeError(f"width: {e}") from None
    index = layer.channels.index
    if len(index) > mlp.size:
        raise RecipeError(
            f"width.intermediate_size: {len(index)} is more than the {mlp.size} MLP channels "
            f"of {where}; width pruning keeps fewer channels, never more"
        )
    if len(index) and int(index[-1]) >= mlp.size:
        raise RecipeError(
            f"width.channels: {where} keeps channel {int(index[-1])}, but its MLP has "
            f"{mlp.size} (0-{mlp.size - 1})"
        )
    out = {}
    for name, (axis, copies) in mlp.axes.items():
        # A fused projection holds the channels `copies` times, one block after another.
        kept = torch.cat([index + k * mlp.size for k in range(copies)])
        out[name] = Gather(kept, axis)
    return out


def _folds(
    layer: OutputLayer, tensors: dict[str, TensorInfo], fitted: dict, where: str
) -> dict[str, Fold]:
    """The tensors of ``layer`` its bridge folds into, by name inside the layer."""
    if not layer.bridge:
        return {}
    try:
        weight, bias, side = mlp_output(tensors, where)
    except CheckpointError as e:
        raise RecipeError(str(e)) from None
    bridge = fitted.get(layer.bridge)
    if bridge is None:
        have = ", ".join(sorted(fitted)) or "none"
        raise RecipeError(
            f"{where}: bridge {layer.bridge!r} is not among the recipe's fitted tensors ({have})"
        )
    d = tensors[weight].shape[0 if side == "left" else 1]
    if tuple(bridge.shape) != (d, d) or not bridge.is_floating_point():
        raise RecipeError(
            f"{where}: bridge {layer.bridge!r} is {bridge.dtype} of shape {list(bridge.shape)}; "
            f"it must be a floating-point ({d}, {d}) matrix (hidden x hidden)"
        )
    folds = {weight: Fold(bridge, side)}
    if bias:
        folds[bias] = Fold(bridge, "right")
    return folds


def _same_layout(
    where: str, name_a: str, a: dict[str, TensorInfo], name_b: str, b: dict[str, TensorInfo]
) -> None:
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise RecipeError(
            f"{where}: {name_a} and {name_b} have different tensors (e.g. {diff[0]!r})"
        )
    for rest in a:
        if a[rest].shape != b[rest].shape:
            raise RecipeError(
                f"{where}: tensor {rest!r} has shape {list(a[rest].shape)} in {name_a} "
                f"but {list(b[rest].shape)} in {name_b}"
            )


def _output_config(
    base: Source, sources: dict[str, Source], layers: list[OutputLayer], dtype: DType
) -> dict:
    config = copy.deepcopy(base.config)
    set_path(config, base.arch.layer_count_path, len(layers))
    for path in base.arch.per_layer_lists:
        values = []
        for model, index in (layer.first for layer in layers):
            src = sources[model]
            own = path in src.arch.per_layer_lists
            values.append(
                get_path((src if own else base).config, path)[
                    index if own else min(index, base.num_layers - 1)
                ]
            )
        set_path(config, path, values)
    name = str(dtype)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return config
