"""``tailorkit.prune`` chooses a layer plan for a model, ``tailorkit.bridge`` bridges the gaps
of any plan; both return a PruneResult."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tailorkit import bridges
from tailorkit import width as widths
from tailorkit.calibration import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_WINDOWS,
    DEFAULT_SEQ_LEN,
    calibration_windows,
)
from tailorkit.checkpoint.builtin import DEFAULT_MODEL
from tailorkit.devices import resolve_device
from tailorkit.errors import MethodError
from tailorkit.methods import METHODS, Context, get_method
from tailorkit.methods.registry import MethodResult, MethodSpec, Settings
from tailorkit.objectives import Logits
from tailorkit.plan import Plan
from tailorkit.recipe import Recipe
from tailorkit.result import PruneResult
from tailorkit.similarity import cka_matrix, plot_heatmap
from tailorkit.trials import RunnerConfig, TrialRunner, keep

log = logging.getLogger(__name__)


def prune(
    base: str | os.PathLike = DEFAULT_MODEL,
    *,
    method: str = "slm",
    target_ratio: float | None = None,
    candidates: list[str | os.PathLike] | None = None,
    calibration: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    offload: bool | str | None = None,
    progress: bool = True,
    bridge: bool = False,
    width_share: float | str | None = None,
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
    and checked before any model is loaded. ``bridge=True`` then fits a linear bridge
    after every run of removed layers (:mod:`tailorkit.bridges`) on the same windows.

    ``width_share``: the share of the removed parameters that width pruning takes
    (:mod:`tailorkit.width`: every layer's MLP keeps the same number of its most important
    channels), the rest going to ``method`` as depth; 0 (or None) is depth only, 1 width
    only, ``"auto"`` scores the splits in ``tailorkit.width.SPLITS`` on the calibration
    windows (KL from the dense model) and keeps the best.
    """
    spec = get_method(method)
    base = str(base)  # a Path names a folder as a string does
    candidates = [str(c) for c in candidates] if candidates else candidates
    if target_ratio is not None:
        settings["target_ratio"] = target_ratio
    if candidates and not spec.takes_candidates:
        takers = ", ".join(name for name, m in METHODS.items() if m.takes_candidates)
        raise MethodError(f"method {method!r} prunes one model; candidates are for {takers}")
    width = _width_request(spec, width_share, settings)
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
    # Figures and the search log live here as long as the result does (then it is removed).
    scratch = tempfile.TemporaryDirectory(prefix="tailorkit-prune-")
    try:
        result, report = _run(
            spec,
            checked,
            Context(runner, Path(scratch.name), list(candidates or []), seed),
            bridge,
            calibration,
            width,
        )
    except BaseException:
        scratch.cleanup()
        raise
    return PruneResult(result.recipe, report, result.images, files=result.files, scratch=scratch)


@dataclass(frozen=True)
class _WidthRequest:
    """What ``width_share`` asks: the total ratio, the shares to try, the method's settings
    (each share gives depth its own target_ratio)."""

    target: float
    shares: tuple[float, ...]
    settings: dict[str, Any]


def _width_request(
    spec: MethodSpec, width_share: float | str | None, settings: dict[str, Any]
) -> _WidthRequest | None:
    """``width_share`` checked (before any model is loaded), or None for depth only."""
    if width_share is None:
        return None
    if width_share == "auto":
        shares = widths.SPLITS
    else:
        try:
            share = float(width_share)
        except (TypeError, ValueError):
            share = math.nan
        if not 0 <= share <= 1:
            raise MethodError(
                f"width_share must be a number in [0, 1] or 'auto', got {width_share!r}"
            )
        if share == 0:
            return None
        shares = (share,)
    target = settings.get("target_ratio")
    if target is None:
        raise MethodError(
            "width_share splits a parameter budget between depth and width: give target_ratio"
        )
    for share in shares:  # each depth share is a valid setting of the method
        if share < 1:
            spec.parse(settings | {"target_ratio": target * (1 - share)})
    return _WidthRequest(float(target), shares, dict(settings))


