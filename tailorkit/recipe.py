"""The Recipe: a small, serialisable description of a tailored model.

Every method produces one and every consumer (build, assemble, model card)
reads one.  The YAML form is a user-facing contract (docs/recipe.md); this
module parses it strictly — unknown keys are an error — and expands it into
``OutputLayer`` records, one per output layer: the one spec of an output layer
that the planner turns into tensors, the trial runner into a forward step and
the methods build directly (``Recipe.from_layers`` writes them back).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tailorkit.errors import RecipeError, validation_message
from tailorkit.version import __version__

FITTED_FILE = "recipe.safetensors"  # the tensors file's default name, beside the recipe
WIDTH_TENSOR = "width.mlp"  # the fitted tensor of kept MLP channels a method writes
BRIDGE = "fitted tensor T folded into this layer's MLP output projection (W <- T^T W)"
MERGE_METHODS = ("passthrough", "linear", "task_arithmetic", "ties", "slerp", "laco")
DTYPES = ("float32", "bfloat16", "float16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class LayerRef(_Strict):
    """One layer of one source model, with an optional weight."""

    model: str = Field(alias="from", description="name of a model in `models`")
    layer: int = Field(ge=0, description="layer index in that model, from 0")
    weight: float | None = Field(
        default=None, description="weight in a linear or task-arithmetic merge"
    )
    bridge: str | None = Field(default=None, description=BRIDGE)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"weight must be a finite number, got {v}")
        return v


class LayerRange(_Strict):
    """Shorthand: layers [start, stop) of one model passed through."""

    model: str = Field(alias="from")
    layers: tuple[int, int] = Field(description="half-open range [start, stop), like range()")
    bridge: str | None = None

    @field_validator("bridge")
    @classmethod
    def _no_bridge(cls, v: str | None) -> None:
        if v is not None:
            raise ValueError("a bridge sits on one layer ({from, layer}) or a merge, not a range")

    @field_validator("layers")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layers must be [start, stop) with 0 <= start < stop, got {list(v)}")
        return v


class Merge(_Strict):
    """One output layer computed from several source layers."""

    merge: Literal[MERGE_METHODS]
    sources: list[LayerRef] = Field(min_length=1)
    base: LayerRef | None = None
    lambda_: float | None = Field(default=None, alias="lambda", description="task-vector scale")
    density: float | None = Field(default=None, gt=0, le=1, description="fraction kept by ties")
    t: float | None = Field(
        default=None, ge=0, le=1, description="slerp position, 0 = first source"
    )
    bridge: str | None = Field(default=None, description=BRIDGE)

    @field_validator("lambda_")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"lambda must be a finite number, got {v}")
        return v

    @model_validator(mode="after")
    def _fields_fit_method(self) -> Merge:
        allowed = {
            "passthrough": set(),
            "linear": set(),
            "task_arithmetic": {"base", "lambda_"},
            "ties": {"base", "lambda_", "density"},
            "slerp": {"t"},
            "laco": set(),
        }[self.merge]
        for name in ("base", "lambda_", "density", "t"):
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(f"field '{name.rstrip('_')}' is not used by merge '{self.merge}'")
        needs_base = self.merge in ("task_arithmetic", "ties")
        if needs_base and self.base is None:
            raise ValueError(
                f"merge '{self.merge}' needs a 'base' layer to take task vectors against"
            )
        counts = {"passthrough": (1, 1), "slerp": (2, 2), "laco": (2, None)}
        lo, hi = counts.get(self.merge, (1, None))
        n = len(self.sources)
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise ValueError(f"merge '{self.merge}' takes {want} source(s), got {n}")
        if self.merge in ("slerp", "laco", "passthrough", "ties") and any(
            s.weight is not None for s in self.sources
        ):
            raise ValueError(f"merge '{self.merge}' does not take per-source weights")
        if self.merge == "linear":
            total = sum(1.0 if s.weight is None else s.weight for s in self.sources)
            if total == 0:
                raise ValueError("linear merge weights sum to 0; they are normalised to sum 1")
        return self


class TensorsFile(_Strict):
    """Fitted tensors (bridges) in a safetensors file beside the recipe."""

    file: str = Field(description="safetensors file, relative to the recipe's folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the file's digest")

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        parts = PurePosixPath(v).parts
        if not parts or v.startswith("/") or ".." in parts or "\\" in v or "\0" in v:
            raise ValueError(f"file must be a path inside the recipe's folder, got {v!r}")
        return v


class Width(_Strict):
    """Uniform width pruning: every output layer's MLP keeps ``intermediate_size`` of its
    channels, its own ones, listed in a fitted tensor."""

    intermediate_size: int = Field(gt=0, description="MLP channels every output layer keeps")
    channels: str = Field(
        description="fitted int tensor (output layers x intermediate_size): the channels "
        "each output layer keeps, ascending"
    )


@dataclass(frozen=True, eq=False)
class Channels:
    """The MLP channels one output layer keeps: ascending int64 indices, compared and hashed
    by content (so layers that keep the same channels share caches)."""

    index: Any  # torch.Tensor (N,) int64
    key: str

    @classmethod
    def of(cls, index: Any) -> Channels:
        index = index.detach().to("cpu").long().contiguous()
        digest = hashlib.sha256(index.numpy().tobytes()).hexdigest()[:16]
        return cls(index, f"{len(index)}:{digest}")

    def __len__(self) -> int:
        return len(self.index)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channels) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Channels({self.key})"


_TAGS = ("Merge", "LayerRange", "LayerRef")


def _entry_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        keys = set(v)
    elif isinstance(v, BaseModel):
        return {Merge: "Merge", LayerRange: "LayerRange", LayerRef: "LayerRef"}.get(type(v))
    else:
        return None
    if "merge" in keys:
        return "Merge"
    if "layers" in keys:
        return "LayerRange"
    if "layer" in keys:
        return "LayerRef"
    return None


LayerEntry = Annotated[
    Union[
        Annotated[Merge, Tag("Merge")],
        Annotated[LayerRange, Tag("LayerRange")],
        Annotated[LayerRef, Tag("LayerRef")],
    ],
    Discriminator(
        _entry_kind,
        custom_error_type="layer_entry",
        custom_error_message="a layer entry needs 'merge', 'layers' (a range) or 'layer'",
    ),
]


@dataclass(frozen=True)
class OutputLayer:
    """One output layer, expanded: a method, its inputs and its parameters (hashable)."""

    method: str
    sources: tuple[tuple[str, int], ...]  # (model, layer)
    weights: tuple[float, ...] = ()  # effective coefficients, meaning depends on method
    base: tuple[str, int] | None = None
    params: tuple[tuple[str, float], ...] = ()  # (name, value): lambda, density, t
    bridge: str | None = None  # a fitted tensor folded into the MLP output projection
    channels: Channels | None = None  # the MLP channels kept (width pruning); None: all

    @property
    def first(self) -> tuple[str, int]:
        """The source whose per-layer config settings (layer_types, ...) this layer takes."""
        return self.sources[0]

    def param(self, name: str) -> float:
        return dict(self.params)[name]

    def describe(self) -> str:
        """One line for tables and errors, e.g. ``linear(a[3] x0.6, b[3] x0.4)``."""
        refs = [f"{m}[{i}]" for m, i in self.sources]
        if self.method == "linear":
            refs = [f"{r} x{w:.3g}" for r, w in zip(refs, self.weights)]
        if self.base:
            refs.insert(0, f"base {self.base[0]}[{self.base[1]}]")
        refs += [f"{k}={v:.3g}" for k, v in self.params]
        text = refs[0] if self.method == "passthrough" else f"{self.method}({', '.join(refs)})"
        return f"{text} + {self.bridge}" if self.bridge else text

    def entry(self) -> dict[str, Any]:
        """This layer as a recipe entry, which ``Recipe.output_layers`` expands back into it."""
        refs: list[dict[str, Any]] = [{"from": m, "layer": i} for m, i in self.sources]
        bridge = {"bridge": self.bridge} if self.bridge else {}
        if self.method == "passthrough":
            return refs[0] | bridge
        unequal = self.method == "linear" and len(set(self.weights)) > 1
        scaled = self.method == "task_arithmetic" and any(w != 1.0 for w in self.weights)
        if unequal or scaled:
            refs = [dict(r, weight=w) for r, w in zip(refs, self.weights)]
        entry: dict[str, Any] = {"merge": self.method, "sources": refs}
        if self.base:
            entry["base"] = {"from": self.base[0], "layer": self.base[1]}
        return entry | dict(self.params) | bridge


class Recipe(_Strict):
    """A tailored model: source models, output layers in order, and where the rest comes from."""

    models: dict[str, str] = Field(
        min_length=1, description="name -> local directory or Hub repo id"
    )
    base: str | None = Field(
        default=None, description="model whose config, tokenizer and non-layer tensors are used"
    )
    dtype: Literal[DTYPES] | None = None
    tensors: TensorsFile | None = None
    width: Width | None = None
    layers: list[LayerEntry] = Field(min_length=1)
    embeddings: str | None = None
    head: str | None = None
    # Not part of the recipe's value: where its tensors file is, or the tensors themselves.
    _folder: Path | None = PrivateAttr(None)
    _fitted: dict | None = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    @model_validator(mode="after")
    def _names_exist(self) -> Recipe:
        names = set(self.models)
        for key in ("base", "embeddings", "head"):
            value = getattr(self, key)
            if value is not None and value not in names:
                raise ValueError(
                    f"{key}: model {value!r} is not in models ({', '.join(self.models)})"
                )
        for i, entry in enumerate(self.layers):
            refs = (
                [entry]
                if not isinstance(entry, Merge)
                else [*entry.sources, *filter(None, [entry.base])]
            )
            for ref in refs:
                if ref.model not in names:
                    raise ValueError(
                        f"layers[{i}]: model {ref.model!r} is not in models "
                        f"({', '.join(self.models)})"
                    )
            if entry.bridge and self.tensors is None:
                raise ValueError(
                    f"layers[{i}].bridge: {entry.bridge!r} names a fitted tensor, but the "
                    "recipe has no tensors file (tensors: {file, sha256})"
                )
        if self.width and self.tensors is None:
            raise ValueError(
                f"width.channels: {self.width.channels!r} names a fitted tensor, but the "
                "recipe has no tensors file (tensors: {file, sha256})"
            )
        return self

    # -- names ---------------------------------------------------------------------------
    @property
    def base_model(self) -> str:
        return self.base or next(iter(self.models))

    @property
    def embeddings_model(self) -> str:
        return self.embeddings or self.base_model

    @property
    def head_model(self) -> str:
        return self.head or self.base_model

    # -- expansion -----------------------------------------------------------------------
    def output_layers(self) -> list[OutputLayer]:
        """The layer list with ranges expanded and merge coefficients made explicit."""
        out: list[OutputLayer] = []
        for entry in self.layers:
            if isinstance(entry, LayerRange):
                out += [
                    OutputLayer("passthrough", ((entry.model, i),)) for i in range(*entry.layers)
                ]
            elif isinstance(entry, LayerRef):
                ref = ((entry.model, entry.layer),)
                out.append(OutputLayer("passthrough", ref, bridge=entry.bridge))
            else:
                out.append(replace(_expand_merge(entry), bridge=entry.bridge))
        if self.width is None:
            return out
        return [replace(layer, channels=c) for layer, c in zip(out, self._channels(len(out)))]

    def _channels(self, num_layers: int) -> list[Channels]:
        """Each output layer's kept channels, from the width tensor, checked."""
        import torch

        width = self.width
        tensor = self.fitted().get(width.channels)
        where = f"width.channels: {width.channels!r}"
        if tensor is None:
            have = ", ".join(sorted(self.fitted())) or "none"
            raise RecipeError(f"{where} is not among the recipe's fitted tensors ({have})")
        want = (num_layers, width.intermediate_size)
        if tensor.dtype not in (torch.int32, torch.int64) or tuple(tensor.shape) != want:
            raise RecipeError(
                f"{where} is {tensor.dtype} of shape {list(tensor.shape)}; it must be int32 of "
                f"shape {list(want)} (output layers x width.intermediate_size)"
            )
        rows = tensor.long()
        if len(rows) and rows.shape[1] and int(rows.min()) < 0:
            raise RecipeError(f"{where} has a negative channel index ({int(rows.min())})")
        steps = rows[:, 1:] - rows[:, :-1]
        if steps.numel() and int(steps.min()) <= 0:
            layer, at = (int(i) for i in (steps <= 0).nonzero()[0])
            raise RecipeError(
                f"{where}: output layer {layer} lists channel {int(rows[layer, at + 1])} after "
                f"{int(rows[layer, at])}; each row must be strictly ascending (no repeats)"
            )
        return [Channels.of(row) for row in rows]

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def identity(cls, model: str, num_layers: int) -> Recipe:
        """Every layer of ``model`` passed through: the dense model as a recipe."""
        return cls.from_dict(
            {"models": {"base": model}, "layers": [{"from": "base", "layers": [0, num_layers]}]}
        )

    @classmethod
    def from_layers(
        cls,
        models: dict[str, str],
        layers: Sequence[OutputLayer],
        dtype: str | None = None,
        fitted: dict | None = None,
    ) -> Recipe:
        """The recipe whose expansion is ``layers``; runs of layers one model passes through
        become ranges. ``fitted``: the tensors the layers' bridges name."""
        data = {"models": dict(models)} | ({"dtype": dtype} if dtype else {})
        return cls._of(data, layers, fitted)

    def with_layers(self, layers: Sequence[OutputLayer], fitted: dict | None = None) -> Recipe:
        """This recipe (models, base, dtype, embeddings, head) with ``layers`` instead (their
        kept channels become its width)."""
        data = self.to_dict()
        data.pop("tensors", None)
        data.pop("width", None)
        return Recipe._of(data, layers, fitted)

    @classmethod
    def _of(cls, data: dict, layers: Sequence[OutputLayer], fitted: dict | None) -> Recipe:
        fitted = dict(fitted or {})
        widths = {len(layer.channels) if layer.channels else None for layer in layers}
        if widths != {None}:
            import torch

            if len(widths) > 1:
                raise RecipeError(
                    "width: every output layer must keep the same number of MLP channels "
                    f"(the config has one intermediate_size), got {sorted(widths, key=str)}"
                )
            n = widths.pop()
            data = data | {"width": {"intermediate_size": n, "channels": WIDTH_TENSOR}}
            fitted[WIDTH_TENSOR] = torch.stack([layer.channels.index for layer in layers]).int()
        entries: list[dict[str, Any]] = []
        for layer in layers:
            entry = layer.entry()
            last = entries[-1] if entries else {}
            plain = not ({"merge", "bridge"} & (set(entry) | set(last)))
            if "layer" in entry and plain and last.get("from") == entry["from"]:
                start, stop = last.get("layers") or (last["layer"], last["layer"] + 1)
                if entry["layer"] == stop:
                    entries[-1] = {"from": entry["from"], "layers": [start, stop + 1]}
                    continue
            entries.append(entry)
        if not fitted:
            return cls.from_dict(data | {"layers": entries})
        placeholder = {"file": FITTED_FILE, "sha256": "0" * 64}
        return cls.from_dict(data | {"layers": entries, "tensors": placeholder}).with_fitted(fitted)

    @property
    def folder(self) -> Path | None:
        """The folder the recipe was loaded from (its tensors file is there), if any."""
        return self._folder

    # -- fitted tensors ------------------------------------------------------------------
    def with_fitted(self, tensors: dict) -> Recipe:
        """This recipe with ``tensors`` (name -> tensor) as its fitted tensors file."""
        from tailorkit.checkpoint import fitted

        with tempfile.TemporaryDirectory(prefix="tailorkit-fitted-") as tmp:
            digest = fitted.digest(tensors, Path(tmp) / FITTED_FILE)
        file = self.tensors.file if self.tensors else FITTED_FILE
        out = self.model_copy(update={"tensors": TensorsFile(file=file, sha256=digest)})
        out._fitted = dict(tensors)
        return out

    def fitted(self) -> dict:
        """The fitted tensors the layers name (read from the file, checked, once)."""
        if self.tensors is None:
            return {}
        if self._fitted is None:
            from tailorkit.checkpoint import fitted

            if self._folder is None:
                raise RecipeError(
                    f"tensors: the recipe names {self.tensors.file}, but it was not loaded "
                    "from a file, so there is no folder to find it in"
                )
            self._fitted = fitted.read(
                self._folder / self.tensors.file, self.tensors.sha256, "tensors"
            )
        return self._fitted

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML to ``path``, and its fitted tensors file beside it."""
        path = Path(path)
        if self.tensors is not None:
            from tailorkit.checkpoint import fitted

            target = path.parent / self.tensors.file
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = fitted.write(self.fitted(), target)
            if digest != self.tensors.sha256:
                raise RecipeError(
                    f"tensors: writing {self.tensors.file} gave sha256 {digest}, not the "
                    f"recipe's {self.tensors.sha256}"
                )
        path.write_text(self.to_yaml())
        return path

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The YAML text; with ``path``, also written there (and the fitted tensors beside
        it, as :meth:`save` does)."""
        text = f"# tailorkit {__version__} recipe\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, default_flow_style=None, width=100
        )
        if path is not None:
            self.save(path)
        return text

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def fingerprint(self) -> str:
        """A stable hash of the recipe's content, for caches and provenance."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe is a mapping with 'models' and 'layers'")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(
                validation_message(
                    f"{where}: invalid recipe",
                    e,
                    "unknown key (not part of the recipe format)",
                    skip=_TAGS,
                )
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a YAML or JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        kind = "JSON" if path.suffix == ".json" else "YAML"
        try:
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except RecursionError:
            raise RecipeError(f"{path}: not valid {kind}: nested too deeply") from None
        except Exception as e:
            # Besides JSONDecodeError and YAMLError, the parsers raise what building a value
            # raises: ValueError for a date like 2001-13-45, `!!int abc` or an integer of
            # 5,000 digits, AttributeError for `!!timestamp abc`. safe_load builds plain
            # data only, so whatever it raises means the text is not a valid document.
            raise RecipeError(f"{path}: not valid {kind}: {type(e).__name__}: {e}") from None
        recipe = cls.from_dict(data, where=str(path))
        recipe._folder = path.parent
        return recipe

    def plan(self, dtype: str | None = None):
        """Open the sources and validate against them; returns a ``Plan`` (reads headers only)."""
        from tailorkit.plan import make_plan

        return make_plan(self, dtype=dtype)


def _expand_merge(m: Merge) -> OutputLayer:
    sources = tuple((s.model, s.layer) for s in m.sources)
    base = (m.base.model, m.base.layer) if m.base else None
    raw = [1.0 if s.weight is None else s.weight for s in m.sources]
    if m.merge == "linear":
        total = sum(raw)
        return OutputLayer("linear", sources, tuple(w / total for w in raw))
    if m.merge == "task_arithmetic":
        return OutputLayer(
            "task_arithmetic", sources, tuple(raw), base, (("lambda", _or(m.lambda_, 1.0)),)
        )
    if m.merge == "ties":
        params = (("lambda", _or(m.lambda_, 1.0)), ("density", _or(m.density, 1.0)))
        return OutputLayer("ties", sources, (), base, params)
    if m.merge == "slerp":
        return OutputLayer("slerp", sources, (), None, (("t", _or(m.t, 0.5)),))
    return OutputLayer(m.merge, sources)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
