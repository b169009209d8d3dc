"""The streaming build with its merges on a CUDA device (``build(..., device="cuda")``).

Unchanged tensors are copied file to file by the kernel (``copy_file_range``) on
the build's copy thread, as on the CPU path (``builder._write_all``). Merged tensors are cut into
chunks of ``chunk_elements`` elements, and a small ring of *lanes* -- worker
threads, each with its own CUDA stream, pinned host buffers and device
buffers -- moves every chunk through five steps::

    pread  source bytes (page cache -> pinned buffer, one per source)
    H2D    pinned -> device, asynchronous on the lane's stream
    merge  tailorkit's fused CUDA kernel (ops.weighted_sum), counting NaN and inf as it writes
    D2H    device -> pinned, asynchronous
    pwrite pinned -> the output shard, at the chunk's final offset

A lane waits only for its own stream, so while one lane reads, others copy,
merge or write: file reads, transfers, kernels and file writes overlap, and
the reads and writes of different lanes run in parallel in the kernel (each
releases the GIL). Memory is bounded by the ring -- lanes x (sources + 1) x
chunk, pinned and on the device -- whatever the model's size. Source bytes are
read with ``pread`` from the shard files rather than through the mmap views,
so the build does not map (and later drop) every source page.

Every lane computes exactly what the CPU path computes -- the same weights
from the same recipe, the same float32 arithmetic in the same order in a
kernel that matches the CPU kernel bit for bit -- so the output files are
byte-identical to ``device="cpu"``'s. Two methods need a whole-tensor pass
first and are handled so that this stays true:

* **slerp**: its angle is a float64 reduction over both tensors. It is computed
  on the CPU from the mmap views, exactly as the CPU build does (a GPU float64
  reduction could differ in the last bit, and so could the weights); the
  weighted sum then streams through the lanes like any other.
* **ties**: its magnitude thresholds (``ops.ties_thresholds``) select over the
  whole task vector. Each TIES tensor is uploaded whole (a pageable copy, not
  through the ring), its thresholds are computed on the device (``kthvalue``
  returns an element of the same float32 magnitudes, so the thresholds equal
  the CPU's), merged by the CUDA TIES kernel and written in one piece. Device
  memory for it is a few float32 copies of that one tensor.

``DeviceStreamer`` also runs with ``device="cpu"``: the same lanes and chunking
with the copies left out. ``build`` does not use that: its CPU path, merging from
the mapped shards with no read copy, was faster with 1 or 2 lanes on 2 cores
(benchmarks/build_lanes.py); the tests do, to exercise the pipeline on machines
without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorkit import ops
from tailorkit.checkpoint.safetensors_format import itemsize
from tailorkit.checkpoint.writer import ShardWriter
from tailorkit.devices import resolve_device
from tailorkit.errors import CheckpointError
from tailorkit.merge import LINEAR_METHODS, new_counter, raise_if_nonfinite
from tailorkit.plan import Input, TensorJob

log = logging.getLogger(__name__)

# 4M elements: 8 MB per bfloat16 source per chunk. Large enough that the per-chunk
# overhead (a few Python calls, launches and one stream synchronisation, ~0.1 ms)
# is small next to its transfers; small enough that the ring stays in the
# hundreds of MB.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
MAX_LANES = 8


def default_lanes() -> int:
    """Lanes for this machine: half its cores (reads and writes run in parallel), 2 to 8."""
    return min(MAX_LANES, max(2, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class _Task:
    """One piece of one output tensor: elements [start, start + count) of ``job``.

    ``whole`` tasks (TIES) compute the whole tensor on the device in one piece, from
    ``views`` (the inputs', then the base's mapped tensors, made on the planning thread).
    """

    job: TensorJob
    writer: ShardWriter
    inputs: tuple[Input, ...] = ()  # in the order of ``coefficients``
    coefficients: tuple[float, ...] = ()
    start: int = 0
    count: int = 0
    whole: bool = False
    views: tuple[torch.Tensor, ...] = ()


class _Files:
    """Read-only file descriptors of the source shards, opened once, shared by the lanes."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open ({e.strerror})") from e
                self._fds[path] = fd
            return fd

    def read_into(self, path: Path, offset: int, buffer: torch.Tensor) -> None:
        """Fill the uint8 CPU tensor ``buffer`` with the file's bytes from ``offset``."""
        fd = self.fd(path)
        view = memoryview(buffer.numpy())
        while view:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as e:
                raise CheckpointError(f"{path}: read failed ({e.strerror})") from e
            if n == 0:
                raise CheckpointError(
                    f"{path}: ended {len(view)} bytes early while reading at offset {offset}"
                )
            view = view[n:]
            offset += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _Lane:
    """One worker's stream and buffers. Created and used on its worker thread only."""

    def __init__(self, device: torch.device, chunk_elements: int):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.chunk_elements = chunk_elements
        self.stream = torch.cuda.Stream(device) if self.on_cuda else None
        self._host_in: list[torch.Tensor] = []
        self._dev_in: list[torch.Tensor] = []
        self._host_out: list[torch.Tensor] = []
        self._dev_out: list[torch.Tensor] = []
        # NaN and inf counted by the merge kernel as it writes; read on the host after the
        # lane's sync (on CUDA through a pinned copy, so checking costs no extra sync).
        self._counter = new_counter(self.device)
        self._host_counter = new_counter().pin_memory() if self.on_cuda else self._counter

    def _buffer(self, pool: list[torch.Tensor], slot: int, nbytes: int, dtype, where: str):
        """The first ``nbytes`` of buffer ``slot`` of ``pool``, grown to fit (a full chunk
        of ``dtype`` at least, so that small tensors do not make it grow step by step)."""
        while len(pool) <= slot:
            pool.append(torch.empty(0, dtype=torch.uint8))
        if pool[slot].numel() < nbytes:
            size = max(nbytes, self.chunk_elements * itemsize(dtype))
            pool[slot] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            if where == "device":
                pool[slot] = torch.empty(size, dtype=torch.uint8, device=self.device)
            else:
                pool[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.on_cuda)
        return pool[slot][:nbytes]

    def _on_stream(self):
        if not self.on_cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def run(self, task: _Task, files: _Files) -> int:
        """Compute and write one task; return the number of bytes written."""
        return self._run_whole(task) if task.whole else self._run_chunk(task, files)

    def _run_chunk(self, task: _Task, files: _Files) -> int:
        job = task.job
        views = []
        with self._on_stream():
            for slot, inp in enumerate(task.inputs):
                size = itemsize(inp.info.dtype)
                nbytes = task.count * size
                host = self._buffer(self._host_in, slot, nbytes, inp.info.dtype, "host")
                files.read_into(inp.info.file, inp.info.start + task.start * size, host)
                if self.on_cuda:
                    dev = self._buffer(self._dev_in, slot, nbytes, inp.info.dtype, "device")
                    dev.copy_(host, non_blocking=True)
                else:
                    dev = host
                views.append(dev.view(inp.info.dtype.torch))
            out_nbytes = task.count * itemsize(job.dtype)
            if self.on_cuda:
                out = self._buffer(self._dev_out, 0, out_nbytes, job.dtype, "device")
            else:
                out = self._buffer(self._host_out, 0, out_nbytes, job.dtype, "host")
            merged = out.view(job.dtype.torch)
            # As the CPU path: a copy is not checked.
            counter = None if job.layer.method == "passthrough" else self._counter.zero_()
            ops.weighted_sum(
                views, list(task.coefficients), job.dtype.torch, out=merged, nonfinite=counter
            )
            if self.on_cuda:
                if counter is not None:
                    self._host_counter.copy_(counter, non_blocking=True)
                host_out = self._buffer(self._host_out, 0, out_nbytes, job.dtype, "host")
                host_out.copy_(out, non_blocking=True)
                self.stream.synchronize()  # the lane's buffers are free again after this
            else:
                host_out = out
            if counter is not None:
                raise_if_nonfinite(self._host_counter, job.where)
        return task.writer.write(job.name, host_out, task.start * itemsize(job.dtype))

    def _run_whole(self, task: _Task) -> int:
        job = task.job
        with self._on_stream():
            on_device = [v.to(self.device) for v in task.views]
            inputs = on_device[: len(job.inputs)]
            base = on_device[-1] if job.base else None
            host = job.merge(inputs, base).reshape(-1).cpu()  # synchronises the lane's stream
        job.release()
        return task.writer.write(job.name, host, 0)


