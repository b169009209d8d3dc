"""``tailorkit.evaluate``: perplexity and zero-shot tasks, optionally against the dense model."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tailorkit.devices import resolve_device
from tailorkit.errors import CheckpointError, EvalError
from tailorkit.eval.compare import Evaluation
from tailorkit.eval.perplexity import perplexity, read_text, resolve_context
from tailorkit.eval.speed import check_settings, measure_speeds, speed_ratio
from tailorkit.plan import torch_dtype

log = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


def check_checkpoint_dir(path: Path) -> None:
    """Raise CheckpointError unless ``path`` holds config.json and safetensors weights whose
    headers pass tailorkit's strict reader (a truncated shard is refused here, not met as a
    traceback inside transformers)."""
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: not a model checkpoint (no config.json); give a directory written by "
            "`tailorkit build` or save_pretrained, a recipe file, or a model id"
        )
    has_weights = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    if not has_weights:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        why = (
            f"only pickle weights ({pickles[0]}), which tailorkit does not load"
            if pickles
            else "no model.safetensors or model.safetensors.index.json"
        )
        raise CheckpointError(f"{path}: not a model checkpoint: {why}")
    from tailorkit.checkpoint.source import Source

    Source(str(path))  # every shard through the strict header parser: truncation is an error


def _dtype(dtype: str | torch.dtype | None):
    return "auto" if dtype in (None, "auto") else torch_dtype(dtype)


def _load_tokenizer(ref, fallback: Path | None):
    from transformers import AutoTokenizer

    if ref is not None and not isinstance(ref, (str, Path)):
        return ref  # already a tokenizer object
    where = ref if ref is not None else fallback
    if where is None:
        raise EvalError("a model given as an object needs tokenizer= (an object or a path)")
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{where}: no usable tokenizer ({type(e).__name__}); pass tokenizer= "
            "(--tokenizer) naming a directory or model that has one"
        ) from None


def load_model(
    model,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """A model and tokenizer from an object, a checkpoint directory, a recipe file or a ref.

    A recipe file is assembled in memory (no write); a reference (``builtin:NAME``,
    ``org/name``) is resolved like a recipe's models.  The tokenizer defaults to the
    checkpoint's own (a recipe's: its base model's).
    """
    from transformers import AutoModelForCausalLM

    from tailorkit.plan import Plan
    from tailorkit.recipe import Recipe

    target = resolve_device("auto" if device is None else device)
    name = None
    if isinstance(model, (str, Path)) and Path(model).expanduser().is_file():
        if Path(model).suffix not in RECIPE_SUFFIXES:
            raise CheckpointError(
                f"{model}: a file, but not a recipe (.yaml/.json); a model is a directory"
            )
        name, model = str(model), Recipe.load(Path(model).expanduser())
    is_result = hasattr(model, "recipe") and hasattr(model, "plan") and hasattr(model, "model")
    if isinstance(model, (Recipe, Plan)) or is_result:
        # A recipe or plan (assembled in memory), or a PruneResult (its model, assembled).
        from tailorkit.assembly import assemble

        if isinstance(model, Recipe):
            plan = model.plan(
                None if dtype in (None, "auto") else str(dtype).removeprefix("torch.")
            )
        else:
            plan = model if isinstance(model, Plan) else model.plan
        built = model.model if is_result else assemble(plan)
        tok = _load_tokenizer(tokenizer, plan.base.path)
        name = name or f"recipe {plan.recipe.fingerprint()}"
        return LoadedModel(built.to(target).eval(), tok, name)
    if isinstance(model, torch.nn.Module):
        tok_dir = getattr(model, "name_or_path", None) or None
        tok = _load_tokenizer(tokenizer, Path(tok_dir) if tok_dir and tokenizer is None else None)
        if device is not None:
            model.to(target)
        if dtype not in (None, "auto"):
            model.to(_dtype(dtype))
        return LoadedModel(model.eval(), tok, type(model).__name__)

    ref = str(model)
    path = Path(ref).expanduser()
    if not path.is_dir():
        from tailorkit.checkpoint.source import resolve

        path = resolve(ref)
    check_checkpoint_dir(path)
    tok = _load_tokenizer(tokenizer, path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(dtype), use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: transformers cannot load it: {e}") from None
    return LoadedModel(loaded.to(target).eval(), tok, ref)


def evaluate(
    model,
    *,
    ppl: list[str | Path] | str | Path | None = None,
    tasks: list[str] | str | None = None,
    limit: int | float | None = None,
    context_length: int | None = None,
    stride: int | None = None,
    compare=None,
    tokenizer=None,
    compare_tokenizer=None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 8,
    task_paths: list[str | Path] | None = None,
    speed: bool = False,
    speed_prompt_tokens: int = 512,
    speed_new_tokens: int = 64,
    speed_repeats: int = 3,
) -> Evaluation:
    """Evaluate a model; with ``compare=BASE``, the dense model too, and their retention.

    ``model`` (and ``compare``): a transformers model object (give ``tokenizer=``
    unless its ``name_or_path`` holds one), a checkpoint directory, a recipe file, a
    Recipe, Plan or PruneResult (assembled in memory, never written), or a model
    reference (``builtin:NAME``, ``org/name``).

    ``ppl``: text files; perplexity with sliding windows of ``context_length`` tokens
    (default: the model's maximum, at most 2048) every ``stride`` tokens (default half
    the context).  ``tasks``: lm-eval task or group names — tailorkit's offline
    ``tk_next_line`` suite, lm-eval's registry, or tasks in ``task_paths`` folders —
    with at most ``limit`` documents each.  ``device``: ``auto`` (default: CUDA if
    present), ``cpu``, ``cuda:N``; ``dtype``: ``auto`` (the checkpoint's) or a float type.

    ``speed``: also time generation (:func:`tailorkit.eval.speed.measure_speed`): a
    prompt of ``speed_prompt_tokens`` seeded random ids, then ``speed_new_tokens``
    greedy decode steps on the cache; median of ``speed_repeats`` runs.  With
    ``compare``, both models are then held in memory together and measured in turn
    (dense, tailored, dense, ...), and the result's ``speed`` holds both and the
    speed-ups.

    Returns an :class:`Evaluation`; ``.to_json()`` and ``.table()`` render it.
    Raises EvalError / CheckpointError on bad input, before any model is loaded where
    the input can be checked up front (text files, task names, settings).
    """
    from tailorkit.eval.tasks import task_manager

    ppl_files = [ppl] if isinstance(ppl, (str, Path)) else list(ppl or [])
    task_names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    )
    task_names = [t for t in task_names if t]
    if not ppl_files and not task_names and not speed:
        raise EvalError(
            "nothing to evaluate: give text files (ppl=, --ppl), tasks= (--tasks) "
            "and/or speed=True (--speed)"
        )
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
        raise EvalError(f"limit must be a positive count (or a fraction in (0, 1]), got {limit}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    if speed:
        for name, value in (
            ("speed_prompt_tokens", speed_prompt_tokens),
            ("speed_new_tokens", speed_new_tokens),
            ("speed_repeats", speed_repeats),
        ):
            if not isinstance(value, int) or value < 1:
                raise EvalError(f"{name} must be a whole number >= 1, got {value!r}")
    for f in ppl_files:
        read_text(f)  # fail now, not after loading a model
    manager = task_manager(task_names, task_paths) if task_names else None
    resolve_device("auto" if device is None else device)
    _dtype(dtype)

    settings: dict[str, Any] = {
        "ppl": [str(f) for f in ppl_files],
        "tasks": task_names,
        "limit": limit,
        "batch_size": batch_size,
        "dtype": str(dtype or "auto"),
    }

    def run(which, tok) -> tuple[Evaluation, LoadedModel]:
        loaded = load_model(which, tokenizer=tok, device=device, dtype=dtype)
        if speed:  # sizes the model cannot take fail now, not after its tasks
            check_settings(loaded.model, speed_prompt_tokens, speed_new_tokens)
        nonlocal context_length, stride
        if ppl_files:
            # The first model fixes the windows, so both models see the same ones.
            context_length, stride = resolve_context(loaded.model, context_length, stride)
        result = Evaluation(model=loaded.name, settings=dict(settings))
        result.settings["device"] = str(next(loaded.model.parameters()).device)
        for f in ppl_files:
            log.info("perplexity of %s on %s", loaded.name, f)
            p = perplexity(
                loaded.model,
                loaded.tokenizer,
                f,
                context_length=context_length,
                stride=stride,
                batch_size=batch_size,
            )
            result.perplexity[str(f)] = p.to_dict()
        if task_names:
            from tailorkit.eval.tasks import run_tasks

            log.info("tasks %s on %s", ", ".join(task_names), loaded.name)
            result.tasks = run_tasks(
                loaded.model,
                loaded.tokenizer,
                task_names,
                limit=limit,
                batch_size=batch_size,
                manager=manager,
            )
        if ppl_files:
            result.settings.update(context_length=context_length, stride=stride)
        result.settings["versions"] = _versions()
        return result, loaded

    result, loaded = run(model, tokenizer)
    if compare is None:
        if speed:
            (mine,) = _speeds([loaded.model], speed_prompt_tokens, speed_new_tokens, speed_repeats)
            result.speed = {"model": mine}
        return _recorded(model, result)
    if not speed:
        del loaded  # one model in memory at a time
        gc.collect()
    result.baseline, dense = run(compare, compare_tokenizer)
    if speed:
        # Alternating (dense, tailored, dense, ...) spreads the machine's noise over both.
        base, mine = _speeds(
            [dense.model, loaded.model], speed_prompt_tokens, speed_new_tokens, speed_repeats
        )
        result.speed = {"model": mine, "base": base, "speedup": speed_ratio(base, mine)}
    return _recorded(model, result)


def _recorded(model, result: Evaluation) -> Evaluation:
    """A PruneResult keeps its evaluation, so that its model card shows it (the speed rows
    of the size table among it). Known by its attributes: tailorkit.result imports this."""
    if all(hasattr(model, a) for a in ("recipe", "plan", "model", "evaluation")):
        model.evaluation = result.to_dict()
    return result


def _speeds(models, prompt_tokens: int, new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    log.info("speed: %d prompt tokens, %d new tokens", prompt_tokens, new_tokens)
    found = measure_speeds(
        models, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats
    )
    return [s.to_dict() for s in found]


def _versions() -> dict[str, str]:
    import transformers

    from tailorkit.version import __version__

    versions = {"tailorkit": __version__, "torch": torch.__version__}
    versions["transformers"] = transformers.__version__
    try:
        import lm_eval

        versions["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return versions
