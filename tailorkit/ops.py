"""Compiled kernels behind a small Python face: layer merges and batched CKA.

Every layer merge tailorkit performs reduces to one of two element-wise ops:

* :func:`weighted_sum` -- ``out = sum_i w_i * source_i``. Linear merges, task
  arithmetic (base weight ``1 - lambda * K``, the others ``lambda``) and LaCo
  (first weight ``1 - (K - 1)``, the others ``1``) are all this op with
  different weights, so one fast kernel serves them all.
* :func:`ties_merge` -- TIES-merging (trim, elect sign, disjoint mean) of K
  fine-tuned tensors against a base tensor.

Width pruning adds :func:`gather_weighted_sum`: a weighted sum of the same
rows (or columns) picked out of K 2-D tensors, gathered in the same pass, so
the kept MLP channels are merged without copying whole source matrices.

Both read each source element once and write each output element once, with
float32 accumulation whatever the storage dtypes (float32 / bfloat16 / float16,
mixed freely), because merging multi-GB checkpoints is bounded by memory
traffic and bf16 accumulation would lose the small task vectors.

:func:`hsic_all_pairs` is the core of batched CKA: unbiased HSIC between every
pair of L Gram matrices as a few matrix products.

Each op is declared once here (schema, fake implementation for tracing, typed
wrapper). The C++ extension ``tailorkit._C`` only registers implementations:
for the CPU (``csrc/merge_cpu.cpp``, ``csrc/cka_cpu.cpp``) and, when it was
built with CUDA, for CUDA tensors (``csrc/merge_cuda.cu``, ``csrc/cka_cuda.cu``).
Beside each op is ``_<op>_reference`` in plain PyTorch: it runs whenever the
extension is missing or broken, when it has no kernel for the inputs' device,
or when ``TAILORKIT_DISABLE_EXTENSION=1`` is set (which also keeps the build off
``tailorkit._kernels``, see combine.py), and the tests hold the merge
kernels to it bit for bit on both devices. Importing this module never raises
because of the extension and never initialises CUDA; why the extension is or
is not used is available from :func:`backend_reason` and logged once, the
first time the reference stands in for it.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Sequence

import torch

from tailorkit.combine import disabled_by

__all__ = [
    "backend",
    "backend_reason",
    "gather_weighted_sum",
    "hsic_all_pairs",
    "ties_merge",
    "ties_thresholds",
    "weighted_sum",
]

_log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------
# Loading the extension (soft) and declaring the ops (once)
# --------------------------------------------------------------------------


def _import_extension():
    """Import ``tailorkit._C``; return ``(module or None, reason in words, broken)``.

    ``broken`` is True when a built extension exists but cannot be used (worth a
    warning), False when it is simply absent or disabled.

    The extension is imported *before* the schemas below are declared: its
    kernels register against op names only, and torch checks their C++
    signatures when the schema arrives, as a Python exception we can catch
    (a failed check while the library loads would abort the interpreter).
    """
    if switch := disabled_by():
        return None, f"the C++ extension is disabled by {switch}", False
    try:
        module = importlib.import_module("tailorkit._C")
    except ModuleNotFoundError as exc:
        if exc.name == "tailorkit._C":
            reason = (
                f"tailorkit._C not built: {exc}; it is compiled at install time when torch "
                "and a C++ compiler are present: `pip install -v .` shows why it was skipped"
            )
            return None, reason, False
        return None, f"tailorkit._C failed to load: {type(exc).__name__}: {exc}", True
    except Exception as exc:  # noqa: BLE001 -- any failure means "use the reference"
        hint = "reinstall tailorkit to rebuild it"
        if "undefined symbol" in str(exc):
            hint = f"it was built against another torch than {torch.__version__}: {hint}"
        return None, f"tailorkit._C failed to load: {type(exc).__name__}: {exc}; {hint}", True
    return module, "C++ extension loaded", False


_C, _LOAD_REASON, _LOAD_BROKEN = _import_extension()

# Module-level so it lives as long as the process: dropping it would remove the ops.
_lib = torch.library.Library("tailorkit", "FRAGMENT")


_STALE = False  # the loaded extension disagreed with a schema below: not used


def _declare(schema: str) -> None:
    """Declare one op; if the loaded kernels disagree with it, stop using them.

    An extension built from older sources may disagree with several schemas: every one
    after the first is expected then, and not raised.
    """
    global _C, _LOAD_REASON, _LOAD_BROKEN, _STALE
    try:
        _lib.define(schema)
    except RuntimeError as exc:
        if _C is None and not _STALE:
            raise  # a bug in the schema itself, not the extension's doing
        if not _STALE:
            _LOAD_REASON = (
                "tailorkit._C does not match tailorkit/ops.py (it was built from other "
                f"sources): {exc}; reinstall tailorkit to rebuild it"
            )
        _C, _LOAD_BROKEN, _STALE = None, True, True


_declare(
    "weighted_sum_out(Tensor[] sources, float[] weights, Tensor(a!) out, "
    "Tensor(b!)? nonfinite=None) -> ()"
)
_declare(
    "ties_merge_out(Tensor base, Tensor[] sources, float[] thresholds, float lam, "
    "Tensor(a!) out) -> ()"
)
_declare("hsic_all_pairs(Tensor grams) -> Tensor")
_declare(
    "gather_weighted_sum_out(Tensor[] sources, float[] weights, Tensor index, int dim, "
    "Tensor(a!) out, Tensor(b!)? nonfinite=None) -> ()"
)

# What the CUDA kernels were built for ("" when the extension has none). Asking
# the extension does not initialise CUDA.
_CUDA_INFO = (getattr(_C, "cuda_info", lambda: "")() or "") if _C is not None else ""
# The CUDA TIES kernel takes its sources in one launch: at most this many.
_CUDA_TIES_MAX_SOURCES = getattr(_C, "cuda_ties_max_sources", lambda: 0)() if _CUDA_INFO else 0
_NO_CUDA_REASON = (
    "tailorkit._C was built without CUDA kernels (setup.py compiles them only when torch has "
    "CUDA and nvcc is found; `pip install -v .` prints why they were skipped)"
)


if _C is not None:
    # Shape-only implementations so the ops can be traced (torch.compile, meta
    # tensors). The ops only write into `out`, so there is nothing to compute.
    @torch.library.register_fake("tailorkit::weighted_sum_out", lib=_lib)
    def _weighted_sum_out_fake(sources, weights, out, nonfinite=None):
        return None

    @torch.library.register_fake("tailorkit::ties_merge_out", lib=_lib)
    def _ties_merge_out_fake(base, sources, thresholds, lam, out):
        return None

    @torch.library.register_fake("tailorkit::hsic_all_pairs", lib=_lib)
    def _hsic_all_pairs_fake(grams):
        return grams.new_empty((grams.shape[0], grams.shape[0]), dtype=torch.float64)

    @torch.library.register_fake("tailorkit::gather_weighted_sum_out", lib=_lib)
    def _gather_weighted_sum_out_fake(sources, weights, index, dim, out, nonfinite=None):
        return None


def backend() -> str:
    """Which kernels run: ``"cpp+cuda"`` (compiled CPU and CUDA kernels), ``"cpp"``
    (compiled CPU kernels; CUDA tensors take the reference) or ``"reference"``."""
    if _C is None:
        return "reference"
    return "cpp+cuda" if _CUDA_INFO else "cpp"


def backend_reason() -> str:
    """Why :func:`backend` is what it is, in words (for logs and bug reports)."""
    if _C is None:
        return _LOAD_REASON
    cuda = _CUDA_INFO or f"no CUDA kernels: {_NO_CUDA_REASON}"
    return f"{_LOAD_REASON} ({_C.parallel_info()}; {cuda})"


_fallbacks_logged: set[str] = set()


def _log_fallback_once(reason: str, level: int = logging.INFO) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        _log.log(level, "tailorkit kernels: using the PyTorch reference (slower): %s", reason)


@functools.cache
def _has_kernel(op: str, device_type: str) -> bool:
    """Whether tailorkit._C registered an implementation of ``op`` for this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if _C is None or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tailorkit::{op}", key)


