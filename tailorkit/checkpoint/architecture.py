"""What tailorkit needs to know about a model's architecture, from config.json alone.

No model class is imported: a decoder layer tensor is any name of the form
``<prefix>.<i>.<rest>`` where ``<prefix>`` ends in a layer-list name
(``layers``, ``h``, ``blocks``) and the indices run over exactly the layer
count the config states.  Everything else is a non-layer tensor: embeddings
(names containing ``embed``, ``wte``, ``wpe``) or the head (final norm, LM head).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tailorkit.errors import CheckpointError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
_LAYER_NAME = re.compile(
    r"^(?P<prefix>(?:.+\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_EMBEDDING_MARKERS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class Architecture:
    """The layer layout of one checkpoint."""

    layer_prefix: str  # e.g. "model.layers"
    num_layers: int
    layer_count_path: tuple[
        str, ...
    ]  # where the count lives in config.json, e.g. ("num_hidden_layers",)
    per_layer_lists: tuple[tuple[str, ...], ...]  # config paths of lists indexed by layer
    tied_embeddings: bool
    hidden_size: int | None
    vocab_size: int | None
    layer_tensors: dict[int, dict[str, str]] = field(repr=False)  # layer -> {rest: full name}
    embedding_tensors: tuple[str, ...] = ()
    head_tensors: tuple[str, ...] = ()

    def layer_name(self, index: int, rest: str) -> str:
        return f"{self.layer_prefix}.{index}.{rest}"


def text_config(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The part of the config that describes the decoder, and its path.

    Multimodal configs (Gemma 3, Llava, ...) nest the language model under
    ``text_config``; plain causal LMs keep everything at the top level.
    """
    if not any(k in config for k in LAYER_COUNT_KEYS) and isinstance(
        config.get("text_config"), dict
    ):
        return config["text_config"], ("text_config",)
    return config, ()


def detect(config: dict[str, Any], tensor_names: list[str], where: str) -> Architecture:
    """Find the decoder layers of a checkpoint from its config and tensor names."""
    decoder, base_path = text_config(config)
    count_key = next((k for k in LAYER_COUNT_KEYS if isinstance(decoder.get(k), int)), None)
    if count_key is None:
        raise CheckpointError(
            f"{where}: config.json has no layer count (looked for {', '.join(LAYER_COUNT_KEYS)})"
        )
    num_layers = decoder[count_key]

    by_prefix: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for name in tensor_names:
        m = _LAYER_NAME.match(name)
        if m:
            if len(m["index"]) > 9:  # no model has a billion layers; int() of 5,000 digits fails
                raise CheckpointError(f"{where}: tensor {name[:200]!r} has an absurd layer index")
            by_prefix[m["prefix"]][int(m["index"])][m["rest"]] = name
    # Count first: config.json comes from strangers, and set(range(10**12)) would not end.
    matching = [
        p
        for p, layers in by_prefix.items()
        if len(layers) == num_layers and set(layers) == set(range(num_layers))
    ]
    if len(matching) != 1:
        found = {p: len(layers) for p, layers in by_prefix.items()}
        raise CheckpointError(
            f"{where}: cannot find the decoder layers: config.json says {count_key}={num_layers}, "
            f"but the tensor names give layer lists {found or 'none'}"
        )
    prefix = matching[0]
    layer_names = {n for layer in by_prefix[prefix].values() for n in layer.values()}
    others = [n for n in tensor_names if n not in layer_names]
    embeddings = tuple(n for n in others if any(m in n for m in _EMBEDDING_MARKERS))
    head = tuple(n for n in others if n not in embeddings)

    per_layer = tuple(
        (*base_path, k)
        for k, v in decoder.items()
        if isinstance(v, list) and len(v) == num_layers and num_layers > 1
    )
    tied = config.get("tie_word_embeddings", decoder.get("tie_word_embeddings", True))
    return Architecture(
        layer_prefix=prefix,
        num_layers=num_layers,
        layer_count_path=(*base_path, count_key),
        per_layer_lists=per_layer,
        tied_embeddings=bool(tied),
        hidden_size=next(
            (decoder[k] for k in HIDDEN_SIZE_KEYS if isinstance(decoder.get(k), int)), None
        ),
        vocab_size=decoder.get("vocab_size", config.get("vocab_size")),
        layer_tensors={i: dict(t) for i, t in by_prefix[prefix].items()},
        embedding_tensors=embeddings,
        head_tensors=head,
    )


