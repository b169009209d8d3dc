"""The CMA-ES loop: multi-fidelity evaluation, a JSONL log, resume, a convergence plot.

Every generation the population is scored on a small slice of the calibration
windows (what CMA-ES sees); the best few are scored again on all of them, and the
best full-fidelity candidate is the result. The mean the search starts from is
scored first, so the result is never worse than that baseline.

Resuming needs no pickled state: the log holds every generation's fitness values,
and CMA-ES is deterministic given its seed, so the driver replays the logged
generations (ask, then tell the logged values, checking that it asked for the same
candidates) and goes on from there, reaching what an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tailorkit.errors import MethodError
from tailorkit.recipe import Recipe
from tailorkit.search.space import SearchSpace

log = logging.getLogger(__name__)

LOG_NAME = "search.jsonl"
STATE_NAME = "search_state.json"
PLOT_NAME = "convergence.png"


@dataclass
class SearchSettings:
    budget: int = 120  # candidate evaluations at the small fidelity
    popsize: int = 12
    sigma0: float = 0.5
    seed: int = 0
    fidelity_windows: int | None = None  # small slice; None: all windows (one fidelity)
    reevaluate: int = 2  # best of each generation re-scored on all windows
    # What a fitness means (objective, its approximations, the trials' dtype): a resumed
    # search must score as the logged one did, or its replayed fitness values would not
    # compare with the new ones.
    scoring: str = ""


@dataclass
class SearchResult:
    recipe: Recipe
    fitness: float
    start_fitness: float
    generations: int
    evaluations: int
    history: list[dict] = field(default_factory=list)  # per generation
    log: Path | None = None
    plot: Path | None = None


def run_search(
    space: SearchSpace,
    executor,
    x0: np.ndarray,
    settings: SearchSettings,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    import cma

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    replay = _read_generations(log_path) if resume else []
    if not resume and log_path.exists():
        log_path.unlink()
    _check_settings(replay, settings)

    small = settings.fidelity_windows
    generations = max(1, math.ceil(settings.budget / settings.popsize))
    es = cma.CMAEvolutionStrategy(
        list(x0),
        settings.sigma0,
        {"popsize": settings.popsize, "seed": settings.seed + 1, "verbose": -9},
    )
    start = space.decode(x0)
    if replay:
        start_fitness = replay[0]["start_fitness"]
    else:
        start_fitness = executor.map([start], None)[0]
    best = (start_fitness, start)
    history: list[dict] = []
    bar = tqdm(range(generations), desc="gptailor", disable=not progress)
    with open(log_path, "a") as log:
        for gen in bar:
            xs = es.ask()
            recipes = [space.decode(x) for x in xs]
            prints = [r.fingerprint() for r in recipes]
            if gen < len(replay):
                record = replay[gen]
                if record["candidates"] != prints:
                    raise MethodError(
                        f"{log_path}: generation {gen} of the log is not what this search "
                        "asks for (other settings, seed or models?); start it afresh"
                    )
            else:
                record = _evaluate_generation(
                    gen, recipes, prints, executor, small, settings, start_fitness
                )
                _write(log, record)
            es.tell(xs, record["fitness"])
            for i, full in record["full"].items():
                if full < best[0]:
                    best = (full, recipes[int(i)])
            history.append(
                {
                    "generation": gen,
                    "evaluations": (gen + 1) * settings.popsize,
                    "min": min(record["fitness"]),
                    "median": float(np.median(record["fitness"])),
                    "best_full": best[0],
                }
            )
            bar.set_postfix(best=f"{best[0]:.4f}")
            _save_state(out_dir, space, settings, gen, best, start_fitness)
    result = SearchResult(
        recipe=best[1],
        fitness=best[0],
        start_fitness=start_fitness,
        generations=generations,
        evaluations=generations * settings.popsize,
        history=history,
        log=log_path,
    )
    result.plot = plot_convergence(history, start_fitness, out_dir / PLOT_NAME)
    return result


def _evaluate_generation(gen, recipes, prints, executor, small, settings, start_fitness) -> dict:
    fitness = executor.map(recipes, small)
    full: dict[str, float] = {}
    if small is None:
        full = {str(i): f for i, f in enumerate(fitness)}
    else:
        top = sorted(range(len(fitness)), key=fitness.__getitem__)[: settings.reevaluate]
        scores = executor.map([recipes[i] for i in top], None)
        full = {str(i): f for i, f in zip(top, scores)}
    return {
        "type": "generation",
        "generation": gen,
        "start_fitness": start_fitness,
        "settings": asdict(settings),
        "candidates": prints,
        "fitness": [float(f) for f in fitness],
        "full": full,
        "layers": [len(r.layers) for r in recipes],
    }


def _write(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def _read_generations(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the interruption: that generation is run again
        if record.get("type") != "generation" or record.get("generation") != len(records):
            raise MethodError(f"{path}: line {n} is not generation {len(records)} of a search")
        records.append(record)
    return records


def _check_settings(replay: list[dict], settings: SearchSettings) -> None:
    if not replay:
        return
    logged, ours = replay[0]["settings"], asdict(settings)
    if "scoring" not in logged:  # a log from before it was recorded: cannot be checked
        log.warning(
            "resuming a search whose log does not say how candidates were scored (an older "
            "tailorkit): it must have used the objective, kl_top_k, kl_positions and dtype "
            "of this run (%s)",
            settings.scoring or "not given",
        )
        logged = {**logged, "scoring": ours["scoring"]}
    differ = [
        f"{k}: logged {logged.get(k)!r}, now {ours[k]!r}" for k in ours if logged.get(k) != ours[k]
    ]
    if differ:
        raise MethodError(
            "cannot resume: the log is from a search with other settings ("
            + "; ".join(differ)
            + ")"
        )


def _save_state(out_dir, space, settings, gen, best, start_fitness) -> None:
    state = {
        "generation": gen,
        "best_fitness": best[0],
        "start_fitness": start_fitness,
        "best_recipe": best[1].to_dict(),
        "settings": asdict(settings),
        "space": {"num_layers": space.num_layers, "remove": space.remove},
    }
    tmp = out_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, out_dir / STATE_NAME)


def plot_convergence(history: list[dict], start: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [h["evaluations"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(x, [h["median"] for h in history], label="generation median (small slice)", alpha=0.6)
    ax.plot(x, [h["min"] for h in history], label="generation best (small slice)", alpha=0.8)
    ax.plot(x, [h["best_full"] for h in history], label="best so far (all windows)", lw=2)
    ax.axhline(start, color="grey", ls="--", lw=1, label="starting plan")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("objective (lower is better)")
    ax.set_title("GPTailor search (CMA-ES)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
