"""Fixed linear combinations of source tensors, computed without torch.

Most merge methods are a weighted sum of their inputs whose coefficients follow
from the recipe alone (``passthrough``, ``linear``, ``task_arithmetic``, ``laco``).
A build needs nothing else from torch for them, and importing torch takes longer
than such a build's merges, so the build computes them here: ``tailorkit._kernels``
(the arithmetic of ``tailorkit._C``'s weighted_sum, the same bits, built without
torch) on memoryviews of the mapped shards, a chunk at a time, into one buffer,
while the copies run. Everything else (slerp's angle, TIES, gathers, folds, a
GPU) takes the torch path in tailorkit/merge.py, which uses this registry too.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from tailorkit.checkpoint.safetensors_format import DType
from tailorkit.errors import MergeError
from tailorkit.recipe import OutputLayer

if TYPE_CHECKING:
    import torch

# Set to 1, the C++ extensions are not used: the ops take their PyTorch references and the
# build merges with them (read by tailorkit.ops too).
DISABLE_ENV = "TAILORKIT_DISABLE_EXTENSION"
# merge_buffers.cpp's interface: its module constant VERSION must equal this. An editable
# install whose sources moved on without a rebuild then falls back, instead of failing
# mid-build on a call it does not understand.
KERNELS_VERSION = 1


def disabled_by() -> str | None:
    """``NAME=value`` of the setting that turns the C++ extensions off, or None."""
    value = os.environ.get(DISABLE_ENV, "")
    return None if value in ("", "0") else f"{DISABLE_ENV}={value}"


def _load_kernels():
    """``(tailorkit._kernels or None, why not in words)``."""
    if switch := disabled_by():
        return None, f"disabled by {switch}"
    try:
        module = importlib.import_module("tailorkit._kernels")
    except ImportError as e:  # not built (no compiler at install?)
        return None, f"{e}; it is compiled at install time: `pip install -v .` shows why not"
    version = getattr(module, "VERSION", None)
    if version != KERNELS_VERSION:
        return None, (
            f"it was built from other sources (interface {version}, this tailorkit needs "
            f"{KERNELS_VERSION}): reinstall tailorkit to rebuild it"
        )
    return module, ""


_kernels, _KERNELS_PROBLEM = _load_kernels()

T = TypeVar("T")  # an operand: a tensor, or a plan's Input
# (layer, inputs, base) -> (operands, coefficients): the output is sum_i c_i * operand_i.
Combination = Callable[[OutputLayer, Sequence[T], "T | None"], tuple[list[T], list[float]]]
COMBINATIONS: dict[str, Combination] = {}

CHUNK_ELEMENTS = 1 << 24  # 16M elements: 64 MB of float32 per chunk
KERNEL_DTYPES = ("F32", "BF16", "F16")  # what tailorkit._kernels reads and writes


def _threads() -> int:
    """The threads a merge may use: OMP_NUM_THREADS if set (as torch's kernels honour it),
    else the CPUs this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(cpus) if cpus else os.cpu_count() or 1


THREADS = _threads()


def combination(name: str, registry: dict[str, Combination] = COMBINATIONS):
    """Register a function as method ``name``'s :data:`Combination` in ``registry``."""

    def register(fn: Combination) -> Combination:
        registry[name] = fn
        return fn

    return register


@combination("passthrough")
def _passthrough(layer, inputs, base):
    return [inputs[0]], [1.0]


@combination("linear")
def _linear(layer, inputs, base):
    return list(inputs), list(layer.weights)


@combination("task_arithmetic")
def _task_arithmetic(layer, inputs, base):
    # base + lam * sum_i w_i (x_i - base) == (1 - lam * sum_i w_i) base + sum_i lam w_i x_i
    lam = layer.param("lambda")
    return [base, *inputs], [1.0 - lam * sum(layer.weights), *(lam * w for w in layer.weights)]


@combination("laco")
def _laco(layer, inputs, base):
    # theta_l + sum_{k>=1} (theta_{l+k} - theta_l) == (2 - K) theta_l + sum_{k>=1} theta_{l+k}
    return list(inputs), [2.0 - len(inputs), *([1.0] * (len(inputs) - 1))]


def status() -> str:
    """How a build computes fixed linear combinations, in words (``tailorkit doctor``)."""
    if _kernels is not None:
        return f"without torch (tailorkit._kernels, up to {THREADS} threads)"
    return f"with the torch ops: tailorkit._kernels is not loaded ({_KERNELS_PROBLEM})"


def nonfinite_error(bad: int, where: str) -> MergeError:
    return MergeError(
        f"{where}: the merge produced {bad} non-finite value(s) (NaN or inf in a source?)"
    )


class ChunkBuffer:
    """The memory a build's merges write every chunk into, allocated once (grown to the
    largest chunk). A fresh tensor per chunk cost ~90 MB more peak RSS in the benchmark
    build: glibc's malloc raises its mmap threshold when a large block is freed, and then
    keeps the next chunks' freed memory in its heaps. A chunk made in it is valid until
    the next one is made."""

    def __init__(self) -> None:
        self._bytes: bytearray | None = None

    def bytes(self, nbytes: int) -> memoryview:
        if self._bytes is None or len(self._bytes) < nbytes:
            self._bytes = None  # freed before its successor is allocated
            self._bytes = bytearray(nbytes)
        return memoryview(self._bytes)[:nbytes]

    def view(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The first bytes of the buffer as a tensor of ``shape`` (the torch path's chunks)."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        return torch.frombuffer(self.bytes(nbytes), dtype=dtype).view(tuple(shape))


def can_compute(method: str, dtypes: Iterable[DType]) -> bool:
    """Whether :func:`weighted_sum_chunks` can make a ``method`` merge reading and writing
    these dtypes (else the torch path does)."""
    ok = _kernels is not None and method in COMBINATIONS
    return ok and all(d.name in KERNEL_DTYPES for d in dtypes)


def weighted_sum_chunks(
    sources: Sequence[memoryview],
    dtypes: Sequence[DType],
    coefficients: Sequence[float],
    out_dtype: DType,
    buffer: ChunkBuffer,
    *,
    where: str,
    checked: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Iterator[memoryview]:
    """The bytes of ``sum_i c_i * source_i`` in order, ``chunk_elements`` at a time, each
    made in ``buffer`` (valid until the next). Raises MergeError, naming ``where``, on the
    first chunk holding NaN or inf, if ``checked`` (a passthrough, a copy, is not)."""
    n = len(sources[0]) // dtypes[0].itemsize
    if n == 0:
        yield buffer.bytes(0)
        return
    names = [d.name for d in dtypes]
    for start in range(0, n, chunk_elements):
        end = min(n, start + chunk_elements)
        out = buffer.bytes((end - start) * out_dtype.itemsize)
        parts = [s[start * d.itemsize : end * d.itemsize] for s, d in zip(sources, dtypes)]
        bad = _kernels.weighted_sum(out, out_dtype.name, parts, names, coefficients, THREADS)
        if bad and checked:
            raise nonfinite_error(bad, where)
        yield out
