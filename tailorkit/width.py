"""Width pruning: every output layer's MLP keeps the same number of its own channels.

The same number in every layer, so the output config stays standard (one
``intermediate_size``); each layer its own channels, so a layer keeps what it uses.
A channel j of a layer's MLP adds ``a_j * W[:, j]`` to the residual stream (a_j its
activation at the input of the down projection W). Its importance is ``E|a_j|``, its mean
absolute activation over calibration tokens (Minitron's ranking, Muralidharan et al.
2024), measured on the pruned model as it stands (merged, stitched and bridged layers
below included), with the attention-sink tokens left out since their activations are
outliers that would rank channels for a handful of tokens. One forward pass, no gradients.
Measured against the scores that also weigh what the channel writes
(benchmarks/width_importance.py, SmolLM2, width only): ``E|a_j| * |W[:, j]|`` was worse by
0.03 and 0.16 nats of held-out log-perplexity at 0.25 and 0.35 removed, ``E[a_j^2] *
|W[:, j]|^2`` tied with ``E|a_j|`` (+0.03, -0.02); a random ranking is catastrophic (12-13
nats). The simplest score that is as good is the one kept.

How much of a parameter budget width should take against depth is measured, not assumed:
:func:`tailorkit.prune` with ``width_share="auto"`` scores a few splits (``SPLITS``) with the
trial runner's KL against the dense model and keeps the best. The KL is taken on
calibration batches held back from the importance (``held_back``): channels chosen on the
same tokens they are scored on look better than they are, and the splits that prune width
the most would win for that reason alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from tailorkit.checkpoint.architecture import mlp_channels, mlp_projection
from tailorkit.checkpoint.source import Source
from tailorkit.errors import CheckpointError, MethodError
from tailorkit.methods.common import layer_fraction
from tailorkit.recipe import Channels, OutputLayer
from tailorkit.trials import TrialRunner

SPLITS = (0.0, 0.25, 0.5, 0.75, 1.0)  # width shares `width_share="auto"` compares
ALIGN = 8  # kept channels are rounded to a multiple of this (tensor-core friendly shapes)
HELD_BACK_EVERY = 4  # width="auto" scores splits on every 4th calibration batch
IMPORTANCE = "mean |activation| at the down projection's input (attention sinks left out)"


def channels_per_layer(source: Source) -> int:
    """The MLP channels of one layer of ``source`` (an error where width does not apply)."""
    return _mlp(source)[0].size


def _mlp(source: Source):
    shapes = {name: info.shape for name, info in source.layer(0).items()}
    try:
        return mlp_channels(shapes, f"model {source.name!r}, layer 0"), shapes
    except CheckpointError as e:
        raise MethodError(str(e)) from None


def kept_channels(source: Source, num_layers: int, remove: int) -> int:
    """How many MLP channels each of ``num_layers`` layers keeps so that about ``remove``
    parameters go: rounded to a multiple of ``ALIGN``; an error when the MLPs cannot give
    that many."""
    mlp, shapes = _mlp(source)
    size, per_channel = mlp.size, mlp.per_channel(shapes) * num_layers
    keep = size - remove / per_channel
    if size >= 4 * ALIGN:
        keep = ALIGN * round(keep / ALIGN)
    keep = round(keep)
    if keep < 1:
        most = (size - 1) * per_channel / source.num_parameters()
        raise MethodError(
            f"width cannot remove {remove:,} parameters: the {num_layers} layers' MLPs hold "
            f"{size * per_channel:,}, and keeping 1 channel each removes at most "
            f"{most:.1%} of the model; give width a smaller share"
        )
    return min(keep, size)


def channel_importance(
    runner: TrialRunner,
    layers: list[OutputLayer],
    progress: bool = True,
    batches: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Per output layer, each MLP channel's importance ``E|a_j|`` ``(I,)``, on
    the runner's calibration batches (those numbered ``batches``; all by default) run
    through ``layers`` (any kept channels ignored)."""
    batches = range(len(runner.traces)) if batches is None else batches
    traces = [runner.traces[b] for b in batches]
    sinks = [runner.activations.sinks()[b] for b in batches]
    states = [trace.states[0] for trace in traces]
    scores = []
    for j, layer in enumerate(tqdm(layers, desc="channel importance", disable=not progress)):
        layer = replace(layer, channels=None)
        tensors = runner.sources[layer.first[0]].layer(layer.first[1])
        try:
            weight, _, side = mlp_projection(tensors, f"output layer {j} ({layer.describe()})")
        except CheckpointError as e:
            raise MethodError(str(e)) from None
        module = runner.stack.layers[layer.first[1]]
        down = module.get_submodule(weight.removesuffix(".weight"))
        stats = _ChannelStats(side)
        step = runner.step(layer)
        hook = down.register_forward_pre_hook(stats)
        try:
            for b, trace in enumerate(traces):
                stats.skip = sinks[b]
                states[b] = runner.stack.run(states[b], [step], trace)
        finally:
            hook.remove()
        scores.append(stats.importance())
    return scores


class _ChannelStats:
    """A forward pre-hook on a down projection: sums |a_j| (and a_j^2) over the tokens not
    skipped, and takes the norm of the column each channel writes with (of the weights the
    layer runs with: merged, bridged); the last two serve the ablations
    (benchmarks/width_importance.py)."""

    def __init__(self, side: str):
        self.side = side  # "left": nn.Linear (hidden, I); "right": Conv1D (I, hidden)
        self.skip: torch.Tensor | None = None  # (B*T,) True for attention-sink tokens
        self.abs: torch.Tensor | None = None  # (I,) sum of |a_j|
        self.square: torch.Tensor | None = None  # (I,) sum of a_j^2 (for the ablations)
        self.norm: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module, args) -> None:
        a = args[0].reshape(-1, args[0].shape[-1])  # (B*T, I)
        a = a[~self.skip.to(a.device)].double()
        self.abs = _add(self.abs, a.abs().sum(0))
        self.square = _add(self.square, a.square().sum(0))
        self.tokens += len(a)
        if self.norm is None:
            self.norm = module.weight.double().norm(dim=0 if self.side == "left" else 1)

    def importance(self) -> torch.Tensor:
        return (self.abs / max(self.tokens, 1)).cpu()


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part


def with_width(
    runner: TrialRunner,
    layers: list[OutputLayer],
    keep: int,
    progress: bool = True,
    batches: Sequence[int] | None = None,
) -> list[OutputLayer]:
    """``layers`` with each keeping its ``keep`` most important MLP channels (importance
    measured on the calibration ``batches``, all by default)."""
    out = []
    for layer, score in zip(layers, channel_importance(runner, layers, progress, batches)):
        if keep > len(score):
            raise MethodError(
                f"cannot keep {keep} MLP channels: layer {layer.describe()} has {len(score)}"
            )
        top = torch.topk(score, keep).indices.sort().values
        out.append(replace(layer, channels=Channels.of(top)))
    return out


def held_back(batches: int) -> tuple[list[int], list[int]]:
    """(batches to measure importance on, batches to score splits on): every
    ``HELD_BACK_EVERY``-th batch is held back (of 2 or 3 batches, the last); a single batch
    serves both."""
    every = min(HELD_BACK_EVERY, batches)
    held = [b for b in range(batches) if every > 1 and b % every == every - 1]
    fit = [b for b in range(batches) if b not in held]
    return (fit, held) if held else (fit, fit)


def depth_ratio(source: Source, ratio: float) -> float | None:
    """``ratio`` of the parameters for depth, or None when it is under half a layer."""
    return ratio if ratio >= layer_fraction(source) / 2 and not math.isclose(ratio, 0) else None
