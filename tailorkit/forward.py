"""Run a causal LM one decoder layer at a time.

The model runs once on a calibration batch while hooks record, for every decoder
layer, its input hidden state and the keyword arguments the model passed it (rotary
position embeddings, the mask for that layer's attention type, ...). A modified model
is then a list of steps, each a decoder layer module called with substituted
parameters (``torch.func.functional_call``: nothing is copied) and the recorded
arguments of its *source* layer, from the recorded state where the change begins
(:mod:`tailorkit.trials`). This works for every architecture whose decoder layers take
``(hidden_states, **kwargs)``, with no per-model code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tailorkit.assembly import assemble
from tailorkit.checkpoint.source import Source
from tailorkit.devices import resolve_device
from tailorkit.errors import CheckpointError
from tailorkit.recipe import Recipe

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


@dataclass
class Step:
    """One decoder layer of a modified model.

    ``source`` is the original layer index whose module and recorded arguments
    are used (for a merged layer: its first source, as the recipe's config
    re-indexing does); ``params`` replaces that module's parameters when given.
    """

    source: int
    params: Mapping[str, torch.Tensor] | None = None
    nbytes: int = 0  # memory the params hold of their own (views of mapped shards: none)


@dataclass
class Trace:
    """One calibration batch run through the original model.

    ``states[l]`` is the input of layer ``l`` for ``l < L`` and ``states[L]`` the
    output of the last layer (before the final norm), each ``(B, T, d)``.
    """

    input_ids: torch.Tensor
    states: list[torch.Tensor]
    kwargs: list[dict] = field(repr=False)


class DecoderStack:
    """A loaded causal LM seen as embeddings, a list of decoder layers, a final norm, a head."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers, parent = _find_layers(model)
        self.norm = _final_norm(parent)
        self.head = model.get_output_embeddings()

    @classmethod
    def load(cls, source: Source, dtype: str = "float32", device=None) -> DecoderStack:
        """``source`` assembled as it is (weights mapped, not copied, where the dtype
        allows), in ``dtype``, on ``device``."""
        model = assemble(Recipe.identity(source.ref, source.num_layers), dtype=dtype)
        return cls(model.to(resolve_device(device)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def trace(self, input_ids: torch.Tensor) -> Trace:
        """Run the model on ``input_ids`` ``(B, T)``, recording every layer's input and arguments."""
        states: list[torch.Tensor | None] = [None] * (self.num_layers + 1)
        kwargs: list[dict | None] = [None] * self.num_layers

        def before(index):
            def hook(module, args, kw):
                hidden = args[0] if args else kw["hidden_states"]
                states[index] = hidden.detach()
                kwargs[index] = {k: v for k, v in kw.items() if k != "hidden_states"}

            return hook

        def after(module, args, kw, output):
            states[-1] = _hidden(output).detach()

        handles = [
            layer.register_forward_pre_hook(before(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        handles.append(self.layers[-1].register_forward_hook(after, with_kwargs=True))
        try:
            self.model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(s is None for s in states) or any(k is None for k in kwargs):
            raise CheckpointError(
                f"{type(self.model).__name__} did not call all of its {self.num_layers} decoder "
                "layers in order; tailorkit cannot run it layer by layer"
            )
        return Trace(input_ids, states, kwargs)

    @torch.no_grad()
    def run(self, state: torch.Tensor, steps: Sequence[Step], trace: Trace) -> torch.Tensor:
        """Apply ``steps`` in order to ``state``; return the last hidden state (before the norm)."""
        for step in steps:
            module = self.layers[step.source]
            kw = trace.kwargs[step.source]
            if step.params is None:
                out = module(state, **kw)
            else:
                with _conv1d_sizes(module, step.params):
                    out = torch.func.functional_call(module, dict(step.params), (state,), kw)
            state = _hidden(out)
        return state

    @torch.no_grad()
    def final(self, state: torch.Tensor) -> torch.Tensor:
        """The hidden state the LM head sees: the final norm applied."""
        return self.norm(state) if self.norm is not None else state

    @torch.no_grad()
    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """What the model's forward returns as logits (Gemma 2's final soft-capping included)."""
        return self._capped(self.head(self.final(state)))

    @torch.no_grad()
    def token_logits(self, state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What ``logits`` gives at tokens ``ids`` (K,) only, (..., K), for K/V of its cost."""
        logits = self.final(state) @ self.head.weight[ids].T
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias[ids]
        return self._capped(logits)

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        cap = getattr(
            getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping", None
        )
        return torch.tanh(logits / cap) * cap if cap else logits


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _find_layers(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder layer list (the longest ModuleList of like modules) and its parent."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), name)
    if best is None:
        raise CheckpointError(f"{type(model).__name__} has no list of decoder layers")
    name = best[1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return model.get_submodule(name), parent


def _final_norm(parent: nn.Module) -> nn.Module | None:
    for name in FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@contextlib.contextmanager
def _conv1d_sizes(module: nn.Module, params: Mapping[str, torch.Tensor]):
    """GPT-2's Conv1D reshapes its output to its stored width ``nf``, not its weight's: with
    width-pruned weights (fewer MLP channels) it must say the new width while they run."""
    changed = []
    for name, sub in module.named_modules():
        weight = params.get(f"{name}.weight" if name else "weight")
        nf = getattr(sub, "nf", None)
        if isinstance(nf, int) and weight is not None and weight.dim() == 2:
            if weight.shape[1] != nf:
                changed.append((sub, nf))
                sub.nf = weight.shape[1]
    try:
        yield
    finally:
        for sub, nf in changed:
            sub.nf = nf
