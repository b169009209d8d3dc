"""Where candidates are evaluated: in this process, or on Ray workers.

Both take the same :class:`EvaluatorConfig` and return fitness values in the order
of the recipes given, so the search is the same whichever runs it. Each Ray worker
builds its own evaluator: it maps the sources itself and keeps its own caches.
"""

from __future__ import annotations

from collections.abc import Sequence

from tailorkit.errors import MethodError
from tailorkit.recipe import Recipe
from tailorkit.search.evaluator import Evaluator, EvaluatorConfig

EXECUTORS = ("local", "ray")


class LocalExecutor:
    def __init__(self, config: EvaluatorConfig):
        self.evaluator = Evaluator(config)

    def map(self, recipes: Sequence[Recipe], windows: int | None) -> list[float]:
        return [self.evaluator.evaluate(r, windows) for r in recipes]

    def cache_report(self) -> dict:
        return self.evaluator.cache_report()

    def close(self) -> None:
        pass


class _Worker:
    """One Ray actor: an Evaluator of its own."""

    def __init__(self, config: EvaluatorConfig):
        self.evaluator = Evaluator(config)

    def evaluate(self, recipe: dict, windows: int | None) -> float:
        return self.evaluator.evaluate(Recipe.from_dict(recipe), windows)

    def cache_report(self) -> dict:
        return self.evaluator.cache_report()


class RayExecutor:
    """Population members spread over Ray actors (one per GPU, or per CPU slot)."""

    def __init__(
        self,
        config: EvaluatorConfig,
        *,
        workers: int = 2,
        address: str | None = None,
        gpus_per_worker: float = 0,
        cpus_per_worker: float = 1,
    ):
        try:
            import ray
        except ImportError as e:
            raise MethodError("executor='ray' needs Ray: pip install 'tailorkit[ray]'") from e
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        self.actors = [actor.remote(config) for _ in range(max(1, workers))]

    def map(self, recipes: Sequence[Recipe], windows: int | None) -> list[float]:
        futures = [
            self.actors[i % len(self.actors)].evaluate.remote(r.to_dict(), windows)
            for i, r in enumerate(recipes)
        ]
        return [float(x) for x in self.ray.get(futures)]

    def cache_report(self) -> dict:
        reports = self.ray.get([a.cache_report.remote() for a in self.actors])
        total = {k: sum(r[k] for r in reports) for k in ("evaluations", "layer_forwards")}
        total["layers_reused"] = sum(r["layers_reused"] for r in reports)
        seen = total["layer_forwards"] + total["layers_reused"]
        total["prefix_hit_rate"] = total["layers_reused"] / seen if seen else 0.0
        total["workers"] = len(reports)
        return total

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, config: EvaluatorConfig, **options):
    if name == "local":
        return LocalExecutor(config)
    if name == "ray":
        return RayExecutor(config, **options)
    raise MethodError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
