"""The CUDA merge kernels against the PyTorch references, bit for bit (``-m cuda``).

The CUDA kernels do the CPU kernels' arithmetic -- float32 accumulation in
source order, multiply and add rounded separately, one rounding to the output
dtype -- so on every input their output must equal the reference's computed on
the CPU (and the reference run on the GPU) exactly. Inputs cover every dtype
mix, lengths around the 8-element vector groups, and sources and outputs that
start at odd element offsets (the kernels peel a scalar head until all
pointers are 16-byte aligned, or go scalar when no common alignment exists).
Outputs are poisoned (NaN) first, with poisoned guard elements around them.

Skipped without a CUDA GPU or without tailorkit's CUDA kernels; seeds as in
test_ops.py (TAILORKIT_TEST_SEED replays one).
"""

from __future__ import annotations

import pytest
import torch
from oracles import (
    DTYPES,
    all_bit_patterns,
    guards_intact,
    placed,
    poisoned_out,
    random_weights,
    source_dtypes,
)

from tailorkit import ops
from tailorkit.merge import merge_tensor
from tailorkit.recipe import OutputLayer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"no CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda})",
    ),
    pytest.mark.skipif(
        ops.backend() != "cpp+cuda", reason=f"no CUDA kernels: {ops.backend_reason()}"
    ),
]

DTYPE_IDS = ["f32", "bf16", "f16"]
LENGTHS = [1, 7, 8, 9, 4097, 300_001]
# Element offsets of each source (and of out) inside a larger buffer.
OFFSETS = ["aligned", "same", "mixed"]


def offset_for(kind: str, i: int, gen: torch.Generator) -> int:
    if kind == "aligned":
        return 0
    if kind == "same":
        return 3
    return int(torch.randint(0, 8, (), generator=gen))


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_weighted_sum_cuda_matches_reference(k, src, out_dtype, n, offsets, gen):
    sources = [torch.randn(n, generator=gen).to(d) for d in source_dtypes(src, k)]
    weights = random_weights(k, gen)
    want = ops._weighted_sum_reference(sources, weights, out_dtype)
    gpu_sources = [placed(s, offset_for(offsets, i, gen), "cuda") for i, s in enumerate(sources)]
    out_offset = offset_for(offsets, k, gen)
    buffer, out = poisoned_out(n, out_dtype, out_offset, "cuda")
    result = ops.weighted_sum(gpu_sources, weights, out_dtype, out=out)
    assert result is out
    assert torch.equal(out.cpu(), want)
    assert guards_intact(buffer, out_offset, n), "the kernel wrote outside out"
    # The reference run on the GPU agrees too, and so does a freshly allocated output.
    assert torch.equal(ops._weighted_sum_reference(gpu_sources, weights, out_dtype).cpu(), want)
    fresh = ops.weighted_sum(gpu_sources, weights, out_dtype)
    assert fresh.device.type == "cuda" and torch.equal(fresh.cpu(), want)


@pytest.mark.parametrize("k", [32, 33, 70])
def test_weighted_sum_cuda_many_sources(k, gen):
    """More sources than one launch takes: chained through a float32 partial sum."""
    sources = [torch.randn(4097, generator=gen).to(DTYPES[i % 3]) for i in range(k)]
    weights = random_weights(k, gen)
    got = ops.weighted_sum([s.cuda() for s in sources], weights, torch.bfloat16)
    assert torch.equal(got.cpu(), ops._weighted_sum_reference(sources, weights, torch.bfloat16))


