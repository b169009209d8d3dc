"""``tailorkit.prune``: choose a layer plan for a model and return it as a PruneResult."""

from __future__ import annotations

import inspect
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from tailorkit.activations import Activations, capture
from tailorkit.assemble import assemble
from tailorkit.calibration import DEFAULT_NUM_WINDOWS, DEFAULT_SEQ_LEN, token_windows
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.checkpoint.source import Source
from tailorkit.errors import CalibrationError, MethodError
from tailorkit.forward import DecoderStack
from tailorkit.methods import Context, get_method
from tailorkit.recipe import Recipe
from tailorkit.result import PruneResult
from tailorkit.similarity import cka_matrix, plot_heatmap

log = logging.getLogger(__name__)

ANALYSIS_DTYPE = "float32"  # the CPU runs bf16 slowly and imprecisely; analyse in float32


def identity_recipe(base: str, num_layers: int) -> Recipe:
    return Recipe.from_dict(
        {"models": {"base": base}, "layers": [{"from": "base", "layers": [0, num_layers]}]}
    )


def load_base(base: str, dtype: str = ANALYSIS_DTYPE) -> tuple[Source, DecoderStack]:
    """The base model opened for reading and assembled layer by layer (weights are mapped,
    not copied, where the dtype allows)."""
    source = Source(base, "base")
    model = assemble(identity_recipe(base, source.num_layers), dtype=dtype)
    return source, DecoderStack(model)


def calibration_windows(
    source: Source, calibration: Any, *, seq_len: int, num_windows: int, seed: int
) -> torch.Tensor:
    """Token windows ``(N, T)``: ``calibration`` itself when it is already a tensor of
    token ids, else text cut with the base model's tokenizer."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(
                f"calibration token ids must be an (N, T) integer tensor, got "
                f"{calibration.dtype} of shape {tuple(calibration.shape)}"
            )
        return calibration.long()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    return token_windows(
        tokenizer, calibration, seq_len=seq_len, num_windows=num_windows, seed=seed
    )


def run_calibration(
    base: str,
    calibration: Any,
    *,
    seq_len: int,
    num_windows: int,
    seed: int,
    batch_size: int,
    offload: bool | str | None,
    progress: bool,
) -> tuple[Source, DecoderStack, torch.Tensor, Activations]:
    """Open ``base`` layer by layer and record its activations on the calibration windows:
    the start that pruning and analysis share."""
    source, stack = load_base(base)
    windows = calibration_windows(
        source, calibration, seq_len=seq_len, num_windows=num_windows, seed=seed
    )
    activations = capture(stack, windows, batch_size=batch_size, offload=offload, progress=progress)
    return source, stack, windows, activations


def prune(
    base: str = DEFAULT_MODEL,
    *,
    method: str = "slm",
    target_ratio: float | None = None,
    candidates: list[str] | None = None,
    calibration: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    batch_size: int = 8,
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
    Other keyword ``settings`` go to the method (e.g. ``fusion="average"``).
    """
    fn = get_method(method)
    if target_ratio is not None:
        settings["target_ratio"] = target_ratio
    if method == "gptailor":
        settings.setdefault("seed", seed)  # one seed for the windows and the search
    if candidates and method != "gptailor":
        raise MethodError(f"method {method!r} prunes one model; candidates are for gptailor")
    try:  # refuse settings the method does not take before any model is loaded
        inspect.signature(fn).bind(None, **settings)
    except TypeError as e:
        raise MethodError(f"method {method!r}: {e}") from e
    source, stack, windows, activations = run_calibration(
        base,
        calibration,
        seq_len=seq_len,
        num_windows=num_windows,
        seed=seed,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="tailorkit-prune-"))
    ctx = Context(
        base,
        source,
        stack,
        activations,
        work_dir,
        windows,
        list(candidates or []),
        batch_size,
        progress,
    )
    result = fn(ctx, **settings)

    cka = cka_matrix(activations.outputs())
    heatmap = plot_heatmap(
        cka, work_dir / "cka.png", f"linear CKA of layer outputs: {source.path.name}"
    )
    plan = result.recipe.plan()
    report = {
        **result.report,
        "base": base,
        "calibration": {
            "source": "bundled public-domain text"
            if calibration is None
            else _describe(calibration),
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "seed": seed,
        },
        "layers": {"base": source.num_layers, "output": plan.num_layers},
        "removed_layer_fraction": plan.removed_layer_fraction,
        "removed_parameter_fraction": plan.removed_parameter_fraction,
        "parameters": {"base": plan.base_parameters, "output": plan.num_parameters},
        "cka": [[round(float(x), 5) for x in row] for row in cka],
    }
    images = {"CKA between layer outputs on the calibration text": heatmap, **result.images}
    log.info("%s: %s", method, plan.summary())
    return PruneResult(result.recipe, report, images, files=result.files)


def _describe(calibration: Any) -> str:
    if isinstance(calibration, torch.Tensor):
        return "token ids given in memory"
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} text(s) given in memory"
    return str(calibration)