def _use_kernel(tensors: Sequence[torch.Tensor], op: str) -> bool:
    """Whether to run the compiled ``op`` on these tensors rather than the reference.

    The kernels have no autograd formula, so inputs that need gradients take
    the reference path; so do tensors on a device the extension has no kernel
    for (anything but CPU, and CUDA unless it was built with CUDA), and tensors
    spread over several devices (where the reference raises torch's error).
    """
    if _C is None:
        _log_fallback_once(_LOAD_REASON, logging.WARNING if _LOAD_BROKEN else logging.INFO)
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    if _has_kernel(op, device.type):
        return True
    if device.type == "cuda":
        _log_fallback_once(
            _NO_CUDA_REASON if not _CUDA_INFO else f"tailorkit._C has no CUDA kernel for {op}"
        )
    elif device.type == "cpu":
        _log_fallback_once(f"tailorkit._C has no CPU kernel for {op}; reinstall tailorkit")
    return False


# --------------------------------------------------------------------------
# Input checks shared by the kernels and the references
# --------------------------------------------------------------------------


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {dtype}, but merges support float32, bfloat16 and float16; "
            f"convert it first (tensor.to(torch.float32))"
        )


def _check_sources(
    sources: Sequence[torch.Tensor],
    scalars: Sequence[float],
    name: str,
    contiguous: bool = True,
):
    """Validate the sources and their per-source scalars; return the sources (made
    contiguous unless ``contiguous=False``) and the scalars as floats."""
    if len(sources) == 0:
        raise ValueError("a merge needs at least one source tensor, got none")
    if len(scalars) != len(sources):
        raise ValueError(
            f"got {len(sources)} source tensors but {len(scalars)} {name}: give one per source"
        )
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"source {i} is a {type(s).__name__}, not a torch.Tensor")
        _check_dtype(s.dtype, f"source {i}")
    shape, device = sources[0].shape, sources[0].device
    for i, s in enumerate(sources):
        if s.shape != shape:
            raise ValueError(
                f"source {i} has shape {tuple(s.shape)} but source 0 has shape {tuple(shape)}: "
                "merged tensors must have the same shape"
            )
        if s.device != device:
            raise ValueError(
                f"source {i} is on {s.device} but source 0 is on {device}: "
                "put every tensor of a merge on the same device"
            )
    if contiguous:
        sources = [s.contiguous() for s in sources]
    return list(sources), [float(x) for x in scalars]


