"""``tailorkit.prune``: choose a layer plan for a model and return it as a PruneResult."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from tailorkit.calibration import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WINDOWS, DEFAULT_SEQ_LEN
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.errors import MethodError
from tailorkit.methods import METHODS, Context, get_method
from tailorkit.result import PruneResult
from tailorkit.similarity import cka_matrix, plot_heatmap
from tailorkit.trials import TrialRunner

log = logging.getLogger(__name__)


def prune(
    base: str = DEFAULT_MODEL,
    *,
    method: str = "slm",
    target_ratio: float | None = None,
    candidates: list[str] | None = None,
    calibration: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    offload: bool | str | None = None,
    progress: bool = True,
    **settings: Any,
) -> PruneResult:
    """Compress ``base`` depth-wise with ``method`` and return the plan with its report.

    ``method``: ``slm`` (Sliding Layer Merging), ``shortgpt``, ``angular``, ``laco``, or
    ``gptailor`` (CMA-ES over removal, selection and merging of ``candidates``, fine-tunes
    of ``base``; settings ``budget``, ``popsize``, ``objective``, ``executor``, ...).
    ``target_ratio`` is the fraction of parameters to remove; ``slm`` and ``laco``
    take a ``threshold`` instead if you prefer. ``calibration`` is text (see
    :func:`tailorkit.calibration.load_texts`; the bundled public-domain text by
    default) cut into ``num_windows`` windows of ``seq_len`` tokens with ``seed``.
    Other keyword ``settings`` go to the method (e.g. ``fusion="average"``); each
    method's settings, with defaults and ranges, are listed by ``tailorkit prune --help``
    and checked before any model is loaded.
    """
    spec = get_method(method)
    if target_ratio is not None:
        settings["target_ratio"] = target_ratio
    if candidates and not spec.takes_candidates:
        takers = ", ".join(name for name, m in METHODS.items() if m.takes_candidates)
        raise MethodError(f"method {method!r} prunes one model; candidates are for {takers}")
    checked = spec.parse(settings)
    runner = TrialRunner.calibrate(
        base,
        calibration,
        seq_len=seq_len,
        num_windows=num_windows,
        seed=seed,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
        state_cache_bytes=0,  # single-model trials share no prefix beyond the recorded one
    )
    work_dir = Path(tempfile.mkdtemp(prefix="tailorkit-prune-"))
    ctx = Context(runner, work_dir, list(candidates or []), seed)
    result = spec.run(ctx, checked)

    cka = cka_matrix(runner.activations.outputs())
    heatmap = plot_heatmap(
        cka, work_dir / "cka.png", f"linear CKA of layer outputs: {runner.base.path.name}"
    )
    plan = result.recipe.plan()
    windows = runner.config.windows
    report = {
        "method": method,
        **result.report,
        "settings": {**checked.model_dump(mode="json"), **result.report.get("settings", {})},
        "base": base,
        "calibration": {
            "source": _describe(calibration),
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "seed": seed,
        },
        "layers": {"base": runner.num_layers, "output": plan.num_layers},
        "removed_layer_fraction": plan.removed_layer_fraction,
        "removed_parameter_fraction": plan.removed_parameter_fraction,
        "parameters": {"base": plan.base_parameters, "output": plan.num_parameters},
        "cka": [[round(float(x), 5) for x in row] for row in cka],
    }
    images = {"CKA between layer outputs on the calibration text": heatmap, **result.images}
    log.info("%s: %s", method, plan.summary())
    return PruneResult(result.recipe, report, images, files=result.files)


def _describe(calibration: Any) -> str:
    if calibration is None:
        return "bundled public-domain text"
    if isinstance(calibration, torch.Tensor):
        return "token ids given in memory"
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} text(s) given in memory"
    return str(calibration)
