"""Build a recipe into a standard Hugging Face checkpoint on disk, streaming.

Reads each needed source byte once and writes each output byte once: unchanged
tensors are copied file-to-file, merged ones are computed a chunk at a time and
written at their final offset.  The copies run on a thread of their own from the
start, while the merges are computed on this one: nothing on the way to the first
copied byte imports torch (plan, headers and writer work with dtype names), so the
copies overlap torch's import (at the first merge) as well as the merges.  The
directory appears at its target path only when complete.  With ``device="cuda"``
the merges run on the GPU, streamed through pinned buffers with reads, transfers,
kernels and writes overlapped (tailorkit/gpu_build.py); the files are
byte-identical to the CPU build's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tqdm.auto import tqdm

from tailorkit.checkpoint.source import Source
from tailorkit.checkpoint.writer import (
    ShardWriter,
    TensorSpec,
    atomic_directory,
    parse_size,
    shard_names,
    split_shards,
)
from tailorkit.errors import CheckpointError, TailorkitError
from tailorkit.plan import Plan, TensorJob
from tailorkit.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from tailorkit.gpu_build import DeviceStreamer

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SHARD_SIZE = "5GB"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def build(
    recipe: Recipe | Plan | str | Path,
    out_dir: str | Path,
    *,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    readme: str | None = None,
    extra_files: dict[str, Path] | None = None,
    extra_texts: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write the model a recipe describes to ``out_dir`` as a Hugging Face checkpoint.

    ``recipe`` may be a Recipe, a path to a recipe file, or an already validated
    Plan.  ``readme`` replaces the short generated README.md (model card).
    ``extra_files`` (name -> file or folder to copy) and ``extra_texts`` (name -> content), e.g.
    the figures a model card shows, are written beside the weights, inside the
    same atomic step.  ``device`` is where merged tensors are computed: ``"cpu"``
    (the default) or ``"cuda"`` / ``"cuda:N"``, which streams them through the
    GPU and writes the same bytes; asking for CUDA where there is none raises a
    TailorkitError saying why, before anything is written.
    """
    target = _cuda_device(device)
    plan = recipe if isinstance(recipe, Plan) else _as_recipe(recipe).plan(dtype)
    max_bytes = parse_size(shard_size)
    for name in (*(extra_files or {}), *(extra_texts or {})):
        _plain_name(name)  # before hours of writing, not after
    out_dir = Path(out_dir)
    _check_output(out_dir, plan)
    # Made while the copies run (a method's card imports its registry, hence torch).
    make_card = (lambda: readme) if readme is not None else (lambda: default_readme(plan))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        with _streamer(target) as streamer:
            card = _write_weights(plan, tmp, max_bytes, progress, streamer, meanwhile=make_card)
        _write_text(tmp / "config.json", json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(plan.base, tmp)
        _write_recipe(plan.recipe, tmp / "recipe.yaml")
        _write_text(tmp / "README.md", card)
        for name, src in (extra_files or {}).items():
            _copy(src, tmp / _plain_name(name))
        for name, text in (extra_texts or {}).items():
            _write_text(tmp / _plain_name(name), text)
    log.info("built %s: %s", out_dir, plan.summary())
    return out_dir


def _check_output(out_dir: Path, plan: Plan) -> None:
    """The output may not be, contain or lie inside a model the build reads, nor be or
    contain the recipe's own folder: replacing it would destroy what it is built from."""
    out = out_dir.resolve()
    for name, source in plan.sources.items():
        folder = source.path.resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            raise TailorkitError(
                f"{out_dir}: is, contains or lies inside {folder}, model {name!r} of the "
                "recipe, which the build reads; write the output somewhere else"
            )
    folder = plan.recipe.folder.resolve() if plan.recipe.folder else None
    if folder is not None and (out == folder or out in folder.parents):
        raise TailorkitError(
            f"{out_dir}: is or contains {folder}, the recipe's own folder; write the output "
            "somewhere else"
        )


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:  # a full disk, most likely: say which file, not a bare errno
        raise CheckpointError(f"{path}: write failed ({e.strerror or e})") from e


def _write_recipe(recipe: Recipe, path: Path) -> None:
    """recipe.yaml, and the fitted tensors file it names, so the folder rebuilds itself."""
    try:
        recipe.save(path)
    except OSError as e:
        raise CheckpointError(f"{path}: write failed ({e.strerror or e})") from e


def _copy(src: str | Path, dst: Path) -> None:
    try:
        if Path(src).is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    except OSError as e:  # shutil.Error (copytree) is an OSError too
        raise CheckpointError(
            f"{dst}: copying {src} failed ({getattr(e, 'strerror', None) or e})"
        ) from e


def _plain_name(name: str) -> str:
    """A file name that stays inside the output folder."""
    if not name or Path(name).name != name or name in (".", "..") or "\0" in name:
        raise TailorkitError(
            f"extra file name {name!r} must be a plain file name (no folder, no '..'): "
            "it is written inside the output folder"
        )
    return name


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def _cuda_device(device: str | torch.device) -> torch.device | None:
    """The CUDA device to merge on, or None for the CPU path (decided without torch when
    the answer is plainly the CPU, so that path starts without waiting for it)."""
    if isinstance(device, str) and device == "cpu":
        return None
    from tailorkit.devices import resolve_device

    target = resolve_device(device)
    return target if target.type == "cuda" else None


def _streamer(device: torch.device | None):
    """The GPU pipeline for a CUDA device (a context manager), or None for the CPU path."""
    if device is None:
        return contextlib.nullcontext()
    from tailorkit.gpu_build import DeviceStreamer

    return DeviceStreamer(device)


def _write_weights(
    plan: Plan,
    out: Path,
    max_bytes: int,
    progress: bool,
    streamer: DeviceStreamer | None = None,
    meanwhile: Callable[[], T] = lambda: None,
) -> T:
    """The shards (and their index); returns ``meanwhile()``, run on this thread once the
    merges are done, while copies may still be running."""
    jobs = {j.name: j for j in plan.jobs}
    specs = [TensorSpec(j.name, j.dtype, j.shape) for j in plan.jobs]
    shards = split_shards(specs, max_bytes)
    names = shard_names(len(shards))
    plan.check_unchanged()
    with (
        contextlib.ExitStack() as files,
        tqdm(
            total=plan.nbytes, unit="B", unit_scale=True, desc="build", disable=not progress
        ) as bar,
    ):
        writers = []
        for file, shard in zip(names, shards):
            writers.append(ShardWriter(out / file, shard))
            files.callback(writers[-1].close)
        placed = [(w, jobs[s.name]) for w, shard in zip(writers, shards) for s in shard]
        compute = _compute_here if streamer is None else streamer.write
        result = _write_all(placed, _locked(bar.update), meanwhile, compute)
    # A source rewritten while we read it would have produced garbage: say so instead.
    plan.check_unchanged()
    weight_map = {spec.name: file for file, shard in zip(names, shards) for spec in shard}
    if len(names) > 1:
        index = {"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map}
        _write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return result


def _locked(update: Callable[[int], object]) -> Callable[[int], None]:
    lock = threading.Lock()

    def locked(n: int) -> None:
        with lock:
            update(n)

    return locked


Placed = list[tuple[ShardWriter, TensorJob]]
# Writes the computed tensors, reporting bytes to progress, until the stop test is true.
Compute = Callable[[Placed, Callable[[int], None], Callable[[], bool]], None]


def _write_all(
    placed: Placed, progress: Callable[[int], None], meanwhile: Callable[[], T], compute: Compute
) -> T:
    """Every tensor into its shard: the unchanged ones copied file to file on a thread of
    their own (the kernel does the work, the GIL is free), the computed ones by
    ``compute`` here (or on its device's lanes), at the same time; then ``meanwhile()``
    here, whose value is returned, and then this thread takes copies too until none is
    left. The first error of either side stops both, and is raised once both have
    stopped, so nothing still writes to a shard the caller closes."""
    copies = deque((w, j) for w, j in placed if j.is_raw_copy)
    computed = [(w, j) for w, j in placed if not j.is_raw_copy]
    stop = threading.Event()
    failed: list[BaseException] = []

    def copy_all() -> None:
        while not stop.is_set() and not failed:
            try:
                writer, job = copies.popleft()  # atomic: each copy is taken once
            except IndexError:
                return
            info = job.inputs[0].info
            try:
                writer.copy(job.name, info.file, info.start)
            except BaseException as error:  # noqa: BLE001 -- raised on the calling thread
                failed.append(_copy_error(job, error))
                return
            progress(job.nbytes)

    log.info(
        "copying %d unchanged tensors (%.2f GB) file to file while computing %d",
        len(copies),
        sum(j.nbytes for _, j in copies) / 1e9,
        len(computed),
    )
    copier = threading.Thread(target=copy_all, name="tailorkit-copy")
    copier.start()
    try:
        compute(computed, progress, lambda: bool(failed))
        result = meanwhile() if not failed else None
        copy_all()  # what the copy thread has not reached yet: two threads copy now
    except BaseException:
        stop.set()
        raise
    finally:
        copier.join()
    if failed:
        raise failed[0]
    return result


def _compute_here(
    computed: Placed, progress: Callable[[int], None], stopped: Callable[[], bool]
) -> None:
    """The CPU path's :data:`Compute`: one tensor after another, on this thread, every
    chunk made in the same memory. Fixed linear combinations are computed without torch
    (combine.py), so they start at once; anything else imports torch when it comes."""
    from tailorkit.combine import ChunkBuffer

    buffer = ChunkBuffer()
    for writer, job in computed:
        if stopped():
            return
        _write_tensor(writer, job, job.chunks(buffer))
        progress(job.nbytes)


def _copy_error(job: TensorJob, error: BaseException) -> BaseException:
    """A source cut short while it was copied says it changed on disk, not "ended early"."""
    try:
        job.check_unchanged()
    except CheckpointError as changed:
        return changed
    return error


def _write_tensor(
    writer: ShardWriter, job: TensorJob, chunks: Iterator[torch.Tensor | memoryview]
) -> None:
    """Write the output's chunks (flat tensors or bytes, in order) as they come."""
    at, size = 0, job.dtype.itemsize
    while True:
        job.check_unchanged()  # before each chunk's mapped reads
        chunk = next(chunks, None)
        if chunk is None:
            break
        done = at
        at += writer.write(job.name, chunk, at)
        # Drop the mapped source pages behind this chunk: with a tensor of gigabytes,
        # resident memory stays near one chunk per source, not the whole tensor.
        job.release(done // size, at // size)
        del chunk  # one made outside the buffer is freed before the next is computed
    job.release()  # pages a slerp reduction or a TIES merge touched


def _copy_side_files(base: Source, out: Path) -> None:
    for name in ("generation_config.json", *TOKENIZER_FILES):
        src = base.path / name
        if src.is_file():
            _copy(src, out / name)


def default_readme(plan: Plan) -> str:
    """The model card (tailorkit.card.make_model_card) of a plan built without a method."""
    from tailorkit.card import make_model_card

    return make_model_card(plan).content