def _run(
    spec: MethodSpec,
    checked: Settings,
    ctx: Context,
    bridge: bool,
    calibration: Any,
    width: _WidthRequest | None = None,
) -> tuple[MethodResult, dict[str, Any]]:
    """The method, its bridges and the report: what :func:`prune` does once calibrated."""
    runner, base = ctx.runner, ctx.base
    if width is None:
        result = spec.run(ctx, checked)
        recipe, extra = result.recipe, {}
        if bridge:
            recipe, extra = _bridged(recipe, runner, runner.config)
    else:
        result, recipe, extra = _split(spec, ctx, bridge, width)

    cka = cka_matrix(runner.activations.outputs(skip_sinks=True))
    title = f"linear CKA of layer outputs, sink tokens left out: {runner.base.path.name}"
    heatmap = plot_heatmap(cka, ctx.work_dir / "cka.png", title)
    plan = recipe.plan()
    report = {
        "method": spec.name,
        **result.report,
        "settings": {**checked.model_dump(mode="json"), **result.report.get("settings", {})},
        "base": base,
        **_plan_report(plan, calibration, runner.config.windows, ctx.seed),
        "sinks": _sinks(runner),
        "cka": [[round(float(x), 5) for x in row] for row in cka],
        **extra,
    }
    images = {
        "CKA between layer outputs on the calibration text (attention sinks left out)": heatmap,
        **result.images,
    }
    log.info("%s: %s", spec.name, plan.summary())
    return replace(result, recipe=recipe, images=images), report


def _split(
    spec: MethodSpec, ctx: Context, bridge: bool, width: _WidthRequest
) -> tuple[MethodResult, Recipe, dict[str, Any]]:
    """Depth by ``spec`` and width together, for each share asked; the best by KL from the
    dense model when there are several, scored on calibration batches held back from the
    channel importance and from the bridges (``bridge``: each split is scored as it would
    ship, bridged). The chosen split's channels and bridges are then fitted on every
    batch."""
    runner, base = ctx.runner, ctx.runner.base
    size = widths.channels_per_layer(base)
    several = len(width.shares) > 1
    fit, held = widths.held_back(len(runner.traces)) if several else (None, None)
    tried = []
    for share in width.shares:
        depth = widths.depth_ratio(base, width.target * (1 - share))
        if depth is None:  # width alone: every layer kept
            layers = [keep(i, runner.config.base_name) for i in range(base.num_layers)]
            result = MethodResult(ctx.recipe(layers))
        else:
            result = spec.run(ctx, spec.parse(width.settings | {"target_ratio": depth}))
        on = _runner_on(result.recipe, runner, runner.config)
        plan = result.recipe.plan()
        remove = width.target * plan.base_parameters - (plan.base_parameters - plan.num_parameters)
        kept = size  # share 0: depth only, as width_share=0 is
        if share > 0:
            kept = widths.kept_channels(base, plan.num_layers, remove)
        recipe = _narrowed(result.recipe, on, kept, size, fit)
        plan = recipe.plan()
        row = {
            "share": share,
            "depth_ratio": depth or 0.0,
            "layers": plan.num_layers,
            "intermediate_size": kept,
            "removed_parameter_fraction": plan.removed_parameter_fraction,
        }
        if several:
            scored = recipe
            if bridge:  # bridge names repeat across splits: each split's own, then forgotten
                scored, _ = bridges.fit_bridges(on, recipe, progress=False, batches=fit)
            row["kl"] = on.score(scored, Logits(), batches=held)
            on.forget_fitted()
            log.info("width share %.2f: %s, KL %.4f", share, plan.summary(), row["kl"])
        tried.append((row, result, recipe, on))
    row, result, recipe, on = min(tried, key=lambda t: t[0].get("kl", 0.0))
    if several:  # the chosen split's channels (and bridges, below) from all the windows
        recipe = _narrowed(result.recipe, on, row["intermediate_size"], size)
    extra = {}
    if bridge:
        recipe, extra = _bridged(recipe, on, runner.config)
    report = {
        "share": row["share"],
        "intermediate_size": row["intermediate_size"],
        "base_intermediate_size": size,
        "importance": widths.IMPORTANCE,
        "splits": [t[0] for t in tried] if several else [],
        "scored_on_batches": held or [],
    }
    return result, recipe, extra | {"width": report}


