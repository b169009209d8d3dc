"""Where candidates are evaluated: in this process, or on Ray workers.

Both take the same :class:`~tailorkit.trials.RunnerConfig` and return fitness values
in the order of the recipes given, so the search is the same whichever runs it. Each
Ray worker builds its own trial runner: it maps the sources itself and keeps its own
caches.
"""

from __future__ import annotations

from collections.abc import Sequence

from tailorkit.errors import MethodError
from tailorkit.recipe import Recipe
from tailorkit.trials import RunnerConfig, RunnerStats, TrialRunner

EXECUTORS = ("local", "ray")


class LocalExecutor:
    def __init__(self, config: RunnerConfig):
        self.runner = TrialRunner(config)

    def map(self, recipes: Sequence[Recipe], windows: int | None) -> list[float]:
        return [self.runner.score(r, windows=windows) for r in recipes]

    def cache_report(self) -> dict:
        return self.runner.cache_report()

    def close(self) -> None:
        pass


class RayExecutor:
    """Population members spread over Ray actors (one per GPU, or per CPU slot)."""

    def __init__(
        self,
        config: RunnerConfig,
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
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(LocalExecutor)
        self.actors = [actor.remote(config) for _ in range(max(1, workers))]

    def map(self, recipes: Sequence[Recipe], windows: int | None) -> list[float]:
        # Each actor has caches of its own: give each a contiguous run of the recipes in
        # layer order, so candidates that share a prefix meet in the same cache.
        keys = [repr(r.output_layers()) for r in recipes]
        order = sorted(range(len(recipes)), key=keys.__getitem__)
        share = -(-len(recipes) // len(self.actors))
        futures = {
            i: self.actors[n // share].map.remote([recipes[i]], windows)
            for n, i in enumerate(order)
        }
        return [float(self.ray.get(futures[i])[0]) for i in range(len(recipes))]

    def cache_report(self) -> dict:
        reports = self.ray.get([a.cache_report.remote() for a in self.actors])
        fields = RunnerStats.__dataclass_fields__
        total = RunnerStats(**{k: sum(r[k] for r in reports) for k in fields})
        return {**total.report(), "workers": len(reports)}

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, config: RunnerConfig, **options):
    if name == "local":
        return LocalExecutor(config)
    if name == "ray":
        return RayExecutor(config, **options)
    raise MethodError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
