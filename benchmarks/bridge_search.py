"""GPTailor with bridges: bridge the plan after the search, or search over bridged plans?

Two ways to combine the search with linear bridges, side by side on the SmolLM2 family
(base + code + verse, from make_family.py) at each ratio, same seed and windows:

* after: the search as it is (each candidate's KL to the base), then ``tk.bridge`` on the
  plan it finds;
* during: every candidate is scored with bridges fitted on the windows it is scored on
  (their statistics from the trial runner's cached prefix states, a fixed ridge), so the
  search can prefer plans whose gaps bridge well; then ``tk.bridge`` on its plan too.

Both end with the same bridge fit, so the comparison is of the plans the searches choose.
Held-out log-perplexity as in quality.py; search seconds beside it.

    python benchmarks/bridge_search.py --ratios 0.25
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from make_family import family_paths  # noqa: E402
from quality import evaluate, held_out_windows  # noqa: E402

import tailorkit as tk  # noqa: E402
from tailorkit.bridges import _Stats, gaps  # noqa: E402
from tailorkit.calibration import calibration_windows  # noqa: E402
from tailorkit.checkpoint.source import Source  # noqa: E402
from tailorkit.methods.common import removal_budget  # noqa: E402
from tailorkit.objectives import Logits  # noqa: E402
from tailorkit.search.driver import SearchSettings, run_search  # noqa: E402
from tailorkit.search.executors import LocalExecutor  # noqa: E402
from tailorkit.search.space import SearchSpace  # noqa: E402
from tailorkit.similarity import block_influence  # noqa: E402
from tailorkit.trials import RunnerConfig  # noqa: E402

SEARCH_RIDGE = 0.1


class BridgedExecutor(LocalExecutor):
    """Scores each candidate with a bridge fitted after every gap, on the scored windows."""

    def __init__(self, config: RunnerConfig):
        super().__init__(config)
        self.fits: dict[tuple, tuple[str, torch.Tensor]] = {}

    def map(self, recipes, windows):
        return [
            self.runner.score(self.bridged(r.output_layers(), windows), windows=windows)
            for r in recipes
        ]

    def bridged(self, layers, windows) -> tuple:
        runner = self.runner
        batches = runner._batches(windows)
        layers = list(layers)
        for j, _, e in gaps(layers, runner.num_layers):
            key = (tuple(layers[: j + 1]), e, batches)
            if key not in self.fits:
                self.fits[key] = (
                    f"bridge.{layers[j].first[1]}.{len(self.fits)}",
                    self._fit(layers, j, e, batches),
                )
            name, t = self.fits[key]
            runner.add_fitted({name: t})
            layers[j] = replace(layers[j], bridge=name)
        return tuple(layers)

    def _fit(self, layers, j, e, batches) -> torch.Tensor:
        runner, layer = self.runner, layers[j]
        module = runner.stack.layers[layer.first[1]]
        step = runner.step(layer)
        captured = {}
        hook = module.mlp.register_forward_hook(lambda m, a, out: captured.update(m=out))
        stats = None
        try:
            for b in range(batches):
                trace = runner.traces[b]
                x = runner.final_state(tuple(layers[:j]), b)
                out = runner.stack.run(x, [step], trace)
                d = out.shape[-1]
                stats = stats or _Stats(d)
                m = captured["m"].reshape(-1, d).double()
                y = out.reshape(-1, d).double() - m
                stats.add(m, y, trace.states[e].reshape(-1, d).double())
        finally:
            hook.remove()
        return stats.solve(SEARCH_RIDGE, f"search bridge after output layer {j}").float()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.25, 0.35])
    p.add_argument("--budget", type=int, default=120)
    p.add_argument("--popsize", type=int, default=12)
    p.add_argument("--calibration-windows", type=int, default=8)
    p.add_argument("--bridge-windows", type=int, default=32)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    p.add_argument("--removal-only", action="store_true", help="search removal alone")
    p.add_argument("--json", default="benchmarks/results/bridge_search.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    family = family_paths()
    base, candidates = str(family["base"]), [str(family[k]) for k in ("code", "verse")]
    source = Source(base)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    evals = held_out_windows(tokenizer, 256, args.windows)
    windows = calibration_windows(source.path, None, num_windows=args.calibration_windows)
    fidelity = args.calibration_windows // 2
    config = RunnerConfig(
        base, windows, {"c1": candidates[0], "c2": candidates[1]}, Logits(), batch_size=fidelity
    )
    dense = evaluate(tk.Recipe.identity(base, source.num_layers), evals, tokenizer, 0)
    rows = [{"way": "dense", **dense}]
    print("dense", dense, flush=True)
    for ratio in args.ratios:
        space = SearchSpace(
            base,
            tuple(candidates),
            source.num_layers,
            removal_budget(source, ratio, source.num_layers - 1),
            removal_only=args.removal_only,
            dtype="float32",
        )
        settings = SearchSettings(args.budget, args.popsize, 0.5, 0, fidelity, 2)
        for way, executor_class in (("after", LocalExecutor), ("during", BridgedExecutor)):
            executor = executor_class(config)
            influence = block_influence(executor.runner.activations.boundaries(True))
            x0 = space.initial(influence.tolist())
            t0 = time.perf_counter()
            out = Path(f"/tmp/tailorkit-bridge-search-{way}")
            result = run_search(space, executor, x0, settings, out, progress=False)
            search_s = time.perf_counter() - t0
            plain = evaluate(result.recipe, evals, tokenizer, 0)
            t0 = time.perf_counter()
            bridged = tk.bridge(result.recipe, num_windows=args.bridge_windows, progress=False)
            fit_s = time.perf_counter() - t0
            scores = evaluate(bridged.recipe, evals, tokenizer, 0)
            row = {
                "way": way,
                "ratio": ratio,
                "search_seconds": round(search_s, 1),
                "fit_seconds": round(fit_s, 1),
                "plan_mean": plain["mean"],
                **scores,
                "best_fitness": result.fitness,
                "recipe": bridged.recipe.to_dict(),
            }
            rows.append(row)
            print(
                way,
                ratio,
                {k: round(v, 3) for k, v in scores.items()},
                f"unbridged plan {plain['mean']:.3f}, search {search_s:.0f} s",
                flush=True,
            )
    lines = [
        "| ratio | way | plan, unbridged | bridged plan | ppl / dense | search s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['ratio']:.2f} | {r['way']} | {r['plan_mean']:.3f} | {r['mean']:.3f} "
            f"| {math.exp(r['mean'] - dense['mean']):.2f}x | {r['search_seconds']} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.json).write_text(
        json.dumps(
            {
                "benchmark": "bridge_search",
                "rows": rows,
                "date": time.strftime("%Y-%m-%d"),
                "table": table,
                "command": "python benchmarks/bridge_search.py " + " ".join(argv or sys.argv[1:]),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
