"""Linear bridges: keep what removed layers did, with no new parameters (ReplaceMe,
Shopkhoev et al. 2025, arXiv 2505.02819).

After output layer j of a plan, where a run of the base's layers was removed (or merged
into j), a hidden x hidden map T is fitted in closed form on calibration tokens so that
j's MLP output M, mapped by T, puts the residual stream where the removed layers would
have taken it:

    Y + M T  ~  h_e,

with Y the layer's residual before its MLP (its output minus M) and h_e the dense model's
hidden state at the input of the next kept layer e. T folds into the MLP's output
projection (W <- T^T W): the checkpoint keeps its shape and config.

What the fit needs to be worth having (measured on SmolLM2, benchmarks/RESULTS.md):

* statistics, not tokens: ``M^T W M`` and ``M^T W (h_e - Y)`` accumulated in float64 over
  calibration batches, so memory is O(hidden^2) whatever the number of tokens;
* token weights 1/|h_e|: a few attention-sink tokens carry hidden states hundreds of
  times larger than the rest, and an unweighted least-squares fit serves them alone
  (SmolLM2 without its most similar block of 7 layers: held-out log-perplexity 5.59, 7.61
  bridged unweighted, 5.16 weighted; 1/|h_e|^2 gave 5.21);
* a ridge towards the identity (T = I is no bridge), its strength chosen among a few on
  held-back calibration windows; a bridge that does not lower the held-back error is
  dropped;
* the pruned model's own states: bridges are fitted bottom-up, each on states that
  already pass through the merged, stitched and bridged layers below it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from tailorkit.checkpoint.architecture import mlp_output
from tailorkit.errors import CheckpointError, MethodError
from tailorkit.recipe import OutputLayer, Recipe
from tailorkit.trials import RunnerConfig, TrialRunner

RIDGES = (1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean diagonal of M^T W M
HELD_BACK_EVERY = 4  # every 4th calibration window is held back


@dataclass
class BridgeFit:
    """One fitted bridge, as the report and the model card show it."""

    layer: int  # output layer the bridge folds into
    name: str
    removed: tuple[int, int]  # the base's layers [start, stop) it stands in for
    tokens: int  # calibration tokens fitted on
    held_back_tokens: int
    error: float  # relative error on held-back tokens with the bridge
    error_without: float  # ... without it (T = I)
    ridge: float
    kept: bool  # False: it did not lower the held-back error, so it was dropped
    seconds: float


def gaps(layers: list[OutputLayer], num_layers: int) -> list[tuple[int, int, int]]:
    """``(j, start, e)`` for each output layer j after which base layers [start, e) are not
    run as themselves: e is the next output layer's first source depth (or the end)."""
    out = []
    for j, layer in enumerate(layers):
        depth = layer.first[1]
        e = layers[j + 1].first[1] if j + 1 < len(layers) else num_layers
        if e > depth + 1:
            out.append((j, depth + 1, e))
    return out


def fit_bridges(
    runner: TrialRunner,
    recipe: Recipe,
    *,
    ridges: tuple[float, ...] = RIDGES,
    progress: bool = True,
    batches: Sequence[int] | None = None,
) -> tuple[Recipe, list[BridgeFit]]:
    """``recipe`` with a bridge after every run of removed layers, fitted on ``runner``'s
    calibration windows (its base and candidates must be the recipe's models, by name), or
    on the calibration batches numbered ``batches``; and how each fit went. Bridges the
    recipe had are replaced."""
    layers = [replace(layer, bridge=None) for layer in recipe.output_layers()]
    if not runner.opened_on(recipe):
        raise MethodError(
            "the trial runner's models are not the recipe's: fit bridges with a runner "
            f"opened on {recipe.models} (base {recipe.base_model!r})"
        )
    for j, _, _ in gaps(layers, runner.num_layers):
        tensors = runner.sources[layers[j].first[0]].layer(layers[j].first[1])
        try:
            mlp_output(tensors, f"output layer {j} ({layers[j].describe()})")
        except CheckpointError as e:
            raise MethodError(str(e)) from None
    fitter = _Fitter(runner, layers, batches)
    fits, fitted = [], {}
    for j, start, e in tqdm(gaps(layers, runner.num_layers), desc="bridges", disable=not progress):
        fit, bridge = fitter.fit(j, start, e, ridges)
        fits.append(fit)
        if fit.kept:
            fitted[fit.name] = bridge
            runner.add_fitted({fit.name: bridge})
            layers[j] = replace(layers[j], bridge=fit.name)
    return recipe.with_layers(layers, fitted), fits


def report(fits: list[BridgeFit]) -> list[dict]:
    """The fits as plain JSON data (for report.json and the model card)."""
    return [asdict(fit) | {"removed": list(fit.removed)} for fit in fits]


