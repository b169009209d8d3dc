"""Tests for ops.hsic_all_pairs: kernels (CPU, CUDA) and reference against a float64 loop.

Every test draws fresh random inputs from a generator seeded from os.urandom;
the seed is printed, so pytest shows it for a failing test and the failure can
be replayed with TAILORKIT_TEST_SEED=<seed>.

The kernels and the reference are each compared with a plain float64
implementation, one pair at a time, written straight from the estimator's
formula. Neither is bit-exact (BLAS sums in its own order), so each must stay
within a worst-case rounding bound: every term is a sum of at most n^2
products, each rounded at most n^2 + 2n + 10 times by the unit roundoff u of
the products' dtype (float32 or float64), relative to the same sum taken over
absolute values (``oracles.hsic_scale``).
"""

from __future__ import annotations

import pytest
import torch
from oracles import UNIT_ROUNDOFF, hsic_pairwise, hsic_scale

from tailorkit import ops

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
# (L, n): a single layer, odd n (no 16-byte rows on the GPU), the minimum n = 4,
# and sizes where n is a multiple of the vector width.
SHAPES = [(1, 4), (2, 5), (3, 17), (5, 64), (4, 101), (8, 128)]
SHAPE_IDS = [f"L{layers}-n{n}" for layers, n in SHAPES]

HAS_CUDA = torch.cuda.is_available()


def _kernel_skip(device: str):
    if device == "cuda" and not HAS_CUDA:
        return f"no CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda})"
    if not ops._has_kernel("hsic_all_pairs", device):
        return f"no compiled {device} kernel for hsic_all_pairs: {ops.backend_reason()}"
    return None


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def random_grams(layers: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """(L, n, n) linear Gram matrices of random features, some centred, some not."""
    d = 2 * n + 3
    features = torch.randn(layers, n, d, generator=gen, dtype=torch.float64)  # (L, n, d)
    features = features * torch.rand(layers, 1, 1, generator=gen, dtype=torch.float64).mul(3)
    features[::2] -= features[::2].mean(dim=1, keepdim=True)  # centre every other layer
    features[1::2] += 0.5  # and give the others an offset
    grams = features @ features.transpose(1, 2)  # (L, n, n)
    return grams.to(dtype)


def assert_within_rounding(got: torch.Tensor, grams: torch.Tensor, exact: torch.Tensor) -> None:
    n = grams.shape[1]
    u = UNIT_ROUNDOFF[grams.dtype]
    bound = (n * n + 2 * n + 10) * u * hsic_scale(grams)
    err = (got.double().cpu() - exact).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds the rounding bound by {worst:g}"


@pytest.mark.parametrize(("layers", "n"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_matches_the_pairwise_formula(layers, n, dtype, gen):
    grams = random_grams(layers, n, dtype, gen)
    got = ops._hsic_all_pairs_reference(grams)
    assert got.dtype == torch.float64 and got.shape == (layers, layers)
    assert_within_rounding(got, grams, hsic_pairwise(grams))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layers", "n"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_formula_and_reference(device, layers, n, dtype, gen):
    if reason := _kernel_skip(device):
        pytest.skip(reason)
    grams = random_grams(layers, n, dtype, gen)
    got = ops.hsic_all_pairs(grams.to(device))
    assert got.dtype == torch.float64 and got.shape == (layers, layers)
    assert got.device.type == device
    assert torch.equal(got, got.T), "the kernel's result is exactly symmetric"
    exact = hsic_pairwise(grams)
    assert_within_rounding(got, grams, exact)
    reference = ops._hsic_all_pairs_reference(grams.to(device))
    assert_within_rounding(reference, grams, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [36, 37], ids=["n36", "n37"])
def test_kernel_on_offset_and_strided_inputs(device, n, gen):
    """A storage offset of one element (no 16-byte rows) and a transposed view."""
    if reason := _kernel_skip(device):
        pytest.skip(reason)
    grams = random_grams(3, n, torch.float32, gen)
    buffer = torch.empty(1 + grams.numel(), dtype=torch.float32, device=device)
    offset = buffer[1:].view(grams.shape)  # (L, n, n), misaligned by 4 bytes
    offset.copy_(grams)
    exact = hsic_pairwise(grams)
    assert_within_rounding(ops.hsic_all_pairs(offset), grams, exact)
    transposed = grams.to(device).transpose(1, 2)  # symmetric, so the same matrices
    assert_within_rounding(ops.hsic_all_pairs(transposed), grams, exact)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_does_not_change_its_input(device, gen):
    if reason := _kernel_skip(device):
        pytest.skip(reason)
    grams = random_grams(4, 33, torch.float64, gen).to(device)
    before = grams.clone()
    ops.hsic_all_pairs(grams)
    assert torch.equal(grams, before)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_hsic_of_a_layer_with_itself_is_positive(device, gen):
    """HSIC(K, K) estimates ||K~||^2 > 0 for a non-constant kernel; CKA(K, K) = 1."""
    if reason := _kernel_skip(device):
        pytest.skip(reason)
    grams = random_grams(5, 64, torch.float64, gen).to(device)
    hsic = ops.hsic_all_pairs(grams).cpu()
    assert (torch.diagonal(hsic) > 0).all()
    cka = hsic / torch.sqrt(torch.outer(torch.diagonal(hsic), torch.diagonal(hsic)))
    assert torch.allclose(torch.diagonal(cka), torch.ones(5, dtype=torch.float64))


def test_fake_implementation_gives_the_shape():
    if reason := _kernel_skip("cpu"):
        pytest.skip(reason)
    out = torch.ops.tailorkit.hsic_all_pairs(torch.empty(6, 9, 9, device="meta"))
    assert out.shape == (6, 6) and out.dtype == torch.float64 and out.device.type == "meta"


@pytest.mark.parametrize(
    ("grams", "error", "match"),
    [
        (torch.zeros(3, 4, 5), ValueError, r"\(L, n, n\)"),
        (torch.zeros(4, 4), ValueError, r"\(L, n, n\)"),
        (torch.zeros(2, 4, 4, dtype=torch.float16), TypeError, "float32 or float64"),
        (torch.zeros(2, 3, 3), ValueError, "at least 4 examples"),
    ],
    ids=["not-square", "2-d", "float16", "n3"],
)
def test_bad_inputs_are_explained(grams, error, match):
    with pytest.raises(error, match=match):
        ops.hsic_all_pairs(grams)


def test_inputs_needing_gradients_use_the_reference(gen):
    grams = random_grams(2, 8, torch.float64, gen).requires_grad_()
    ops.hsic_all_pairs(grams).sum().backward()
    assert grams.grad is not None and grams.grad.shape == grams.shape
