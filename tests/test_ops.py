"""Tests for tailorkit.ops: kernels against references, references against float64.

Every test draws fresh random inputs from a generator seeded from os.urandom;
the seed is printed, so pytest shows it for a failing test and the failure can
be replayed with TAILORKIT_TEST_SEED=<seed>.

The C++ kernels must match the PyTorch references bit for bit (torch.equal):
both accumulate in float32 in the same order, with separate multiplies and
adds (the extension is built with -ffp-contract=off) and one final rounding.
Kernel tests skip, with the reason, when the extension is not in use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracles import (
    DTYPES,
    all_bit_patterns,
    excess_error,
    random_weights,
    source_dtypes,
    ties_float64,
)

from tailorkit import ops

DTYPE_IDS = ["f32", "bf16", "f16"]
KS = [1, 2, 3, 5]
# Lengths around vector widths and blocks, a 2-D and a strided shape; the kernel
# tests add 300_001 elements, which span several parallel tasks.
SHAPES = [(1,), (7,), (1023,), (4097,), (33, 65), "noncontiguous"]
SHAPE_IDS = ["1", "7", "1023", "4097", "33x65", "noncontig"]
KERNEL_SHAPES = [*SHAPES, (300_001,)]
KERNEL_SHAPE_IDS = [*SHAPE_IDS, "300001"]

needs_kernel = pytest.mark.skipif(
    not ops.backend().startswith("cpp"), reason=f"C++ kernels not in use: {ops.backend_reason()}"
)


def make(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A random normal tensor; "noncontiguous" gives a transposed (48, 64) view."""
    if shape == "noncontiguous":
        t = torch.randn(64, 48, generator=gen).mul_(scale).to(dtype).t()  # (48, 64), strided
        assert not t.is_contiguous()
        return t
    return torch.randn(shape, generator=gen).mul_(scale).to(dtype)


