"""Hidden states at every decoder-layer boundary on the calibration windows.

A model with L layers has L + 1 boundaries: the input of each layer and the
output of the last. They are captured by hooks (see :mod:`tailorkit.forward`)
a batch of windows at a time. When they would not fit in memory they are
written, batch by batch, to safetensors files in a scratch folder and read
back memory-mapped, so a 70-layer model on thousands of tokens costs disk,
not RAM.

Attention sinks: in most LLMs the first position of a sequence (and some delimiter
tokens) carries "massive activations", hidden states hundreds of times larger than
the rest (SmolLM2: norms of ~22,000 against ~150). Any statistic pooled over tokens
(linear CKA above all) is then about those few tokens. :meth:`Activations.sinks`
finds them from the data, and the similarity statistics leave them out by default.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tailorkit.calibration import DEFAULT_BATCH_SIZE
from tailorkit.checkpoint.safetensors_format import read_header
from tailorkit.checkpoint.writer import ShardWriter, TensorSpec
from tailorkit.errors import CalibrationError
from tailorkit.forward import DecoderStack, Trace

# Offload automatically when the states would take more than this share of free memory.
AUTO_OFFLOAD_SHARE = 0.4
# A token is an attention sink when, at some boundary, its hidden state's norm is this many
# times the median there (SmolLM2: sinks 140-200x, every other token below 11x).
SINK_FACTOR = 50.0


class Activations:
    """The captured traces, one per batch, with their states in memory or memory-mapped."""

    def __init__(self, traces: list[Trace], scratch=None):
        self.traces = traces
        self._scratch = scratch  # a TemporaryDirectory kept alive while the maps are in use
        self._sinks: list[torch.Tensor] | None = None

    @property
    def offloaded(self) -> bool:
        return self._scratch is not None

    def sinks(self) -> list[torch.Tensor]:
        """Per batch, a ``(B*T,)`` bool mask of the attention-sink tokens: those whose
        hidden-state norm is ``SINK_FACTOR`` times the median at some boundary."""
        if self._sinks is None:
            norms = [torch.stack(t.states).float().norm(dim=-1).flatten(1) for t in self.traces]
            median = torch.cat(norms, dim=1).median(dim=1).values  # (L + 1,)
            scale = SINK_FACTOR * median.clamp_min(torch.finfo(torch.float32).tiny)
            self._sinks = [(n > scale[:, None]).any(0).cpu() for n in norms]
        return self._sinks

    def boundaries(self, skip_sinks: bool = False) -> Iterator[torch.Tensor]:
        """Per batch, all boundaries as one ``(L + 1, n, d)`` float32 tensor: n = B*T
        tokens, or the tokens that are not attention sinks."""
        sinks = self.sinks() if skip_sinks else [None] * len(self.traces)
        for trace, sink in zip(self.traces, sinks):
            states = [s.reshape(-1, s.shape[-1]) for s in trace.states]
            if sink is not None:
                states = [s[~sink.to(s.device)] for s in states]
            yield torch.stack([s.float() for s in states])

    def outputs(self, skip_sinks: bool = False) -> Iterator[torch.Tensor]:
        """Per batch, the L layer outputs ``(L, n, d)``: boundaries 1..L."""
        for b in self.boundaries(skip_sinks):
            yield b[1:]


def capture(
    stack: DecoderStack,
    windows: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    offload: bool | str | os.PathLike | None = None,
    progress: bool = True,
) -> Activations:
    """Run ``windows`` ``(N, T)`` through the model in batches and keep every boundary state.

    ``offload``: None decides from the free memory; True streams to a scratch folder
    that lives as long as the result; a path streams into that folder.
    """
    n, t = windows.shape
    embedding = stack.model.get_input_embeddings().weight  # (V, d)
    need = n * t * embedding.shape[-1] * (stack.num_layers + 1) * embedding.element_size()
    if offload is None:
        offload = need > AUTO_OFFLOAD_SHARE * _available_memory()
    scratch = folder = None
    if offload:
        if offload is True:
            scratch = tempfile.TemporaryDirectory(prefix="tailorkit-activations-")
            folder = Path(scratch.name)
        else:
            folder = Path(offload)
            folder.mkdir(parents=True, exist_ok=True)
            scratch = folder
    traces = []
    batches = range(0, n, batch_size)
    for b, start in enumerate(tqdm(batches, desc="activations", disable=not progress)):
        trace = stack.trace(windows[start : start + batch_size].to(embedding.device))
        _check_finite(trace, b, start)
        if folder is not None:
            trace.states = _to_disk(trace.states, folder / f"batch-{b:05d}.safetensors")
        traces.append(trace)
    return Activations(traces, scratch)


def _check_finite(trace: Trace, batch: int, first_window: int) -> None:
    for i, state in enumerate(trace.states):
        if not bool(torch.isfinite(state).all()):
            where = f"input of layer {i}" if i < len(trace.kwargs) else f"output of layer {i - 1}"
            raise CalibrationError(
                f"NaN or inf in the activations at the {where} (calibration batch {batch}, "
                f"windows from {first_window}): the model's weights or dtype overflow there"
            )


def _to_disk(states: list[torch.Tensor], path: Path) -> list[torch.Tensor]:
    """Write the states of one batch to ``path``; return read-only memory-mapped views."""
    specs = [TensorSpec(f"state.{i}", s.dtype, tuple(s.shape)) for i, s in enumerate(states)]
    writer = ShardWriter(path, specs)
    try:
        for spec, s in zip(specs, states):
            writer.write(spec.name, s.contiguous().reshape(-1), 0)
    finally:
        writer.close()
    header = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    views = []
    for spec in specs:
        info = header.tensors[spec.name]
        view = torch.frombuffer(mm, dtype=info.dtype.torch, count=info.numel, offset=info.start)
        views.append(view.reshape(info.shape))
    return views


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