@pytest.mark.parametrize("k", [1, 2, 33])
@pytest.mark.parametrize("n", [9, 300_001])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_weighted_sum_cuda_counts_nonfinite_outputs_as_the_cpu(out_dtype, n, k, gen):
    """The CUDA kernel's count of NaN and inf (overflow included) is the CPU kernel's,
    also when the sources take several launches (only the last one counts)."""
    sources = []
    for i in range(k):
        s = torch.randn(n, generator=gen)
        where = torch.randperm(n, generator=gen)[: 1 + i % 3]
        s[where] = torch.tensor([float("nan"), float("inf"), 3.39e38])[: len(where)]
        sources.append(s.to(DTYPES[i % 3]))
    weights = [1.0] * k
    cpu_counter = torch.zeros((), dtype=torch.int64)
    want = ops.weighted_sum(sources, weights, out_dtype, nonfinite=cpu_counter)
    counter = torch.full((), 3, dtype=torch.int64, device="cuda")
    got = ops.weighted_sum([s.cuda() for s in sources], weights, out_dtype, nonfinite=counter)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert int(counter) == 3 + int(cpu_counter) and int(cpu_counter) > 0


def test_weighted_sum_cuda_in_place(gen):
    acc = torch.randn(3, 4099, generator=gen).to(torch.bfloat16)
    update = torch.randn(3, 4099, generator=gen)
    want = ops._weighted_sum_reference([acc, update], [0.9, 0.1], torch.bfloat16)
    acc_gpu, update_gpu = acc.cuda(), update.cuda()
    ops.weighted_sum([acc_gpu, update_gpu], [0.9, 0.1], torch.bfloat16, out=acc_gpu)
    assert torch.equal(acc_gpu.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cuda_conversions_exhaustive_16_bit(dtype):
    x = all_bit_patterns(dtype)
    gpu = x.cuda()
    assert torch.equal(ops.weighted_sum([gpu], [1.0], torch.float32).cpu(), x.float())
    assert torch.equal(ops.weighted_sum([gpu], [1.0], dtype).cpu(), x)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cuda_rounding_matches_the_cpu_kernel(out_dtype, gen):
    """float32 -> 16 bits on every exponent: the CPU kernel's bits (NaNs: NaN)."""
    bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    specials = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
         1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38,
         float("inf"), -float("inf"), float("nan")]
    )  # fmt: skip
    x = torch.cat([x, specials, -specials])
    cpu = ops.weighted_sum([x], [1.0], out_dtype)
    gpu = ops.weighted_sum([x.cuda()], [1.0], out_dtype).cpu()
    want = x.to(out_dtype)
    assert torch.equal(gpu.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(gpu[finite].view(torch.int16), cpu[finite].view(torch.int16))
    assert torch.equal(gpu[finite], want[finite])


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ties_cuda_matches_reference(k, src, out_dtype, n, offsets, gen):
    base_dtype = DTYPES[k % 3] if src == "mixed" else src
    base = torch.randn(n, generator=gen).to(base_dtype)
    sources = [torch.randn(n, generator=gen).to(d) for d in source_dtypes(src, k)]
    thresholds = ops.ties_thresholds(base, sources, [1.0, 0.7, 0.5, 0.2][k % 4])
    lam = float(torch.rand((), generator=gen)) * 2
    want = ops._ties_merge_reference(base, sources, thresholds, lam, out_dtype)
    gpu_base = placed(base, offset_for(offsets, k + 1, gen), "cuda")
    gpu_sources = [placed(s, offset_for(offsets, i, gen), "cuda") for i, s in enumerate(sources)]
    out_offset = offset_for(offsets, k, gen)
    buffer, out = poisoned_out(n, out_dtype, out_offset, "cuda")
    ops.ties_merge(gpu_base, gpu_sources, thresholds, lam, out_dtype, out=out)
    assert torch.equal(out.cpu(), want)
    assert guards_intact(buffer, out_offset, n), "the kernel wrote outside out"
    gpu_ref = ops._ties_merge_reference(gpu_base, gpu_sources, thresholds, lam, out_dtype)
    assert torch.equal(gpu_ref.cpu(), want)
    # Thresholds computed on the GPU are the CPU's (kthvalue picks an element).
    density = [1.0, 0.7, 0.5, 0.2][k % 4]
    assert ops.ties_thresholds(gpu_base, gpu_sources, density) == thresholds


def test_ties_cuda_hand_made_case():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0], device="cuda")
    s1 = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0, 2.0], device="cuda")
    s2 = torch.tensor([-1.0, -1.0, -5.0, 0.5, 1.0, -2.0], device="cuda")
    s3 = torch.tensor([1.0, 2.0, 2.0, 0.5, 1.0, 0.0], device="cuda")
    got = ops.ties_merge(base, [s1, s2, s3], [1.5, 0.0, 0.0], 0.5, torch.float32)
    assert torch.equal(got.cpu(), torch.tensor([1.0, 1.0, -2.5, 0.25, 1.0, 0.0]))