def _check_out(
    out: torch.Tensor | None, shape: torch.Size, out_dtype: torch.dtype, device: torch.device
) -> None:
    _check_dtype(out_dtype, "out_dtype")
    if out is None:
        return
    if out.shape != shape or out.dtype != out_dtype or out.device != device:
        raise ValueError(
            f"out is a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}, but this "
            f"merge produces {out_dtype} of shape {tuple(shape)} on {device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous: the merge writes it as one flat buffer")


def _check_counter(nonfinite: torch.Tensor | None, device: torch.device) -> None:
    if nonfinite is None:
        return
    if nonfinite.dtype != torch.int64 or nonfinite.numel() != 1 or nonfinite.device != device:
        raise ValueError(
            f"nonfinite is a {nonfinite.dtype} tensor of shape {tuple(nonfinite.shape)} on "
            f"{nonfinite.device}; it must be one int64 element on {device}, e.g. "
            "torch.zeros((), dtype=torch.int64)"
        )


def _add_nonfinite(result: torch.Tensor, nonfinite: torch.Tensor | None) -> torch.Tensor:
    """The references' count of :func:`weighted_sum`'s ``nonfinite``: a second pass."""
    if nonfinite is not None:
        nonfinite += (~torch.isfinite(result)).sum()
    return result


