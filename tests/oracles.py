"""What the kernels must compute, and how close: float64 oracles, rounding bounds and
poisoned output buffers, shared by the unit tests (tests/test_ops.py, test_cuda_ops.py,
test_cka_ops.py) and the full-size device checks (benchmarks/gpu_checks.py), so both
hold the kernels to the same definition.

Every helper that allocates takes the device ("cpu" or "cuda").
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # what the merge kernels read and write
UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float64: 2.0**-53,
}
GUARD = 16  # poisoned elements before and after every output


def source_dtypes(kind: str | torch.dtype, k: int) -> list[torch.dtype]:
    """The dtype of each of k sources: all the same, or cycling through all three."""
    if kind == "mixed":
        return [DTYPES[i % 3] for i in range(k)]
    return [kind] * k


def random_weights(k: int, gen: torch.Generator) -> list[float]:
    return (torch.rand(k, generator=gen, dtype=torch.float64) * 4 - 2).tolist()


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit value of dtype except NaNs (which never compare equal)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[~x.isnan()]


def placed(x: torch.Tensor, offset: int, device: str) -> torch.Tensor:
    """A copy of the 1-D tensor x on ``device``, ``offset`` elements into a larger buffer
    (so kernels meet misaligned inputs)."""
    buffer = torch.empty(offset + x.numel(), dtype=x.dtype, device=device)
    view = buffer[offset:]
    view.copy_(x)
    return view


def poisoned_out(n: int, dtype: torch.dtype, offset: int, device: str):
    """(buffer, out): out is n elements at GUARD + offset of a NaN-filled buffer."""
    buffer = torch.full((2 * GUARD + offset + n,), float("nan"), dtype=dtype, device=device)
    return buffer, buffer[GUARD + offset : GUARD + offset + n]


def guards_intact(buffer: torch.Tensor, offset: int, n: int) -> bool:
    """Whether the kernel left the poisoned elements around ``out`` alone."""
    before = buffer[: GUARD + offset]
    after = buffer[GUARD + offset + n :]
    return bool(before.isnan().all()) and bool(after.isnan().all())


def excess_error(result: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """max(|result - exact| - allowed), allowed = u_out |exact| + (1 + u_out) bound,
    elementwise in float64: at most 0 when ``result`` is within the stated bound."""
    u = UNIT_ROUNDOFF[result.dtype]
    err = (result.double() - exact).abs()
    allowed = u * exact.abs() + (1 + u) * bound
    if result.dtype == torch.float16:
        allowed = allowed + 2.0**-25  # half the smallest subnormal: underflow near 0
    return float((err - allowed).max()) if err.numel() else 0.0


def ties_float64(base, sources, thresholds, lam):
    """TIES written out from its definition, in float64: (result, magnitude the rounding
    error is relative to)."""
    b = base.double()
    taus = [s.double() - b for s in sources]
    kept = [torch.where(t.abs() >= thr, t, 0.0) for t, thr in zip(taus, thresholds)]
    elected = torch.sign(sum(kept))
    agree = [(torch.sign(k) == elected) & (k != 0) for k in kept]
    num = sum(torch.where(a, k, 0.0) for a, k in zip(agree, kept))
    cnt = sum(a.double() for a in agree)
    mean = torch.where(cnt > 0, num / cnt.clamp(min=1), 0.0)
    return b + lam * mean, b.abs() + abs(lam) * mean.abs()


def hsic_pairwise(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC for every pair of ``(L, n, n)`` Gram matrices, one pair at a time,
    in float64, from the formula; ``(L, L)`` on the CPU."""
    g = grams.double()
    layers, n, _ = g.shape
    ones = torch.ones(n, dtype=torch.float64, device=g.device)
    out = torch.empty(layers, layers, dtype=torch.float64)
    for i in range(layers):
        k = g[i] - torch.diag(torch.diagonal(g[i]))
        for j in range(layers):
            m = g[j] - torch.diag(torch.diagonal(g[j]))
            out[i, j] = float(
                (
                    torch.trace(k @ m)
                    + (ones @ k @ ones) * (ones @ m @ ones) / ((n - 1) * (n - 2))
                    - 2.0 / (n - 2) * (ones @ k @ m @ ones)
                )
                / (n * (n - 3))
            )
    return out


def hsic_scale(grams: torch.Tensor) -> torch.Tensor:
    """The estimator's terms taken over |K~|: what HSIC's rounding errors are relative to."""
    a = grams.double().abs()
    a = a - torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    n = a.shape[1]
    flat = a.reshape(a.shape[0], -1)
    rows = a.sum(dim=2)
    totals = rows.sum(dim=1)
    terms = flat @ flat.T + torch.outer(totals, totals) / ((n - 1) * (n - 2))
    return (terms + rows @ rows.T * (2.0 / (n - 2))) / (n * (n - 3))