def test_ties_cuda_past_the_kernels_source_limit_takes_the_reference(gen):
    """The limit is the kernel's own (exported by tailorkit._C): at it the kernel runs, one
    more source and the reference does; both agree with the CPU."""
    limit = ops._C.cuda_ties_max_sources()
    assert limit == ops._CUDA_TIES_MAX_SOURCES >= 2
    base = torch.randn(1031, generator=gen)
    for k in (limit, limit + 1):
        sources = [base + 0.01 * torch.randn(1031, generator=gen) for _ in range(k)]
        thresholds = ops.ties_thresholds(base, sources, 0.5)
        want = ops._ties_merge_reference(base, sources, thresholds, 0.7, torch.float32)
        got = ops.ties_merge(
            base.cuda(), [s.cuda() for s in sources], thresholds, 0.7, torch.float32
        )
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)


def test_mixed_devices_are_explained():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="same device"):
        ops.weighted_sum([a, a.cuda()], [1.0, 1.0], torch.float32)
    with pytest.raises(ValueError, match="same device"):
        ops.ties_merge(a.cuda(), [a], [0.0], 1.0, torch.float32)


LAYERS = {
    "linear": OutputLayer("linear", (("a", 0), ("b", 0)), (0.3, 0.7)),
    "task_arithmetic": OutputLayer(
        "task_arithmetic", (("a", 0), ("b", 0)), (1.0, 0.5), ("base", 0), (("lambda", 0.6),)
    ),
    "laco": OutputLayer("laco", (("base", 0), ("a", 0), ("b", 0))),
    "ties": OutputLayer(
        "ties", (("a", 0), ("b", 0)), (), ("base", 0), (("lambda", 0.8), ("density", 0.3))
    ),
    "slerp": OutputLayer("slerp", (("a", 0), ("b", 0)), (), None, (("t", 0.3),)),
}


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", list(LAYERS))
def test_merge_methods_on_cuda_match_the_cpu(method, out_dtype, gen):
    """tailorkit.merge on CUDA tensors: the CPU result, bit for bit (slerp: to rounding,
    since its angle comes from a float64 reduction summed in another order)."""
    layer = LAYERS[method]
    shape = (257, 129)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    a = (base.float() + 0.01 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    b = (base.float() + 0.01 * torch.randn(shape, generator=gen)).to(torch.float32)
    inputs = {"linear": [a, b], "task_arithmetic": [a, b], "laco": [base, a, b]}.get(method, [a, b])
    uses_base = method in ("task_arithmetic", "ties")
    cpu = merge_tensor(layer, inputs, base if uses_base else None, out_dtype, where="test")
    gpu = merge_tensor(
        layer,
        [t.cuda() for t in inputs],
        base.cuda() if uses_base else None,
        out_dtype,
        where="test",
    )
    assert gpu.device.type == "cuda" and gpu.shape == shape
    if method == "slerp":
        # Two ulps of the output dtype at most (the weights may differ in their last bit).
        ulp = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
        diff = (gpu.cpu().double() - cpu.double()).abs()
        assert (diff <= ulp[out_dtype] * cpu.double().abs() + 1e-30).all()
    else:
        assert torch.equal(gpu.cpu(), cpu)