# --------------------------------------------------------------------------
# weighted_sum
# --------------------------------------------------------------------------


def weighted_sum(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    nonfinite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``sum_i weights[i] * sources[i]`` as one tensor of ``out_dtype``.

    Linear merges, task arithmetic and LaCo are all weighted sums, so they
    share this one pass over memory: for each element the K sources are read,
    widened to float32, multiplied by their weight (rounded to float32) and
    added in order ``i = 0 .. K-1``; the float32 total is cast to ``out_dtype``
    once. Accumulating in float32 keeps small task-vector differences that a
    bf16/fp16 running sum would round away.

    Args:
        sources: K >= 1 tensors of the same shape; each float32, bfloat16 or
            float16 (dtypes may differ). Non-contiguous ones are copied to
            contiguous memory first.
        weights: one weight per source.
        out_dtype: float32, bfloat16 or float16.
        out: optional preallocated contiguous tensor of the sources' shape,
            dtype ``out_dtype`` and device, written in place -- lets a caller
            merge straight into an output buffer with no extra copy. It may
            be one of the sources (an in-place update), but must not overlap
            one partially.
        nonfinite: optional int64 one-element tensor on the sources' device;
            the number of output values that are NaN or inf is added to it.
            The kernels count while they write, so a merge checks its output
            without a second pass over it (and, on CUDA, without a sync).

    Returns:
        ``out`` if given, else a new tensor.
    """
    sources, weights = _check_sources(sources, weights, "weights")
    _check_out(out, sources[0].shape, out_dtype, sources[0].device)
    _check_counter(nonfinite, sources[0].device)
    tensors = [*sources] if out is None else [*sources, out]
    if not _use_kernel(tensors, "weighted_sum_out"):
        result = _weighted_sum_reference(sources, weights, out_dtype, out)
        return _add_nonfinite(result, nonfinite)
    if out is None:
        out = torch.empty(sources[0].shape, dtype=out_dtype, device=sources[0].device)
    torch.ops.tailorkit.weighted_sum_out(sources, weights, out, nonfinite)
    return out


def _weighted_sum_reference(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`weighted_sum`; the kernel must match it bit for bit.

    Multiply and add are separate float32 roundings (no ``add(alpha=...)``,
    which may fuse them), and a float tensor times a Python float rounds the
    weight to float32 first, as the kernel does.
    """
    acc = sources[0].float() * weights[0]
    for s, w in zip(sources[1:], weights[1:]):
        acc = acc + s.float() * w
    if out is None:
        return acc.to(out_dtype)
    return out.copy_(acc)


# --------------------------------------------------------------------------
# gather_weighted_sum (width pruning)
# --------------------------------------------------------------------------


def gather_weighted_sum(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    index: torch.Tensor,
    dim: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    nonfinite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``weighted_sum([s.index_select(dim, index) for s in sources], weights, out_dtype)``.

    Width pruning keeps a subset of each MLP's intermediate channels: rows
    (``dim=0``) of the gate/up projections and columns (``dim=1``) of the down
    projection, merged over several source models. This does the gather, the
    weighted sum and the cast in one pass: only the selected elements are
    read, each output element is written once, and no gathered copy of any
    source is made. The arithmetic is :func:`weighted_sum`'s: float32
    products and sums in source order ``i = 0 .. K-1``, one cast at the end,
    so the result is bit for bit the formula above.

    Args:
        sources: K >= 1 2-D tensors of the same shape ``(R, C)``; each float32,
            bfloat16 or float16 (dtypes may differ). A source whose rows are
            contiguous (``stride(1) == 1``, e.g. a row slice ``s[r0:r1]`` or a
            column slice ``s[:, c0:c1]`` of a contiguous matrix) is read in
            place; any other is first copied with ``.contiguous()``.
        weights: one weight per source.
        index: 1-D int32 or int64 tensor on the sources' device, every value in
            ``[0, R)`` for ``dim=0`` or ``[0, C)`` for ``dim=1``. Any order;
            repeats are allowed; it may be empty.
        dim: 0 to select rows (output ``(len(index), C)``) or 1 to select
            columns (output ``(R, len(index))``).
        out_dtype: float32, bfloat16 or float16.
        out: optional preallocated contiguous tensor of the output's shape,
            ``out_dtype`` and device, written in place; it must not overlap
            any source.
        nonfinite: as in :func:`weighted_sum`: counts the NaN and inf outputs.

    Returns:
        ``out`` if given, else a new tensor.

    The compiled kernel is CPU only: CUDA tensors (and every input when the
    extension is not in use) take :func:`_gather_weighted_sum_reference`,
    which gives the same values but makes a gathered copy of one source at a
    time.
    """
    sources, weights = _check_sources(sources, weights, "weights", contiguous=False)
    shape, device = sources[0].shape, sources[0].device
    if isinstance(dim, bool) or dim not in (0, 1):
        raise ValueError(f"dim must be 0 (select rows) or 1 (select columns), got {dim!r}")
    if len(shape) != 2:
        raise ValueError(
            f"gather_weighted_sum takes 2-D (R, C) sources, but they have shape {tuple(shape)}"
        )
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index is a {type(index).__name__}, not a torch.Tensor")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"index has dtype {index.dtype}; it must be an int32 or int64 tensor of positions"
        )
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(
            f"index is on {index.device} but the sources are on {device}: "
            "put every tensor of a merge on the same device"
        )
    size = shape[dim]
    _check_index_range(index, dim, size)
    out_shape = torch.Size((index.numel(), shape[1]) if dim == 0 else (shape[0], index.numel()))
    _check_out(out, out_shape, out_dtype, device)
    _check_counter(nonfinite, device)
    # The kernel reads rows in place given their stride; only a source whose
    # elements within a row are not adjacent needs a copy.
    sources = [s if s.shape[1] <= 1 or s.stride(1) == 1 else s.contiguous() for s in sources]
    index = index.contiguous()
    tensors = [*sources, index] if out is None else [*sources, index, out]
    if not _use_kernel(tensors, "gather_weighted_sum_out"):
        result = _gather_weighted_sum_reference(sources, weights, index, dim, out_dtype, out)
        return _add_nonfinite(result, nonfinite)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device)
    torch.ops.tailorkit.gather_weighted_sum_out(sources, weights, index, dim, out, nonfinite)
    return out


def _check_index_range(index: torch.Tensor, dim: int, size: int) -> None:
    """Raise a ValueError naming the first index value outside ``[0, size)``."""
    if index.numel() == 0:
        return
    low, high = torch.aminmax(index)
    if int(low) >= 0 and int(high) < size:
        return
    position = int(((index < 0) | (index >= size)).nonzero()[0, 0])
    raise ValueError(
        f"index[{position}] = {int(index[position])} is out of range for dim {dim} of the "
        f"sources, which has size {size}: every index must be in [0, {size})"
    )


def _gather_weighted_sum_reference(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    index: torch.Tensor,
    dim: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`gather_weighted_sum`; the kernel must match it bit for bit.

    The arithmetic of :func:`_weighted_sum_reference` (separate float32
    multiply and add, weights rounded to float32) on ``index_select``-ed
    sources, gathered one at a time so that only one gathered copy is alive.
    """
    acc = sources[0].index_select(dim, index).float() * weights[0]
    for s, w in zip(sources[1:], weights[1:]):
        acc = acc + s.index_select(dim, index).float() * w
    if out is None:
        return acc.to(out_dtype)
    return out.copy_(acc)


# --------------------------------------------------------------------------
# ties_merge
# --------------------------------------------------------------------------


def ties_merge(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    lam: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES-merge fine-tuned tensors into ``base``; return the merged tensor.

    Task vectors from different fine-tunes interfere when simply averaged:
    small updates are mostly noise, and updates of opposite sign cancel. TIES
    (Yadav et al., 2023) therefore, per element, with ``tau_i = source_i - base``
    computed in float32:

    1. trims: keeps ``tau_i`` where ``|tau_i| >= thresholds[i]``, else 0
       (get thresholds for a density with :func:`ties_thresholds`);
    2. elects a sign: ``sign(sum_i kept_i)``, the sign with the larger total
       mass (no sign, so no update, where that sum is 0);
    3. takes the disjoint mean: the mean of the kept values whose sign equals
       the elected one (0 where there are none);

    and returns ``base + lam * mean``, accumulated in float32 and cast once to
    ``out_dtype``. Like :func:`weighted_sum` this is one pass over memory.

    Args:
        base: the base model's tensor (float32, bfloat16 or float16).
        sources: K >= 1 fine-tuned tensors of the base's shape, any of the
            three dtypes.
        thresholds: one magnitude threshold per source (0 keeps everything).
        lam: scale of the merged task vector.
        out_dtype: float32, bfloat16 or float16.
        out: optional preallocated contiguous output, written in place.

    Returns:
        ``out`` if given, else a new tensor.
    """
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base is a {type(base).__name__}, not a torch.Tensor")
    _check_dtype(base.dtype, "base")
    sources, thresholds = _check_sources(sources, thresholds, "thresholds")
    if base.shape != sources[0].shape:
        raise ValueError(
            f"base has shape {tuple(base.shape)} but the sources have shape "
            f"{tuple(sources[0].shape)}: merged tensors must have the same shape"
        )
    if base.device != sources[0].device:
        raise ValueError(
            f"base is on {base.device} but the sources are on {sources[0].device}: "
            "put every tensor of a merge on the same device"
        )
    base = base.contiguous()
    lam = float(lam)
    _check_out(out, base.shape, out_dtype, base.device)
    tensors = [base, *sources] if out is None else [base, *sources, out]
    if not _use_kernel(tensors, "ties_merge_out") or (
        base.device.type == "cuda" and len(sources) > _CUDA_TIES_MAX_SOURCES
    ):
        return _ties_merge_reference(base, sources, thresholds, lam, out_dtype, out)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    torch.ops.tailorkit.ties_merge_out(base, sources, thresholds, lam, out)
    return out


def _ties_merge_reference(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    lam: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`ties_merge`; the kernel must match it bit for bit.

    The task vectors are recomputed in the second loop instead of being kept,
    so memory stays at a few float32 tensors whatever K is.
    """
    b = base.float()

    def kept(s: torch.Tensor, threshold: float) -> torch.Tensor:
        tau = s.float() - b
        return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))

    total = torch.zeros_like(b)
    for s, threshold in zip(sources, thresholds):
        total = total + kept(s, threshold)
    elected = torch.sign(total)  # 0 where the kept values cancel or are all 0

    num = torch.zeros_like(b)
    cnt = torch.zeros_like(b)
    for s, threshold in zip(sources, thresholds):
        k = kept(s, threshold)
        agree = (torch.sign(k) == elected) & (k != 0)
        num = num + torch.where(agree, k, torch.zeros_like(k))
        cnt = cnt + agree.float()
    mean = torch.where(cnt > 0, num / cnt, torch.zeros_like(num))
    merged = b + mean * lam
    if out is None:
        return merged.to(out_dtype)
    return out.copy_(merged)


def ties_thresholds(
    base: torch.Tensor, sources: Sequence[torch.Tensor], density: float
) -> list[float]:
    """Per source, the ``|tau|`` threshold that keeps the top ``density`` of its task vector.

    ``tau_i = float32(source_i) - float32(base)``. With ``n`` elements the
    threshold is the ``k``-th largest ``|tau_i|``, ``k = round(density * n)``
    (at least 1), so ``k`` elements pass ``|tau_i| >= threshold`` -- more if
    several share the threshold's magnitude. ``density == 1`` gives 0: keep
    everything.

    This sorts-by-selection a float32 copy of each task vector, so it costs
    memory and time; compute thresholds once per tensor and reuse them.
    """
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(
            f"density must be in (0, 1], got {density}: it is the fraction of each task "
            "vector TIES keeps (e.g. 0.2 keeps the largest 20%)"
        )
    thresholds = []
    b = base.float()
    for s in sources:
        n = s.numel()
        if density == 1.0 or n == 0:
            thresholds.append(0.0)
            continue
        keep = min(n, max(1, round(density * n)))  # round: 0.7 * 10 is 7.000000000000001
        magnitude = (s.float() - b).abs().flatten()
        # The keep-th largest value is the (n - keep + 1)-th smallest.
        thresholds.append(float(torch.kthvalue(magnitude, n - keep + 1).values))
    return thresholds


# --------------------------------------------------------------------------
# hsic_all_pairs (batched CKA)
# --------------------------------------------------------------------------


def hsic_all_pairs(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every pair of L Gram matrices, as a float64 ``(L, L)`` matrix.

    CKA compares two representations of the same n examples through their n x n
    kernel (Gram) matrices. The unbiased estimator (Song et al. 2012), which the
    minibatch CKA of Nguyen, Raghu and Kornblith (2021) averages over batches, is,
    with ``Kt`` the Gram matrix with its diagonal set to zero::

        HSIC(K, L) = [ tr(Kt Lt) + (1'Kt1)(1'Lt1) / ((n-1)(n-2)) - 2/(n-2) 1'Kt Lt 1 ]
                     / (n (n-3))

    For L layers at once every term is a matrix product: ``tr(Kt_i Kt_j)`` is the
    dot product of the flattened matrices (one ``(L, n^2) x (n^2, L)`` GEMM) and,
    the Gram matrices being symmetric, ``1'Kt_i Kt_j 1`` is the dot product of
    their row sums (one ``(L, n) x (n, L)`` GEMM). No L^2 Python loop.

    Args:
        grams: ``(L, n, n)`` symmetric Gram matrices, float32 or float64, n >= 4.
            The products run in this dtype (so float64 where precision matters;
            centre the features before a linear Gram to keep its entries small,
            which the estimator is invariant to).

    Returns:
        ``(L, L)`` float64, symmetric, on the device of ``grams``.

    The compiled kernels (CPU and CUDA) zero the diagonals and take the row
    sums in one pass, accumulating the row sums and every scalar term in
    float64, and leave the products to BLAS / cuBLAS; they agree with
    :func:`_hsic_all_pairs_reference` to rounding (the reference sums rows in
    the input dtype), not bit for bit.
    """
    if not isinstance(grams, torch.Tensor) or grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        shape = tuple(grams.shape) if isinstance(grams, torch.Tensor) else type(grams).__name__
        raise ValueError(f"grams must be an (L, n, n) tensor of Gram matrices, got {shape}")
    if grams.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grams has dtype {grams.dtype}; use float32 or float64")
    if grams.shape[1] < 4:
        raise ValueError(
            f"the unbiased HSIC estimator needs at least 4 examples per batch, got {grams.shape[1]}"
        )
    grams = grams.contiguous()
    if not _use_kernel([grams], "hsic_all_pairs"):
        return _hsic_all_pairs_reference(grams)
    return torch.ops.tailorkit.hsic_all_pairs(grams)


def _hsic_all_pairs_reference(grams: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`hsic_all_pairs`: three GEMM-shaped products, no loop over pairs."""
    n_layers, n, _ = grams.shape
    zero_diag = grams * (1 - torch.eye(n, dtype=grams.dtype, device=grams.device))  # (L, n, n)
    flat = zero_diag.reshape(n_layers, n * n)  # (L, n^2)
    row_sums = zero_diag.sum(dim=2)  # (L, n)
    totals = row_sums.sum(dim=1)  # (L,)
    trace_term = flat @ flat.T  # (L, L): tr(Kt_i Kt_j)
    ones_term = row_sums @ row_sums.T  # (L, L): 1'Kt_i Kt_j 1
    hsic = (
        trace_term + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - ones_term * (2.0 / (n - 2))
    ) / (n * (n - 3))
    return hsic.double()
