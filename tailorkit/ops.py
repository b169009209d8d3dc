"""Merge kernels behind a small Python face.

Every layer merge tailorkit performs reduces to one of two element-wise ops:

* :func:`weighted_sum` -- ``out = sum_i w_i * source_i``. Linear merges, task
  arithmetic (base weight ``1 - lambda * K``, the others ``lambda``) and LaCo
  (first weight ``1 - (K - 1)``, the others ``1``) are all this op with
  different weights, so one fast kernel serves them all.
* :func:`ties_merge` -- TIES-merging (trim, elect sign, disjoint mean) of K
  fine-tuned tensors against a base tensor.

Both read each source element once and write each output element once, with
float32 accumulation whatever the storage dtypes (float32 / bfloat16 / float16,
mixed freely), because merging multi-GB checkpoints is bounded by memory
traffic and bf16 accumulation would lose the small task vectors.

Each op is declared once here (schema, fake implementation for tracing, typed
wrapper). The C++ extension ``tailorkit._C`` (``csrc/merge_cpu.cpp``) only
registers CPU implementations. Beside each op is ``_<op>_reference`` in plain
PyTorch: it runs whenever the extension is missing or broken, when the inputs
are not on the CPU, or when ``TAILORKIT_DISABLE_EXTENSION=1`` is set, and the
tests hold the kernels to it bit for bit. Importing this module never raises
because of the extension and never initialises CUDA; why the extension is or
is not used is available from :func:`backend_reason` and logged once, the
first time the reference stands in for it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence

import torch

__all__ = [
    "backend",
    "backend_reason",
    "ties_merge",
    "ties_thresholds",
    "weighted_sum",
]

_log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DISABLE_ENV = "TAILORKIT_DISABLE_EXTENSION"


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
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        reason = f"the C++ extension is disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
        return None, reason, False
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


def _declare(schema: str) -> None:
    """Declare one op; if the loaded kernels disagree with it, stop using them."""
    global _C, _LOAD_REASON, _LOAD_BROKEN
    try:
        _lib.define(schema)
    except RuntimeError as exc:
        if _C is None:
            raise  # a bug in the schema itself, not the extension's doing
        _C, _LOAD_BROKEN = None, True
        _LOAD_REASON = (
            "tailorkit._C does not match tailorkit/ops.py (it was built from other sources): "
            f"{exc}; reinstall tailorkit to rebuild it"
        )


_declare("weighted_sum_out(Tensor[] sources, float[] weights, Tensor(a!) out) -> ()")
_declare(
    "ties_merge_out(Tensor base, Tensor[] sources, float[] thresholds, float lam, "
    "Tensor(a!) out) -> ()"
)


if _C is not None:
    # Shape-only implementations so the ops can be traced (torch.compile, meta
    # tensors). The ops only write into `out`, so there is nothing to compute.
    @torch.library.register_fake("tailorkit::weighted_sum_out", lib=_lib)
    def _weighted_sum_out_fake(sources, weights, out):
        return None

    @torch.library.register_fake("tailorkit::ties_merge_out", lib=_lib)
    def _ties_merge_out_fake(base, sources, thresholds, lam, out):
        return None


def backend() -> str:
    """``"cpp"`` when the compiled CPU kernels are in use, else ``"reference"``."""
    return "reference" if _C is None else "cpp"


def backend_reason() -> str:
    """Why :func:`backend` is what it is, in words (for logs and bug reports)."""
    if _C is None:
        return _LOAD_REASON
    return f"{_LOAD_REASON} ({_C.parallel_info()})"


_fallback_logged = False


def _use_kernel(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether to run the C++ kernel on these tensors rather than the reference.

    The kernel needs CPU tensors and has no autograd formula, so inputs on any
    other device, or ones that need gradients, take the reference path.
    """
    global _fallback_logged
    if _C is None:
        if not _fallback_logged:
            _fallback_logged = True
            level = logging.WARNING if _LOAD_BROKEN else logging.INFO
            _log.log(level, "tailorkit merges use the PyTorch reference (slower): %s", _LOAD_REASON)
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not needs_grad and all(t.device.type == "cpu" for t in tensors)


# --------------------------------------------------------------------------
# Input checks shared by the kernels and the references
# --------------------------------------------------------------------------


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {dtype}, but merges support float32, bfloat16 and float16; "
            f"convert it first (tensor.to(torch.float32))"
        )


def _check_sources(sources: Sequence[torch.Tensor], scalars: Sequence[float], name: str):
    """Validate the sources and their per-source scalars; return contiguous sources."""
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
    shape = sources[0].shape
    for i, s in enumerate(sources):
        if s.shape != shape:
            raise ValueError(
                f"source {i} has shape {tuple(s.shape)} but source 0 has shape {tuple(shape)}: "
                "merged tensors must have the same shape"
            )
    return [s.contiguous() for s in sources], [float(x) for x in scalars]


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


# --------------------------------------------------------------------------
# weighted_sum
# --------------------------------------------------------------------------


def weighted_sum(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
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

    Returns:
        ``out`` if given, else a new tensor.
    """
    sources, weights = _check_sources(sources, weights, "weights")
    _check_out(out, sources[0].shape, out_dtype, sources[0].device)
    tensors = [*sources] if out is None else [*sources, out]
    if not _use_kernel(tensors):
        return _weighted_sum_reference(sources, weights, out_dtype, out)
    if out is None:
        out = torch.empty(sources[0].shape, dtype=out_dtype)
    torch.ops.tailorkit.weighted_sum_out(sources, weights, out)
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
    base = base.contiguous()
    lam = float(lam)
    _check_out(out, base.shape, out_dtype, base.device)
    tensors = [base, *sources] if out is None else [base, *sources, out]
    if not _use_kernel(tensors):
        return _ties_merge_reference(base, sources, thresholds, lam, out_dtype, out)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype)
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
