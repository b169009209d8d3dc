"""The torch-free build path: tailorkit._kernels against the PyTorch reference, and the
chunks of a job it computes (combine.weighted_sum_chunks) against the torch path's.

tailorkit._kernels runs merge_kernels.h's weighted sum on plain buffers; it must write the
same bits as the reference (NaN payloads aside: every NaN it writes is the quiet NaN, as
the torch op's are) and count the same non-finite values, on fresh random inputs each run
(the seed is printed; TAILORKIT_TEST_SEED=<seed> replays it).
"""

from __future__ import annotations

import os

import pytest
import torch
from oracles import DTYPES, random_weights, source_dtypes
from test_ops import DTYPE_IDS, poison

from tailorkit import combine, ops
from tailorkit.errors import MergeError
from tailorkit.recipe import Recipe

NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
needs_buffer_kernel = pytest.mark.skipif(
    combine._kernels is None, reason="tailorkit._kernels is not built (no compiler at install?)"
)


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def buffer_weighted_sum(sources, weights, out_dtype, threads=2):
    """``_kernels.weighted_sum`` on the tensors' bytes: (result tensor, non-finite count)."""
    out = torch.full((sources[0].numel(),), float("nan"), dtype=out_dtype)
    bad = combine._kernels.weighted_sum(
        as_bytes(out),
        NAMES[out_dtype],
        [as_bytes(s) for s in sources],
        [NAMES[s.dtype] for s in sources],
        weights,
        threads,
    )
    return out.reshape(sources[0].shape), bad