class _Fitter:
    """Walks the calibration batches up the pruned model, one gap at a time."""

    def __init__(
        self, runner: TrialRunner, layers: list[OutputLayer], batches: Sequence[int] | None
    ):
        self.runner, self.layers = runner, layers
        self.recorded = runner.recorded_prefix(layers)  # these need not run
        self.at: int | None = None  # every batch's state is the input of output layer `at`
        self.states: list[torch.Tensor] = []
        numbers = range(len(runner.traces)) if batches is None else batches
        self.traces = [runner.traces[b] for b in numbers]
        size = runner.config.batch_size
        self.held_back = [  # (B*T,) True for tokens of every HELD_BACK_EVERY-th window
            (torch.arange(len(runner.traces[b].input_ids)) + b * size)
            .remainder(HELD_BACK_EVERY)
            .eq(HELD_BACK_EVERY - 1)
            .repeat_interleave(runner.traces[b].input_ids.shape[1])
            for b in numbers
        ]

    def _advance(self, to: int) -> None:
        """Run every batch's state up to the input of output layer ``to``."""
        if self.at is None:
            self.at = min(to, self.recorded)
            self.states = [trace.states[self.at] for trace in self.traces]
        steps = [self.runner.step(layer) for layer in self.layers[self.at : to]]
        for b, trace in enumerate(self.traces):
            self.states[b] = self.runner.stack.run(self.states[b], steps, trace)
        self.at = to

    def fit(self, j: int, start: int, e: int, ridges) -> tuple[BridgeFit, torch.Tensor]:
        began = time.perf_counter()
        self._advance(j)
        runner, layer = self.runner, self.layers[j]
        module = runner.stack.layers[layer.first[1]]
        step = runner.step(layer)
        d = self.states[0].shape[-1]
        stats = {part: _Stats(d) for part in ("fit", "held_back")}
        captured: dict[str, torch.Tensor] = {}
        hook = module.mlp.register_forward_hook(lambda m, a, out: captured.update(m=out))
        try:
            for b, trace in enumerate(self.traces):
                out = runner.stack.run(self.states[b], [step], trace)
                m = captured["m"].reshape(-1, d).double()  # (B*T, d)
                y = out.reshape(-1, d).double() - m
                h = trace.states[e].reshape(-1, d).double()
                held = self.held_back[b].to(m.device)
                stats["fit"].add(m[~held], y[~held], h[~held])
                stats["held_back"].add(m[held], y[held], h[held])
        finally:
            hook.remove()
        fit, held = stats["fit"], stats["held_back"]
        where = f"bridge after output layer {j} ({layer.describe()})"
        if held.tokens == 0:
            held = fit  # fewer than HELD_BACK_EVERY windows: judged on what it was fitted on
        best = None
        for ridge in ridges:
            t = fit.solve(ridge, where)
            error = held.error(t)
            if best is None or error < best[0]:
                best = (error, ridge, t)
        error, ridge, t = best
        without = held.error(torch.eye(d, dtype=torch.float64, device=t.device))
        result = BridgeFit(
            layer=j,
            name=f"bridge.{layer.first[1]}",
            removed=(start, e),
            tokens=fit.tokens,
            held_back_tokens=held.tokens if held is not fit else 0,
            error=error,
            error_without=without,
            ridge=ridge,
            kept=error < without,
            seconds=time.perf_counter() - began,
        )
        return result, t.float().cpu()


class _Stats:
    """Weighted normal equations of ``Y + M T ~ H``: ``A = M^T W M``, ``B = M^T W (H - Y)``,
    ``C = sum W |H - Y|^2`` and ``S = sum W |H|^2``, with W = 1/|H| per token."""

    def __init__(self, d: int):
        self.a = self.b = None
        self.c = self.s = 0.0
        self.tokens = 0
        self.d = d

    def add(self, m: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> None:
        if not len(m):
            return
        w = 1.0 / h.norm(dim=-1).clamp_min(1e-12)  # (n,)
        r = h - y
        wm = m * w[:, None]
        a, b = wm.T @ m, wm.T @ r
        self.a = a if self.a is None else self.a + a
        self.b = b if self.b is None else self.b + b
        self.c += float((w * r.square().sum(-1)).sum())
        self.s += float((w * h.square().sum(-1)).sum())
        self.tokens += len(m)

    def solve(self, ridge: float, where: str) -> torch.Tensor:
        """argmin_T sum W |H - Y - M T|^2 + lam |T - I|^2, lam = ridge * mean diag(A)."""
        if not (torch.isfinite(self.a).all() and torch.isfinite(self.b).all()):
            raise MethodError(f"{where}: NaN or inf in the activations it is fitted on")
        eye = torch.eye(self.d, dtype=self.a.dtype, device=self.a.device)
        lam = ridge * float(self.a.diagonal().mean())
        try:
            t = torch.linalg.solve(self.a + lam * eye, self.b + lam * eye)
        except RuntimeError as e:  # singular even with the ridge: no information to fit on
            raise MethodError(f"{where}: the fit's system is singular ({e})") from None
        if not torch.isfinite(t).all():
            raise MethodError(f"{where}: the fit produced NaN or inf")
        return t

    def error(self, t: torch.Tensor) -> float:
        """sqrt(sum W |H - Y - M T|^2 / sum W |H|^2): the weighted residual, relative."""
        sq = float((t * (self.a @ t)).sum() - 2 * (t * self.b).sum()) + self.c
        return max(sq, 0.0) ** 0.5 / max(self.s, 1e-300) ** 0.5


def runner_for(recipe: Recipe, windows: torch.Tensor, **config) -> TrialRunner:
    """A trial runner opened on ``recipe``'s models (its base recorded on ``windows``)."""
    base = recipe.base_model
    candidates = {name: ref for name, ref in recipe.models.items() if name != base}
    return TrialRunner(
        RunnerConfig(
            recipe.models[base],
            windows,
            candidates,
            base_name=base,
            state_cache_bytes=0,
            **config,
        )
    )