def make_grid(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8 in [-8, 8]: exact in every dtype, and sums of a few of them
    are exact in float32 too, so TIES decisions are the same in float32 and float64."""
    t = torch.randint(-64, 65, (64, 48) if shape == "noncontiguous" else shape, generator=gen)
    t = (t.double() / 8).to(dtype)
    return t.t() if shape == "noncontiguous" else t


def assert_close_to_exact(result: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor):
    """|result - exact| <= u_out * |exact| + bound, elementwise (all in float64)."""
    worst = excess_error(result, exact, bound)
    assert worst <= 0, f"error exceeds the stated bound by {worst:g}"


# --------------------------------------------------------------------------
# weighted_sum
# --------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=KERNEL_SHAPE_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", KS)
def test_weighted_sum_kernel_matches_reference(k, src, out_dtype, shape, gen):
    sources = [make(shape, d, gen) for d in source_dtypes(src, k)]
    weights = random_weights(k, gen)
    got = ops.weighted_sum(sources, weights, out_dtype)
    want = ops._weighted_sum_reference(sources, weights, out_dtype)
    assert got.dtype == out_dtype and got.shape == sources[0].shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", KS)
def test_weighted_sum_reference_is_accurate(k, src, out_dtype, shape, gen):
    """The reference against float64 arithmetic on the same inputs.

    Each of the K float32 multiplies and adds (and the rounding of each weight to
    float32) errs by at most 2^-24 of the running magnitudes, so
    |float32 sum - exact| <= (2K + 1) * 2^-24 * sum_i |w_i * x_i|; the cast to
    out_dtype adds at most its unit roundoff times the value.
    """
    sources = [make(shape, d, gen) for d in source_dtypes(src, k)]
    weights = random_weights(k, gen)
    got = ops._weighted_sum_reference(sources, weights, out_dtype)
    exact = sum(w * s.double() for s, w in zip(sources, weights))
    magnitude = sum(abs(w) * s.double().abs() for s, w in zip(sources, weights))
    assert_close_to_exact(got, exact, (2 * k + 1) * 2.0**-24 * magnitude)


@pytest.mark.parametrize("path", ["public", "reference"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_weighted_sum_writes_out_in_place(path, out_dtype, gen):
    sources = [make((5, 301), d, gen) for d in DTYPES]
    weights = random_weights(3, gen)
    fn = ops.weighted_sum if path == "public" else ops._weighted_sum_reference
    out = torch.full((5, 301), float("nan"), dtype=out_dtype)
    ptr = out.data_ptr()
    result = fn(sources, weights, out_dtype, out=out)
    assert result is out and out.data_ptr() == ptr
    assert torch.equal(out, ops._weighted_sum_reference(sources, weights, out_dtype))


@pytest.mark.parametrize("path", ["public", "reference"])
def test_weighted_sum_in_place_over_a_source(path, gen):
    """out may be one of the sources: acc = 0.9 * acc + 0.1 * update, in place."""
    acc = make((3, 4097), torch.bfloat16, gen)
    update = make((3, 4097), torch.float32, gen)
    want = ops._weighted_sum_reference([acc, update], [0.9, 0.1], torch.bfloat16)
    fn = ops.weighted_sum if path == "public" else ops._weighted_sum_reference
    fn([acc, update], [0.9, 0.1], torch.bfloat16, out=acc)
    assert torch.equal(acc, want)


def test_weighted_sum_out_into_a_buffer_slice(gen):
    """`out` may be a contiguous view into a larger buffer (e.g. an output shard)."""
    buffer = torch.zeros(3, 1000, dtype=torch.bfloat16)
    sources = [make(1000, torch.bfloat16, gen) for _ in range(2)]
    ops.weighted_sum(sources, [0.5, 0.5], torch.bfloat16, out=buffer[1])
    assert torch.equal(buffer[1], ops._weighted_sum_reference(sources, [0.5, 0.5], torch.bfloat16))
    assert not buffer[0].any() and not buffer[2].any()


def test_weighted_sum_known_values():
    """Task arithmetic and LaCo are weighted sums with derived weights."""
    base = torch.tensor([1.0, 2.0, -4.0])
    a = torch.tensor([2.0, 2.0, -3.0])
    b = torch.tensor([1.0, 4.0, -4.0])
    lam = 0.5  # task arithmetic: base + lam * ((a - base) + (b - base))
    got = ops.weighted_sum([base, a, b], [1 - 2 * lam, lam, lam], torch.float32)
    assert torch.equal(got, torch.tensor([1.5, 3.0, -3.5]))
    # LaCo: base + (a - base) + (b - base) = a + b - base
    got = ops.weighted_sum([base, a, b], [1 - 2, 1, 1], torch.bfloat16)
    assert torch.equal(got, torch.tensor([2.0, 4.0, -3.0], dtype=torch.bfloat16))


def test_weighted_sum_empty_tensor():
    sources = [torch.empty(0, 4, dtype=torch.bfloat16), torch.empty(0, 4)]
    got = ops.weighted_sum(sources, [1.0, 2.0], torch.float16)
    assert got.shape == (0, 4) and got.dtype == torch.float16


@needs_kernel
def test_weighted_sum_kernel_independent_of_thread_count(gen):
    sources = [make(1_000_003, d, gen) for d in DTYPES]
    weights = random_weights(3, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.weighted_sum(sources, weights, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, ops.weighted_sum(sources, weights, torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_kernel_conversions_exhaustive_16_bit(dtype):
    """All 2^16 inputs widen exactly and round-trip, subnormals and infinities included."""
    x = all_bit_patterns(dtype)
    assert torch.equal(ops.weighted_sum([x], [1.0], torch.float32), x.float())
    assert torch.equal(ops.weighted_sum([x], [1.0], dtype), x)


@needs_kernel
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_kernel_rounding_matches_torch(out_dtype, gen):
    """float32 -> 16-bit rounding (nearest even, overflow, underflow) matches Tensor.to."""
    bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)  # every exponent, NaNs included
    specials = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
         2.0**-14, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
         3.4e38, float("inf"), -float("inf"), float("nan")]
    )  # fmt: skip
    x = torch.cat([x, specials, -specials])
    got = ops.weighted_sum([x], [1.0], out_dtype)
    want = x.to(out_dtype)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])


def poison(t: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """``t`` (flattened, float32) with ``count`` random elements set to NaN, +-inf or a
    value too large for float16 and bfloat16 once weighted and summed."""
    t = t.reshape(-1).float().clone()
    where = torch.randperm(t.numel(), generator=gen)[:count]
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.39e38, -7e4])
    t[where] = values[torch.randint(0, len(values), (len(where),), generator=gen)]
    return t


def _nonfinite_path(path: str, monkeypatch) -> None:
    if path == "kernel" and not ops.backend().startswith("cpp"):
        pytest.skip(f"C++ kernels not in use: {ops.backend_reason()}")
    if path == "reference":
        monkeypatch.setattr(ops, "_C", None)


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("n", [7, 4097, 300_001])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weighted_sum_counts_its_nonfinite_outputs(k, out_dtype, n, path, gen, monkeypatch):
    """The count added to ``nonfinite`` is the number of NaN and inf values written
    (overflow in the output dtype included), and counting changes no output bit."""
    _nonfinite_path(path, monkeypatch)
    poisoned = int(torch.randint(0, 12, (), generator=gen))
    sources = [poison(make((n,), d, gen), gen, poisoned).to(d) for d in source_dtypes("mixed", k)]
    weights = [abs(w) + 0.5 for w in random_weights(k, gen)]  # large values stay large
    counter = torch.full((), 5, dtype=torch.int64)  # the kernel adds to what is there
    got = ops.weighted_sum(sources, weights, out_dtype, nonfinite=counter)
    want = ops._weighted_sum_reference(sources, weights, out_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert int(counter) == 5 + int((~torch.isfinite(got)).sum())


@needs_kernel
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_count_at_the_overflow_boundary(out_dtype):
    """The smallest float32 that the output dtype rounds to inf, the three below it, and
    every float32 exponent: the count agrees with isfinite of what was written."""
    first_inf = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F7F8000, torch.float16: 0x477FF000}
    edge = torch.tensor([first_inf[out_dtype]], dtype=torch.int32).view(torch.float32)
    near = [edge]
    for _ in range(3):
        near.append(torch.nextafter(near[-1], torch.zeros(1)))
    exponents = torch.arange(0, 256, dtype=torch.int32).bitwise_left_shift(23).view(torch.float32)
    x = torch.cat([*near, exponents, torch.tensor([float("nan")])])
    x = torch.cat([x, -x])
    counter = torch.zeros((), dtype=torch.int64)
    got = ops.weighted_sum([x], [1.0], out_dtype, nonfinite=counter)
    torch.testing.assert_close(got, x.to(out_dtype), rtol=0, atol=0, equal_nan=True)
    assert got[0].isinf() and torch.isfinite(got[1:4]).all()
    assert int(counter) == int((~torch.isfinite(got)).sum())


@pytest.mark.parametrize("bad", ["float", "two", "list"])
def test_nonfinite_counter_must_be_one_int64(bad):
    counter = {
        "float": torch.zeros(()),
        "two": torch.zeros(2, dtype=torch.int64),
        "list": torch.zeros((1, 1), dtype=torch.int32),
    }[bad]
    x = torch.ones(4)
    with pytest.raises(ValueError, match="nonfinite is a .* it must be one int64 element"):
        ops.weighted_sum([x], [1.0], torch.float32, nonfinite=counter)
    with pytest.raises(ValueError, match="it must be one int64 element"):
        ops.gather_weighted_sum([x.view(2, 2)], [1.0], torch.tensor([0]), 0, torch.float32,
                                nonfinite=counter)  # fmt: skip


# --------------------------------------------------------------------------
# ties_merge
# --------------------------------------------------------------------------


def _ties_inputs(k, src, shape, gen, grid=False):
    maker = make_grid if grid else make
    base_dtype = DTYPES[k % 3] if src == "mixed" else src
    base = maker(shape, base_dtype, gen)
    sources = [maker(shape, d, gen) for d in source_dtypes(src, k)]
    density = [1.0, 0.7, 0.5, 0.2][k % 4]
    return base, sources, ops.ties_thresholds(base, sources, density)


@needs_kernel
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=KERNEL_SHAPE_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", KS)
def test_ties_kernel_matches_reference(k, src, out_dtype, shape, gen):
    base, sources, thresholds = _ties_inputs(k, src, shape, gen)
    lam = float(torch.rand((), generator=gen)) * 2
    got = ops.ties_merge(base, sources, thresholds, lam, out_dtype)
    want = ops._ties_merge_reference(base, sources, thresholds, lam, out_dtype)
    assert got.dtype == out_dtype and got.shape == base.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", KS)
def test_ties_reference_is_accurate(k, src, out_dtype, shape, gen):
    """The reference against float64 TIES on grid-valued inputs.

    On multiples of 1/8 the task vectors, thresholds and sums are exact in
    float32, so trimming and sign election decide the same as in float64; what
    remains is the division (one rounding), lam * mean and the add (one each),
    so |float32 - exact| <= 4 * 2^-24 * (|base| + |lam * mean|), plus the cast.
    """
    base, sources, thresholds = _ties_inputs(k, src, shape, gen, grid=True)
    lam = float(torch.rand((), generator=gen)) * 2
    got = ops._ties_merge_reference(base, sources, thresholds, lam, out_dtype)
    exact, magnitude = ties_float64(base, sources, thresholds, lam)
    assert_close_to_exact(got, exact, 4 * 2.0**-24 * magnitude)


@pytest.mark.parametrize("path", ["public", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_hand_made_case(path, dtype):
    """Trim, elect the sign with the larger mass, then average only agreeing values."""
    base = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=dtype)
    s1 = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0, 2.0], dtype=dtype)  # threshold 1.5
    s2 = torch.tensor([-1.0, -1.0, -5.0, 0.5, 1.0, -2.0], dtype=dtype)
    s3 = torch.tensor([1.0, 2.0, 2.0, 0.5, 1.0, 0.0], dtype=dtype)
    # element 0: kept 3, -1, 1; total 3 > 0; mean of the positives (3 + 1) / 2 = 2
    # element 1: s1's -1 is trimmed (|-1| < 1.5), so total = -1 + 2 > 0; mean 2
    # element 2: two positives (2, 2) lose to one larger negative (-5): mean -5
    # element 3: s1 trimmed; 0.5 and 0.5 agree: mean 0.5
    # element 4: no task vectors at all: the base survives
    # element 5: 2 and -2 cancel: no sign is elected, the base survives
    expected = torch.tensor([1.0, 1.0, -2.5, 0.25, 1.0, 0.0], dtype=dtype)
    fn = ops.ties_merge if path == "public" else ops._ties_merge_reference
    got = fn(base, [s1, s2, s3], [1.5, 0.0, 0.0], 0.5, dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("path", ["public", "reference"])
def test_ties_writes_out_in_place(path, gen):
    base, sources, thresholds = _ties_inputs(3, "mixed", (17, 31), gen)
    fn = ops.ties_merge if path == "public" else ops._ties_merge_reference
    out = torch.full((17, 31), float("nan"), dtype=torch.float16)
    ptr = out.data_ptr()
    result = fn(base, sources, thresholds, 0.7, torch.float16, out=out)
    assert result is out and out.data_ptr() == ptr
    want = ops._ties_merge_reference(base, sources, thresholds, 0.7, torch.float16)
    assert torch.equal(out, want)


def test_ties_thresholds_keep_the_requested_fraction(gen):
    base = make(1000, torch.float32, gen)
    # Distinct magnitudes: task vectors are a shuffled 1..1000 with random signs.
    taus = [
        torch.randperm(1000, generator=gen).float().add(1)
        * torch.randint(0, 2, (1000,), generator=gen).mul(2).sub(1)
        for _ in range(3)
    ]
    sources = [base + t for t in taus]
    for density in (0.001, 0.2, 0.25, 0.999, 1.0):
        thresholds = ops.ties_thresholds(base, sources, density)
        for s, thr in zip(sources, thresholds):
            kept = ((s - base).abs() >= thr).sum().item()
            assert kept == max(1, round(density * 1000))
    assert ops.ties_thresholds(base, sources, 1.0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_ties_thresholds_rejects_bad_density(density):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="density"):
        ops.ties_thresholds(x, [x], density)


# --------------------------------------------------------------------------
# gather_weighted_sum
# --------------------------------------------------------------------------

needs_gather_kernel = pytest.mark.skipif(
    not ops._has_kernel("gather_weighted_sum_out", "cpu"),
    reason=f"no compiled CPU kernel for gather_weighted_sum_out: {ops.backend_reason()}",
)

GATHER_KS = [1, 2, 3]
# (rows, cols, index kind, index dtype): a single element, odd sizes, a single
# column and a single row, an empty index, repeats, and one large enough that
# output rows span several kBlock blocks (dim 0) and several parallel tasks.
GATHER_CASES = [
    (1, 1, "all", torch.int64),
    (7, 13, "ascending", torch.int32),
    (33, 65, "unsorted", torch.int64),
    (64, 1, "unsorted", torch.int32),
    (1, 301, "unsorted", torch.int64),
    (17, 9, "empty", torch.int64),
    (19, 23, "repeated", torch.int32),
    (130, 4099, "ascending", torch.int64),
]
GATHER_IDS = ["1x1", "7x13-asc", "33x65-unsorted", "64x1", "1x301", "empty", "repeats", "130x4099"]


def gather_index(kind: str, size: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A 1-D index into a dimension of ``size``: every position, an ascending or
    shuffled subset of about 2/3 of them (no repeats), none, or draws with repeats."""
    keep = max(1, 2 * size // 3)
    if kind == "all":
        index = torch.arange(size)
    elif kind == "ascending":
        index = torch.randperm(size, generator=gen)[:keep].sort().values
    elif kind == "unsorted":
        index = torch.randperm(size, generator=gen)[:keep]
    elif kind == "empty":
        index = torch.empty(0, dtype=torch.int64)
    elif kind == "repeated":
        index = torch.randint(0, size, (size + 3,), generator=gen)
    else:
        raise ValueError(kind)
    return index.to(dtype)


def _gather_inputs(dim, k, src, case, gen):
    rows, cols, kind, index_dtype = case
    sources = [make((rows, cols), d, gen) for d in source_dtypes(src, k)]
    index = gather_index(kind, (rows, cols)[dim], index_dtype, gen)
    return sources, random_weights(k, gen), index


def _gather_formula(sources, weights, index, dim, out_dtype):
    """What gather_weighted_sum is defined to be."""
    gathered = [s.index_select(dim, index) for s in sources]
    return ops._weighted_sum_reference(gathered, weights, out_dtype)


@needs_gather_kernel
@pytest.mark.parametrize("case", GATHER_CASES, ids=GATHER_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", GATHER_KS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_weighted_sum_kernel_matches_reference(dim, k, src, out_dtype, case, gen):
    sources, weights, index = _gather_inputs(dim, k, src, case, gen)
    got = ops.gather_weighted_sum(sources, weights, index, dim, out_dtype)
    want = ops._gather_weighted_sum_reference(sources, weights, index, dim, out_dtype)
    rows, cols = sources[0].shape
    assert got.dtype == out_dtype
    assert got.shape == ((len(index), cols) if dim == 0 else (rows, len(index)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", GATHER_CASES, ids=GATHER_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", GATHER_KS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_weighted_sum_is_index_select_then_weighted_sum(dim, k, src, case, gen):
    """Both the reference and the public op (kernel or not) equal the defining formula."""
    sources, weights, index = _gather_inputs(dim, k, src, case, gen)
    out_dtype = DTYPES[(k + dim) % 3]
    want = _gather_formula(sources, weights, index, dim, out_dtype)
    got = ops._gather_weighted_sum_reference(sources, weights, index, dim, out_dtype)
    assert torch.equal(got, want)
    assert torch.equal(ops.gather_weighted_sum(sources, weights, index, dim, out_dtype), want)


@pytest.mark.parametrize("layout", ["row-slice", "column-slice", "transposed"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_weighted_sum_reads_row_contiguous_views_in_place(dim, layout, gen, monkeypatch):
    """The build passes row slices s[r0:r1]; any source whose rows are contiguous is
    read where it lies, and only one with strided rows (a transpose) is copied."""
    bigs = [make((40, 300), d, gen) for d in DTYPES]
    if layout == "row-slice":
        sources = [b[5:29] for b in bigs]  # (24, 300), contiguous
    elif layout == "column-slice":
        sources = [b[:, 17:250] for b in bigs]  # (40, 233), rows contiguous, not the tensor
    else:
        sources = [b.t() for b in bigs]  # (300, 40), stride(1) == 300
    index = gather_index("unsorted", sources[0].shape[dim], torch.int64, gen)
    weights = random_weights(3, gen)
    want = _gather_formula(sources, weights, index, dim, torch.bfloat16)

    copied = []
    contiguous = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        result = contiguous(self, *args, **kwargs)
        if result.data_ptr() != self.data_ptr():
            copied.append(tuple(self.shape))
        return result

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    got = ops.gather_weighted_sum(sources, weights, index, dim, torch.bfloat16)
    monkeypatch.undo()
    assert torch.equal(got, want)
    assert copied == ([tuple(sources[0].shape)] * 3 if layout == "transposed" else [])


@pytest.mark.parametrize("path", ["public", "reference"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_weighted_sum_writes_out_in_place(path, dim, gen):
    sources, weights, index = _gather_inputs(dim, 3, "mixed", GATHER_CASES[2], gen)
    shape = (len(index), 65) if dim == 0 else (33, len(index))
    out = torch.full(shape, float("nan"), dtype=torch.float16)
    ptr = out.data_ptr()
    fn = ops.gather_weighted_sum if path == "public" else ops._gather_weighted_sum_reference
    result = fn(sources, weights, index, dim, torch.float16, out=out)
    assert result is out and out.data_ptr() == ptr
    assert torch.equal(out, _gather_formula(sources, weights, index, dim, torch.float16))


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_weighted_sum_counts_the_nonfinite_outputs_it_keeps(
    dim, out_dtype, path, gen, monkeypatch
):
    """Only the gathered elements count: a NaN in a channel that is dropped does not."""
    _nonfinite_path(path, monkeypatch)
    rows, cols = 130, 4099
    sources = [poison(make((rows, cols), d, gen), gen, 40).view(rows, cols).to(d) for d in DTYPES]
    weights = [abs(w) + 0.5 for w in random_weights(3, gen)]
    index = gather_index("unsorted", (rows, cols)[dim], torch.int64, gen)
    counter = torch.zeros((), dtype=torch.int64)
    got = ops.gather_weighted_sum(sources, weights, index, dim, out_dtype, nonfinite=counter)
    want = _gather_formula(sources, weights, index, dim, out_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    everything = ops._weighted_sum_reference(sources, weights, out_dtype)
    assert 0 < int(counter) == int((~torch.isfinite(got)).sum())
    assert int(counter) < int((~torch.isfinite(everything)).sum())


@needs_gather_kernel
def test_gather_weighted_sum_kernel_independent_of_thread_count(gen):
    sources = [make((257, 4099), d, gen) for d in DTYPES]
    weights = random_weights(3, gen)
    threads = torch.get_num_threads()
    for dim in (0, 1):
        index = gather_index("unsorted", sources[0].shape[dim], torch.int64, gen)
        try:
            torch.set_num_threads(1)
            single = ops.gather_weighted_sum(sources, weights, index, dim, torch.bfloat16)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(
            single, ops.gather_weighted_sum(sources, weights, index, dim, torch.bfloat16)
        )


@needs_gather_kernel
def test_gather_weighted_sum_kernel_checks_direct_calls():
    """Called as torch.ops.tailorkit.* (skipping the Python checks) the kernel still
    refuses to read out of bounds."""
    source = torch.zeros(4, 6)
    out = torch.empty(2, 6)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 4 is out of range"):
        torch.ops.tailorkit.gather_weighted_sum_out([source], [1.0], torch.tensor([0, 4]), 0, out)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        torch.ops.tailorkit.gather_weighted_sum_out(
            [torch.zeros(6, 4).t()], [1.0], torch.tensor([0, 1]), 0, out
        )


def test_gather_weighted_sum_with_gradients_uses_the_reference():
    a = torch.randn(5, 3, requires_grad=True)
    out = ops.gather_weighted_sum([a], [2.0], torch.tensor([4, 0]), 0, torch.float32)
    out.sum().backward()
    assert torch.equal(
        a.grad, torch.tensor([[2.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [2.0] * 3])
    )


def test_gather_weighted_sum_bad_inputs_are_explained():
    a = torch.zeros(5, 3)
    idx = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"index\[2\] = 5 is out of range for dim 0 .* size 5"):
        ops.gather_weighted_sum([a], [1.0], torch.tensor([0, 4, 5, 1]), 0, torch.float32)
    with pytest.raises(ValueError, match=r"index\[1\] = -1 .*dim 1 .* size 3"):
        ops.gather_weighted_sum([a], [1.0], torch.tensor([2, -1]), 1, torch.float32)
    with pytest.raises(ValueError, match="dim must be 0 .* or 1"):
        ops.gather_weighted_sum([a], [1.0], idx, 2, torch.float32)
    with pytest.raises(ValueError, match="dim must be 0 .* or 1"):
        ops.gather_weighted_sum([a], [1.0], idx, True, torch.float32)
    with pytest.raises(ValueError, match=r"2-D \(R, C\) sources.*\(2, 5, 3\)"):
        ops.gather_weighted_sum([torch.zeros(2, 5, 3)], [1.0], idx, 0, torch.float32)
    with pytest.raises(TypeError, match="index has dtype torch.float32.*int32 or int64"):
        ops.gather_weighted_sum([a], [1.0], idx.float(), 0, torch.float32)
    with pytest.raises(TypeError, match="index is a list"):
        ops.gather_weighted_sum([a], [1.0], [0, 2], 0, torch.float32)
    with pytest.raises(ValueError, match="index must be 1-D"):
        ops.gather_weighted_sum([a], [1.0], idx[None], 0, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        ops.gather_weighted_sum([a, torch.zeros(5, 4)], [1.0, 1.0], idx, 0, torch.float32)
    with pytest.raises(ValueError, match=r"out is a .* produces torch.float32 of shape \(2, 3\)"):
        ops.gather_weighted_sum([a], [1.0], idx, 0, torch.float32, out=torch.empty(5, 2))
    with pytest.raises(ValueError, match="out is a torch.float16"):
        ops.gather_weighted_sum(
            [a], [1.0], idx, 1, torch.float32, out=torch.empty(5, 2, dtype=torch.float16)
        )


# --------------------------------------------------------------------------
# Input checks and dispatch
# --------------------------------------------------------------------------


def test_bad_inputs_are_explained():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="at least one source"):
        ops.weighted_sum([], [], torch.float32)
    with pytest.raises(ValueError, match="2 source tensors but 1 weights"):
        ops.weighted_sum([a, a], [1.0], torch.float32)
    with pytest.raises(ValueError, match="shape"):
        ops.weighted_sum([a, torch.zeros(5)], [1.0, 1.0], torch.float32)
    with pytest.raises(TypeError, match="float64"):
        ops.weighted_sum([a.double()], [1.0], torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.weighted_sum([a], [1.0], torch.int8)
    with pytest.raises(ValueError, match="out is a"):
        ops.weighted_sum([a], [1.0], torch.float16, out=torch.empty(4))
    with pytest.raises(ValueError, match="contiguous"):
        ops.weighted_sum([a], [1.0], torch.float32, out=torch.empty(4, 2)[:, 0])
    with pytest.raises(ValueError, match="base has shape"):
        ops.ties_merge(torch.zeros(3), [a], [0.0], 1.0, torch.float32)


def test_inputs_needing_gradients_use_the_reference():
    a = torch.randn(8, requires_grad=True)
    out = ops.weighted_sum([a, torch.randn(8)], [2.0, 1.0], torch.float32)
    out.sum().backward()
    assert torch.equal(a.grad, torch.full((8,), 2.0))


def test_backend_reports_itself():
    assert ops.backend() in ("cpp", "cpp+cuda", "reference")
    reason = ops.backend_reason()
    assert isinstance(reason, str) and reason
    if ops.backend() != "reference":
        assert reason.startswith("C++ extension loaded")


def _run_python(code: str, **env: str) -> str:
    """Run code in a fresh interpreter that imports the same tailorkit as this test."""
    package_root = str(Path(ops.__file__).resolve().parents[1])
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_an_extension_built_from_older_sources_falls_back_on_every_op(monkeypatch):
    """A stale build may disagree with several schemas: the first mismatch stops the
    kernels and names the cause; the later ones are expected, not raised. Without any
    extension, a schema that does not declare is a bug, and raises."""

    class Disagrees:
        def define(self, schema):
            raise RuntimeError(f"Inferred operator schema doesn't match: {schema}")

    monkeypatch.setattr(ops, "_lib", Disagrees())
    monkeypatch.setattr(ops, "_C", object())
    monkeypatch.setattr(ops, "_STALE", False)
    monkeypatch.setattr(ops, "_LOAD_REASON", "C++ extension loaded")
    monkeypatch.setattr(ops, "_LOAD_BROKEN", False)
    ops._declare("first_out(Tensor x) -> ()")
    ops._declare("second_out(Tensor x) -> ()")
    assert ops._C is None and ops._LOAD_BROKEN
    assert "does not match tailorkit/ops.py" in ops._LOAD_REASON
    assert "first_out" in ops._LOAD_REASON and "second_out" not in ops._LOAD_REASON
    monkeypatch.setattr(ops, "_STALE", False)
    with pytest.raises(RuntimeError, match="third_out"):
        ops._declare("third_out(Tensor x) -> ()")


def test_disable_env_var_forces_the_reference():
    out = _run_python(
        "import torch, tailorkit.ops as o\n"
        "print(o.backend()); print(o.backend_reason())\n"
        "x = torch.arange(5.0)\n"
        "print(o.weighted_sum([x, x], [1.0, 2.0], torch.float32).tolist())\n",
        TAILORKIT_DISABLE_EXTENSION="1",
    )
    lines = out.splitlines()
    assert lines[0] == "reference"
    assert "TAILORKIT_DISABLE_EXTENSION" in lines[1]
    assert lines[2] == "[0.0, 3.0, 6.0, 9.0, 12.0]"


def test_import_does_not_initialise_cuda():
    out = _run_python("import torch, tailorkit.ops\nprint(torch.cuda.is_initialized())")
    assert out.strip() == "False"
