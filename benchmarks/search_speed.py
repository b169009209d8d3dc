"""GPTailor search speed: candidate evaluations per minute with the trial runner's caches
on and off, and against the naive loop, on the same search (same family, calibration,
seed), which must reach the same result every way.

* caches on: merged layers are computed once per exact spec; the hidden states of every
  prefix of output layers are kept per calibration batch, so a candidate only runs the
  layers after its first difference from one already scored; a candidate's score on a
  batch is kept (CMA-ES samples repeats; the full-fidelity re-scoring reuses the small
  slice's batch).
* caches off: the same runner (sources mapped once, base layers shared), but every
  candidate runs all its layers and merges on every batch.
* naive loop: what research scripts do: assemble each candidate as a transformers model
  (``tailorkit.assemble``) and run it whole.

Goal: at least 3x more evaluations per minute with the caches than without.

    python benchmarks/search_speed.py            # SmolLM2 family from make_family.py
    python benchmarks/search_speed.py --budget 24 --no-naive   # a quick look
    python benchmarks/search_speed.py --family random --device cuda   # on a bare GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from make_family import family_paths  # noqa: E402

import tailorkit as tk  # noqa: E402
from tailorkit.calibration import token_windows  # noqa: E402
from tailorkit.checkpoint.source import Source  # noqa: E402
from tailorkit.methods.common import removal_budget  # noqa: E402
from tailorkit.objectives import Logits  # noqa: E402
from tailorkit.search.driver import SearchSettings, run_search  # noqa: E402
from tailorkit.search.executors import LocalExecutor  # noqa: E402
from tailorkit.search.space import SearchSpace  # noqa: E402
from tailorkit.similarity import block_influence  # noqa: E402
from tailorkit.trials import RunnerConfig, TrialRunner  # noqa: E402


class NaiveExecutor:
    """Assemble every candidate whole and run it: the loop the caches are measured against."""

    def __init__(self, config: RunnerConfig):
        self.config = config
        self.batches = config.windows.to(config.device or "cpu").split(config.batch_size)
        layers = Source(config.base).num_layers
        base = self._model(tk.Recipe.identity(config.base, layers))
        self.teacher = [self._logp(base, batch) for batch in self.batches]
        self.evaluations = 0

    def _model(self, recipe):
        return tk.assemble(recipe, dtype=self.config.dtype).to(self.config.device or "cpu")

    def _logp(self, model, batch):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)

    def map(self, recipes, windows):
        out = []
        for recipe in recipes:
            self.evaluations += 1
            model = self._model(recipe)
            count = len(self.batches) if windows is None else windows // self.config.batch_size
            total = tokens = 0
            for batch, teacher in zip(self.batches[:count], self.teacher[:count]):
                per_token = (teacher.exp() * (teacher - self._logp(model, batch))).sum(-1)
                total += float(per_token.double().sum())
                tokens += per_token.numel()
            out.append(total / tokens)
        return out

    def cache_report(self) -> dict:
        return {"evaluations": self.evaluations}


def random_family(root: Path) -> dict[str, Path]:
    """A base with SmolLM2-135M's shape and random weights, and two variants of it (the
    base plus noise): the same per-candidate cost as the trained family, made in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    paths = {name: root / name for name in ("base", "code", "verse")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, (name, path) in enumerate(paths.items()):
        if i:
            g = torch.Generator().manual_seed(i)
            model.load_state_dict(
                {
                    k: v + 0.2 * v.float().std() * torch.randn(v.shape, generator=g).to(v.dtype)
                    for k, v in base.items()
                }
            )
        model.save_pretrained(path)
    return paths


def start_genome(space: SearchSpace, executor: LocalExecutor, how: str):
    """Where CMA-ES starts: Block-Influence removal (what ``tailorkit prune`` does), from
    the runner's own recorded states of the base, or the middle layers removed."""
    n = space.num_layers
    if how == "middle":
        return space.initial([abs(i - n / 2) for i in range(n)])
    boundaries = executor.runner.activations.boundaries()
    return space.initial(block_influence(boundaries).tolist())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--budget", type=int, default=120, help="evaluations (the gptailor default)")
    p.add_argument("--popsize", type=int, default=12)
    p.add_argument("--sigma0", type=float, default=SearchSettings.sigma0)
    p.add_argument("--windows", type=int, default=8, help="calibration windows (all fidelity)")
    p.add_argument("--fidelity", type=int, default=4, help="small-slice windows")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--start", choices=("block-influence", "middle"), default="block-influence")
    p.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    p.add_argument("--device", default="cpu", help="where candidates run: cpu, cuda")
    p.add_argument(
        "--family",
        choices=("trained", "random"),
        default="trained",
        help="trained: make_family.py's SmolLM2 variants; random: random weights of SmolLM2's "
        "shape (for machines without the family; the search's path differs)",
    )
    p.add_argument("--random-dir", default="/tmp/tailorkit-random-family")
    p.add_argument("--positions", type=int, help="score the KL on this many positions/window")
    p.add_argument("--dtype", default="float32", help="the dtype candidates run in")
    p.add_argument(
        "--top-k", type=int, help="score the KL on the teacher's top k tokens + a bucket"
    )
    p.add_argument("--json", default="benchmarks/results/search_speed.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    if args.family == "random":
        family = random_family(Path(args.random_dir))
        windows = torch.randint(
            0, 49152, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0)
        )
    else:
        family = family_paths()
    base, candidates = str(family["base"]), [str(family[k]) for k in family if k != "base"]
    source = Source(base)
    if args.family != "random":
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        windows = token_windows(tokenizer, seq_len=args.seq_len, num_windows=args.windows)
    space = SearchSpace(
        base=base,
        candidates=tuple(candidates),
        num_layers=source.num_layers,
        remove=removal_budget(source, args.ratio, source.num_layers - 1),
        dtype=args.dtype,
    )
    settings = SearchSettings(
        budget=args.budget,
        popsize=args.popsize,
        sigma0=args.sigma0,
        seed=0,
        fidelity_windows=args.fidelity,
    )
    config = RunnerConfig(
        base=base,
        windows=windows,
        candidates=dict(zip(space.names, candidates)),
        objective=Logits(positions=args.positions, top_k=args.top_k),
        batch_size=args.fidelity,
        device=args.device,
        dtype=args.dtype,
    )
    runs = {
        "caches on": lambda: LocalExecutor(config),
        "caches off": lambda: LocalExecutor(dataclasses.replace(config, caches=False)),
    }
    approximate = args.positions is not None or args.top_k is not None or args.dtype != "float32"
    if approximate:  # what the same search costs as before the options: full KL, float32
        exact = dataclasses.replace(config, caches=False, objective=Logits(), dtype="float32")
        runs["caches off, full KL, float32"] = lambda: LocalExecutor(exact)
    if not args.no_naive:
        runs["naive loop"] = lambda: NaiveExecutor(config)
    # Warm up (first calls of torch kernels, page cache of the shards), untimed.
    warm = LocalExecutor(dataclasses.replace(config, caches=False))
    x0 = start_genome(space, warm, args.start)
    warm.map([space.decode(x0)], None)
    del warm

    # Every run's result scored alike: the full KL on all calibration windows.
    judge = TrialRunner(dataclasses.replace(config, objective=Logits(), dtype="float32"))
    rows, results = [], {}
    for name, make in runs.items():
        executor = make()  # setup (mapping, tracing the base, the teacher) is not timed
        t0 = time.perf_counter()
        out = Path(f"/tmp/tailorkit-search-speed-{name.replace(' ', '-')}")
        result = run_search(space, executor, x0, settings, out, progress=True)
        seconds = time.perf_counter() - t0
        report = executor.cache_report()
        results[name] = result
        row = {
            "run": name,
            "seconds": round(seconds, 1),
            "evaluations": report["evaluations"],
            "evaluations_per_minute": round(report["evaluations"] / seconds * 60, 1),
            "best_fitness": result.fitness,
            "best_full_kl": judge.score(result.recipe),
            "same_recipe": result.recipe == results["caches on"].recipe,
        }
        for key in ("layer_forwards", "layers_reused", "objective_passes", "scores_reused"):
            row[key] = report.get(key)
        for key in ("prefix_hit_rate", "layer_work_saved"):
            row[key] = round(report[key], 3) if key in report else None
        rows.append(row)
        print(row, flush=True)
    on = rows[0]["evaluations_per_minute"]
    speedups = {r["run"]: on / r["evaluations_per_minute"] for r in rows[1:]}
    same = results["caches off"].fitness == results["caches on"].fitness and rows[1]["same_recipe"]
    baseline = "caches off, full KL, float32" if approximate else "caches off"

    def cell(value, fmt="{}"):
        return "" if value is None else fmt.format(value)

    table = "\n".join(
        [
            "| run | seconds | evaluations | eval/min | layer forwards | layers reused | "
            "scores reused | objective passes | layer work saved | best KL | its full KL | "
            "same recipe |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            *(
                f"| {r['run']} | {r['seconds']} | {r['evaluations']} | "
                f"{r['evaluations_per_minute']} | {cell(r['layer_forwards'])} | "
                f"{cell(r['layers_reused'])} | {cell(r['scores_reused'])} | "
                f"{cell(r['objective_passes'])} | {cell(r['layer_work_saved'], '{:.1%}')} | "
                f"{r['best_fitness']:.6f} | {r['best_full_kl']:.6f} | "
                f"{'yes' if r['same_recipe'] else 'no'} |"
                for r in rows
            ),
            "",
            *(
                f"caches on vs {name}: {x:.2f}x more evaluations per minute"
                for name, x in speedups.items()
            ),
            f"goal (>= 3x vs {baseline}): "
            f"{'met' if speedups[baseline] >= 3 else 'NOT met'}; "
            f"caches on and off reach the same recipe and fitness: {same}",
        ]
    )
    print(table)
    data = {
        "benchmark": "search_speed",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/search_speed.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args),
        "rows": rows,
        "speedups": speedups,
        "same_result": same,
        "table": table,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