@needs_buffer_kernel
@pytest.mark.parametrize("n", [1, 7, 4097, 300_001])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src", [*DTYPES, "mixed"], ids=[*DTYPE_IDS, "mixed"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_buffer_kernel_matches_the_reference(k, src, out_dtype, n, gen):
    """Same bits as the PyTorch reference; with poisoned inputs, NaN where it has NaN and
    the count of what is not finite."""
    poisoned = int(torch.randint(0, 12, (), generator=gen)) if n > 1 else 0
    sources = [poison(torch.randn(n, generator=gen), gen, poisoned).to(d)
               for d in source_dtypes(src, k)]  # fmt: skip
    weights = [abs(w) + 0.5 for w in random_weights(k, gen)]
    got, bad = buffer_weighted_sum(sources, weights, out_dtype)
    want = ops._weighted_sum_reference(sources, weights, out_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert bad == int((~torch.isfinite(want)).sum())


@needs_buffer_kernel
@pytest.mark.skipif(not ops.backend().startswith("cpp"), reason="tailorkit._C not in use")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_buffer_kernel_writes_the_torch_ops_bits_on_any_thread_count(out_dtype, gen):
    """Both extensions compile the same code: bit for bit the same output (NaN included),
    however the work is split between threads."""
    n = 3 * 32 * 1024 + 2049  # more than three parallel tasks, not whole blocks
    sources = [poison(torch.randn(n, generator=gen), gen, 9).to(d) for d in DTYPES]
    weights = random_weights(3, gen)
    op = ops.weighted_sum(sources, weights, out_dtype)
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    for threads in (1, 2, 3, 16):
        got, _ = buffer_weighted_sum(sources, weights, out_dtype, threads)
        assert torch.equal(got.view(bits), op.view(bits)), threads


@needs_buffer_kernel
def test_buffer_kernel_refuses_what_it_cannot_read():
    x = torch.ones(8, dtype=torch.bfloat16)
    out = bytearray(16)
    ws = combine._kernels.weighted_sum
    with pytest.raises(ValueError, match="source 1 holds 8 bytes, but 8 elements of 2"):
        ws(memoryview(out), "BF16", [as_bytes(x), as_bytes(x[:4])], ["BF16"] * 2, [1.0, 1.0])
    with pytest.raises(ValueError, match="out holds 15 bytes, not a whole number of 2-byte"):
        ws(memoryview(bytearray(15)), "BF16", [as_bytes(x)], ["BF16"], [1.0])
    with pytest.raises(ValueError, match="source 0 dtype must be 'F32', 'BF16' or 'F16'"):
        ws(memoryview(out), "BF16", [as_bytes(x)], ["F64"], [1.0])
    with pytest.raises(ValueError, match="one dtype and one weight per source"):
        ws(memoryview(out), "BF16", [as_bytes(x)], ["BF16"], [1.0, 2.0])
    with pytest.raises(ValueError, match="source 0 is not aligned to its 4-byte elements"):
        ws(memoryview(bytearray(32)), "F32", [memoryview(bytearray(36))[2:34]], ["F32"], [1.0])
    with pytest.raises(BufferError, match="not writable"):  # a read-only output
        ws(memoryview(bytes(16)), "BF16", [as_bytes(x)], ["BF16"], [1.0])


def _recipe(family, method: str, weights=None, **params) -> Recipe:
    base, a, b = family.base, *family.candidates[:2]
    sources = [{"from": m, "layer": 1} for m in "ab"]
    for source, w in zip(sources, weights or ()):
        source["weight"] = w
    merge = {"merge": method, "sources": sources}
    if method == "task_arithmetic":
        merge["base"] = {"from": "base", "layer": 1}
    merge.update(params)
    layers = [{"from": "base", "layer": 0}, merge, {"from": "b", "layer": 2}]
    return Recipe.from_dict({"models": {"base": str(base), "a": str(a), "b": str(b)},
                             "layers": layers})  # fmt: skip


@needs_buffer_kernel
@pytest.mark.parametrize(
    "method, params",
    [("linear", {"weights": [0.3, 0.7]}), ("task_arithmetic", {"lambda": 0.8}), ("laco", {})],
)
@pytest.mark.parametrize("dtype", [None, "float32", "float16"])
def test_chunks_are_the_torch_paths_merge(family, method, params, dtype):
    """Every job the torch-free path takes (a small chunk size, so tensors span chunks)
    gives the bytes of the torch path's merge; slerp, TIES and gathers are left to it."""
    plan = _recipe(family, method, **params).plan(dtype)
    taken = [job for job in plan.jobs if job.torch_free]
    assert any(job.layer.method == method for job in taken)
    buffer = combine.ChunkBuffer()
    for job in taken:
        made = [bytes(c) for c in job.chunks(buffer, chunk_elements=1000)]
        assert len(made) == max(1, -(-job.numel // 1000))
        want = job.compute().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert b"".join(made) == want, job.name
    slerp = _recipe(family, "slerp", t=0.3).plan()
    assert not any(j.torch_free for j in slerp.jobs if j.layer.method == "slerp")


@needs_buffer_kernel
def test_a_nonfinite_merge_names_its_tensor(family, tmp_path):
    """NaN in a source stops the chunk that holds it, naming the output tensor."""
    plan = _recipe(family, "linear", weights=[0.5, 0.5]).plan()
    job = next(j for j in plan.jobs if j.layer.method == "linear" and j.numel > 100)
    broken = job.inputs[0].source.view(job.inputs[0].info).reshape(-1)
    broken[37] = float("nan")  # the map is copy-on-write: the file is untouched
    with pytest.raises(MergeError, match=rf"tensor '{job.name}': the merge produced 1 non-fin"):
        list(job.chunks())


@pytest.mark.parametrize("built", [True, False])
def test_doctor_says_how_the_build_merges(built, monkeypatch, capsys):
    from tailorkit.cli import main

    if not built:
        monkeypatch.setattr(combine, "_kernels", None)
        monkeypatch.setattr(combine, "_KERNELS_PROBLEM", "No module named 'tailorkit._kernels'")
    elif combine._kernels is None:
        pytest.skip("tailorkit._kernels is not built")
    assert main(["doctor"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "build merges:" in x)
    if built:
        assert f"without torch (tailorkit._kernels, up to {combine.THREADS} threads)" in line
    else:
        assert "with the torch ops: tailorkit._kernels is not loaded (No module named" in line


@pytest.mark.parametrize("value, want", [("3", 3), ("", None), ("0", None), ("x", None)])
def test_merge_threads_follow_omp_num_threads(value, want, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert combine._threads() == (want or cpus)


def test_kernels_from_other_sources_or_disabled_are_not_used(monkeypatch):
    """An extension whose interface is not this tailorkit's (an editable install whose
    sources moved on) is left for the torch path, saying why; so is any when disabled."""
    import types

    stale = types.ModuleType("tailorkit._kernels")
    monkeypatch.setattr(combine.importlib, "import_module", lambda name: stale)
    module, why = combine._load_kernels()
    assert module is None and "built from other sources (interface None" in why
    assert "reinstall tailorkit" in why
    stale.VERSION = combine.KERNELS_VERSION
    assert combine._load_kernels() == (stale, "")
    monkeypatch.setenv(combine.DISABLE_ENV, "1")
    assert combine._load_kernels() == (None, f"disabled by {combine.DISABLE_ENV}=1")