class DeviceStreamer:
    """Writes the tensors of a build's shards with their merges on ``device``.

    Use as a context manager, or call :meth:`close`. Not thread-safe: one build
    drives it.
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        lanes: int | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        self.device = resolve_device(device)
        self.lanes = lanes or default_lanes()
        if self.lanes < 1 or chunk_elements < 1:
            raise ValueError("lanes and chunk_elements must be positive")
        self.chunk_elements = chunk_elements
        if self.device.type == "cuda" and ops.backend() != "cpp+cuda":
            log.warning(
                "building on %s with the PyTorch reference merges (slower, same bytes): %s",
                self.device,
                ops.backend_reason(),
            )
        self._files = _Files()
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._done: queue.Queue[tuple[int, BaseException | None]] = queue.Queue()
        self._skip = threading.Event()  # set after a failure: report queued tasks undone
        self._threads = [
            threading.Thread(target=self._work, name=f"tailorkit-lane-{i}", daemon=True)
            for i in range(self.lanes)
        ]
        for t in self._threads:
            t.start()

    def __enter__(self) -> DeviceStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the lanes and close the source files (idempotent)."""
        if not self._threads:
            return
        self._skip.set()
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        self._files.close()

    def _work(self) -> None:
        lane = None
        while True:
            task = self._tasks.get()
            if task is None:
                return
            if self._skip.is_set():
                self._done.put((0, None))
                continue
            try:
                if lane is None:
                    if self.device.type == "cuda":
                        torch.cuda.set_device(self.device)
                    lane = _Lane(self.device, self.chunk_elements)
                self._done.put((lane.run(task, self._files), None))
            except BaseException as e:  # noqa: BLE001 -- handed to the calling thread
                self._skip.set()
                self._done.put((0, e))

    def _plan(self, job: TensorJob, writer: ShardWriter) -> list[_Task]:
        """The tasks that produce ``job``'s bytes (none for an empty tensor)."""
        if job.numel == 0:
            return []
        inputs = job.all_inputs()
        views = [i.view() for i in inputs]  # zero-copy; made here, as Source is not thread-safe
        if job.layer.method == "ties" or job.fold is not None or job.gather is not None:
            # Whole on the device; a gather of kept channels reads scattered rows or columns.
            return [_Task(job, writer, whole=True, views=tuple(views))]
        base = views[-1] if job.base else None
        # The same weights the CPU path uses (for slerp: its float64 reduction, on the CPU).
        tensors, coefficients = LINEAR_METHODS[job.layer.method](
            job.layer, views[: len(job.inputs)], base
        )
        by_view = {id(v): i for v, i in zip(views, inputs)}
        ordered = tuple(by_view[id(t)] for t in tensors)
        step = self.chunk_elements
        return [
            _Task(job, writer, ordered, tuple(coefficients), start, min(step, job.numel - start))
            for start in range(0, job.numel, step)
        ]

    def write(
        self,
        placed: Sequence[tuple[ShardWriter, TensorJob]],
        progress: Callable[[int], object] = lambda n: None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        """Compute and write these tensors, each into its shard's writer; returns when all
        their bytes are written. None may be a raw copy: the build copies those on a thread
        of its own meanwhile (``builder._write_all``), which ``stopped`` reports failing.

        Raises the first error of any lane after every queued task has finished or been
        skipped, so no lane is still writing to a writer when the caller closes it.
        """
        queued = 0
        error: BaseException | None = None
        try:
            for writer, job in placed:
                if job.is_raw_copy:
                    raise ValueError(f"{job.name} is a raw copy, not a computed tensor")
                for task in self._plan(job, writer):
                    self._tasks.put(task)
                    queued += 1
        except BaseException as e:  # noqa: BLE001 -- re-raised below, after the drain
            error = e
            self._skip.set()
        remaining = queued
        try:
            while remaining:
                nbytes, task_error = self._done.get()
                remaining -= 1
                if task_error is not None and error is None:
                    error = task_error
                if stopped():
                    self._skip.set()
                progress(nbytes)
        except BaseException as e:  # noqa: BLE001 -- e.g. Ctrl-C: stop, but drain first
            error = error or e
            self._skip.set()
            while remaining:
                self._done.get()
                remaining -= 1
        self._skip.clear()
        for _, job in placed:
            job.release()  # pages a slerp reduction or a TIES upload mapped
        if error is not None:
            raise error
