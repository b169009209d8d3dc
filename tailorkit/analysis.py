"""``tailorkit.analyze``: the layer-similarity figures of one model on calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tailorkit.calibration import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WINDOWS, DEFAULT_SEQ_LEN
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.devices import resolve_device
from tailorkit.similarity import angular_distance, block_influence, cka_matrix, plot_heatmap
from tailorkit.trials import TrialRunner


def analyze(
    model: str = DEFAULT_MODEL,
    *,
    calibration: Any = None,
    kernel: str = "linear",
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    offload: bool | str | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
    device: str | None = None,
    keep_sinks: bool = False,
) -> dict[str, Any]:
    """CKA between all layer outputs, Block Influence per layer, angular distance of
    adjacent boundaries; optionally the CKA heatmap as a PNG. ``device="cuda"`` computes
    the CKA on the GPU. The attention-sink tokens (massive activations, found from the
    data) are left out of the CKA unless ``keep_sinks``; Block Influence and angular
    distance count every token, as ShortGPT and the angular method do (the layer that
    writes the sink shows only on the sink tokens)."""
    device = resolve_device(device)  # fail before the work
    runner = TrialRunner.calibrate(
        model,
        calibration,
        seq_len=seq_len,
        num_windows=num_windows,
        seed=seed,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
    )
    acts, skip = runner.activations, not keep_sinks
    cka = cka_matrix(acts.outputs(skip), kernel=kernel, device=device)
    influence = block_influence(acts.boundaries())
    angular = angular_distance(acts.boundaries(), 1)
    if plot is not None:
        tokens = "all tokens" if keep_sinks else "sink tokens left out"
        title = f"{kernel} CKA of layer outputs, {tokens}: {runner.base.path.name}"
        plot_heatmap(cka, plot, title)
    return {
        "model": model,
        "kernel": kernel,
        "layers": runner.num_layers,
        "tokens": int(runner.config.windows.numel()),
        "sink_tokens": int(torch.cat(acts.sinks()).sum()),
        "sinks_left_out": skip,
        "offloaded": acts.offloaded,
        "cka": _rounded(cka),
        "block_influence": _rounded(influence),
        "angular_distance_adjacent": _rounded(angular),
    }


def _rounded(t: torch.Tensor) -> list:
    return torch.round(t.double(), decimals=6).tolist()