def _narrowed(recipe: Recipe, runner: TrialRunner, kept: int, size: int, batches=None) -> Recipe:
    """``recipe`` with every layer keeping its ``kept`` most important of ``size`` MLP
    channels (importance on the calibration ``batches``); unchanged when that is all of them,
    as when depth's rounding already removed the whole budget."""
    if kept >= size:
        return recipe
    progress = runner.config.progress
    return recipe.with_layers(
        widths.with_width(runner, recipe.output_layers(), kept, progress, batches)
    )


def _runner_on(recipe: Recipe, runner: TrialRunner | None, config: RunnerConfig) -> TrialRunner:
    """``runner`` when it holds the recipe's models, else one opened on them as ``config``
    says (a stitched plan's candidates)."""
    if runner is not None and runner.opened_on(recipe):
        return runner
    return bridges.runner_for(
        recipe,
        config.windows,
        batch_size=config.batch_size,
        offload=config.offload,
        progress=config.progress,
        device=config.device,
    )


def bridge(
    recipe: Recipe | str | Path,
    *,
    calibration: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    offload: bool | str | None = None,
    progress: bool = True,
    device: str | None = None,
) -> PruneResult:
    """``recipe`` (any, a hand-written one too) with a linear bridge after every run of
    removed layers (:mod:`tailorkit.bridges`), fitted on ``calibration`` cut as for
    :func:`prune`; bridges it had are refitted. ``device="cuda"`` runs the model and the
    fit on a GPU. Returns a PruneResult to save or push."""
    resolve_device(device)  # a device that is not there fails before any work
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    plan = recipe.plan()  # so do the recipe and its models
    windows = calibration_windows(
        plan.base.path, calibration, seq_len=seq_len, num_windows=num_windows, seed=seed
    )
    config = RunnerConfig(
        plan.base.ref,
        windows,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
        device=device,
    )
    bridged, extra = _bridged(recipe, None, config)
    report = {"base": plan.base.ref, **_plan_report(bridged.plan(), calibration, windows, seed)}
    return PruneResult(bridged, report | extra)


def _bridged(recipe: Recipe, runner: TrialRunner | None, config: RunnerConfig):
    """``recipe`` bridged on ``runner`` (or one opened on its models, as ``config`` says)."""
    runner = _runner_on(recipe, runner, config)
    bridged, fits = bridges.fit_bridges(runner, recipe, progress=config.progress)
    return bridged, {"bridges": bridges.report(fits)}


def _plan_report(plan: Plan, calibration: Any, windows: torch.Tensor, seed: int) -> dict:
    return {
        "calibration": {
            "source": _describe(calibration),
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "seed": seed,
        },
        "layers": {"base": plan.base.num_layers, "output": plan.num_layers},
        "removed_layer_fraction": plan.removed_layer_fraction,
        "removed_parameter_fraction": plan.removed_parameter_fraction,
        "parameters": {"base": plan.base_parameters, "output": plan.num_parameters},
    }


def _sinks(runner: TrialRunner) -> dict:
    """How many calibration tokens are attention sinks, and how many of them open a window."""
    sinks = torch.cat(runner.activations.sinks())  # (N*T,)
    first = sinks.view(-1, runner.config.windows.shape[1])[:, 0]
    return {"tokens": int(sinks.sum()), "at_position_0": int(first.sum())}


def _describe(calibration: Any) -> str:
    if calibration is None:
        return "bundled public-domain text"
    if isinstance(calibration, torch.Tensor):
        return "token ids given in memory"
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} text(s) given in memory"
    return str(calibration)