def get_path(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for key in path:
        node = node[key]
    return node


def set_path(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


# The MLP's output projection, into which a bridge T folds: "left" weights are nn.Linear's
# (hidden, intermediate), W <- T^T W; "right" ones GPT-2's Conv1D (intermediate, hidden),
# W <- W T. A bias b (either kind) becomes b T.
MLP_OUTPUTS = (("mlp.down_proj", "left"), ("mlp.c_proj", "right"))


def mlp_output(layer_tensors: Iterable[str], where: str) -> tuple[str, str | None, str]:
    """(weight name, bias name or None, side) of a layer's MLP output projection, where a
    bridge folds: an error where a norm follows the MLP."""
    names = set(layer_tensors)
    if "post_feedforward_layernorm.weight" in names:
        raise CheckpointError(
            f"{where}: a norm follows this layer's MLP (Gemma 2/3's post-feedforward norm), "
            "so a linear bridge cannot be folded into its output projection exactly; "
            "bridges are for architectures whose MLP output goes straight into the residual"
        )
    return mlp_projection(names, where)


def mlp_projection(layer_tensors: Iterable[str], where: str) -> tuple[str, str | None, str]:
    """(weight name, bias name or None, side) of a layer's MLP output projection."""
    names = set(layer_tensors)
    for prefix, side in MLP_OUTPUTS:
        if f"{prefix}.weight" in names:
            bias = f"{prefix}.bias" if f"{prefix}.bias" in names else None
            return f"{prefix}.weight", bias, side
    known = ", ".join(f"{p}.weight" for p, _ in MLP_OUTPUTS)
    raise CheckpointError(f"{where}: no MLP output projection to fold a bridge into ({known})")


# The tensors of a layer's MLP with one axis over its intermediate channels, and which axis:
# what width pruning gathers. A fused gate+up projection (Phi-3) holds the channels twice.
MLP_CHANNEL_AXES = {
    "mlp.gate_proj.weight": 0,  # Llama, Mistral, Qwen, Gemma: nn.Linear (out, in)
    "mlp.gate_proj.bias": 0,
    "mlp.up_proj.weight": 0,
    "mlp.up_proj.bias": 0,
    "mlp.down_proj.weight": 1,
    "mlp.gate_up_proj.weight": 0,  # Phi-3: gate and up stacked, (2 x intermediate, hidden)
    "mlp.c_fc.weight": 1,  # GPT-2: Conv1D (in, out)
    "mlp.c_fc.bias": 0,
    "mlp.c_proj.weight": 0,
}
MLP_FUSED = {"mlp.gate_up_proj.weight": 2}
# Config keys of the MLP width, in the order they are looked for.
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class MlpChannels:
    """Where a layer's MLP channels are: ``axes`` (name inside the layer -> (axis, copies))
    over ``size`` channels."""

    axes: dict[str, tuple[int, int]]
    size: int

    def per_channel(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Parameters one channel holds in this layer (what keeping one fewer removes)."""
        total = 0
        for name, (axis, copies) in self.axes.items():
            numel = 1
            for n in shapes[name]:
                numel *= n
            total += numel // (shapes[name][axis] // copies)
        return total


def mlp_channels(shapes: dict[str, tuple[int, ...]], where: str) -> MlpChannels:
    """The MLP channel axes of a layer whose tensors (name inside the layer -> shape) are
    ``shapes``: an error naming the layer when uniform width pruning does not apply."""
    found = {
        name: (axis, MLP_FUSED.get(name, 1))
        for name, axis in MLP_CHANNEL_AXES.items()
        if name in shapes
    }
    if not any(".weight" in name for name in found) or len(found) < 2:
        raise CheckpointError(
            f"{where}: no MLP projections that width pruning knows (gate/up/down_proj, "
            "gate_up_proj, c_fc/c_proj); width pruning supports dense MLPs of those layouts"
        )
    sizes = {shapes[n][axis] // copies for n, (axis, copies) in found.items()}
    if len(sizes) != 1:
        raise CheckpointError(
            f"{where}: the MLP tensors disagree on the number of channels ({sorted(sizes)})"
        )
    return MlpChannels(found, sizes.pop())


def intermediate_key(config: dict[str, Any], where: str) -> tuple[str, ...]:
    """The config path of the MLP width, which a width-pruned checkpoint rewrites: an error
    when one number cannot describe the MLPs (experts, per-layer sizes)."""
    decoder, base_path = text_config(config)
    moe = [k for k in MOE_KEYS if decoder.get(k)]
    if moe:
        raise CheckpointError(
            f"{where}: config.json has {moe[0]}: a mixture of experts, whose MLP width "
            "uniform width pruning cannot express in the config"
        )
    for key in INTERMEDIATE_KEYS:
        if key in decoder:
            if isinstance(decoder[key], list):
                raise CheckpointError(
                    f"{where}: config.json gives {key} per layer; uniform width pruning needs "
                    "one number for every layer"
                )
            return (*base_path, key)
    raise CheckpointError(
        f"{where}: config.json has no MLP width (looked for {', '.join(INTERMEDIATE_KEYS)}), so "
        "a width-pruned checkpoint could not say its new size"
    )
