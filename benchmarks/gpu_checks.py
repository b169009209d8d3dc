"""The correctness checks of benchmarks/gpu.py: each CUDA kernel against the PyTorch reference.

Merges must equal the float32 reference computed on the CPU bit for bit and lie
within the stated rounding bound of the float64 result; HSIC within its
rounding bound of float64. Outputs are poisoned (NaN) with poisoned guard
elements on both sides; sources and outputs sit at random element offsets.
Every function takes the device ("cuda", or "cpu" for a dry run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tailorkit import ops

# The float64 oracles and bounds the unit tests hold the kernels to (tests/oracles.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import (  # noqa: E402
    DTYPES,
    UNIT_ROUNDOFF,
    excess_error,
    guards_intact,
    hsic_pairwise,
    hsic_scale,
    placed,
    poisoned_out,
    ties_float64,
)

NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def log(msg: str) -> None:
    print(msg, flush=True)


def free_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Checks:
    """Collects named pass/fail results with details."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def add(self, kernel: str, case: str, ok: bool, **detail) -> None:
        self.results.append({"kernel": kernel, "case": case, "ok": bool(ok), **detail})
        if not ok:
            log(f"  FAILED {kernel} {case}: {json.dumps(detail, default=str)}")

    def summary(self) -> dict:
        by_kernel: dict[str, dict] = {}
        for r in self.results:
            s = by_kernel.setdefault(r["kernel"], {"passed": 0, "failed": 0})
            s["passed" if r["ok"] else "failed"] += 1
        return by_kernel


# --------------------------------------------------------------------------- stage: checks


def device_generator(gen: torch.Generator, device: str) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen``: large inputs are drawn there (CPU
    random number generation is sequential) and copied to the CPU for the references."""
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def normal(n: int, dev_gen: torch.Generator, device: str) -> torch.Tensor:
    """n standard normal float32 values, drawn on ``device``, returned on the CPU."""
    return torch.randn(n, generator=dev_gen, device=device).cpu()


def check_weighted_sum(checks: Checks, gen: torch.Generator, size: dict, device: str) -> None:
    dev_gen = device_generator(gen, device)
    small, large = size["ws_small"], size["ws_large"]
    cases = [(k, o, n) for k in (1, 2, 3, 4) for o in DTYPES for n in small]
    cases += [(k, o, n) for k in (2, 4) for o in DTYPES for n in large]
    for k, out_dtype, n in cases:
        dtypes = [DTYPES[int(torch.randint(0, 3, (), generator=gen))] for _ in range(k)]
        offsets = [int(torch.randint(0, 8, (), generator=gen)) for _ in range(k + 1)]
        if n in large and k == 2:
            offsets = [0] * (k + 1)  # the aligned (vector) path at scale too
        sources = [normal(n, dev_gen, device).to(d) for d in dtypes]
        weights = (torch.rand(k, generator=gen, dtype=torch.float64) * 4 - 2).tolist()
        gpu = [placed(s, off, device) for s, off in zip(sources, offsets)]
        buffer, out = poisoned_out(n, out_dtype, offsets[-1], device)
        ops.weighted_sum(gpu, weights, out_dtype, out=out)
        got = out.cpu()
        want = ops._weighted_sum_reference(sources, weights, out_dtype)
        exact = sum(w * s.double() for s, w in zip(sources, weights))
        magnitude = sum(abs(w) * s.double().abs() for s, w in zip(sources, weights))
        excess = excess_error(got, exact, (2 * k + 1) * 2.0**-24 * magnitude)
        bitwise = torch.equal(got, want)
        guards = guards_intact(buffer, offsets[-1], n)
        case = f"K={k} src={'/'.join(NAMES[d] for d in dtypes)} out={NAMES[out_dtype]} n={n} off={offsets}"
        checks.add(
            "weighted_sum",
            case,
            bitwise and guards and excess <= 0,
            bitwise=bitwise,
            guards=guards,
            excess_over_bound=excess,
            mismatches=int((got.view(-1) != want.view(-1)).sum()) if not bitwise else 0,
        )
    # More sources than one launch takes (chained through a float32 partial sum).
    k = 37
    sources = [torch.randn(10_007, generator=gen).to(DTYPES[i % 3]) for i in range(k)]
    weights = (torch.rand(k, generator=gen, dtype=torch.float64) * 4 - 2).tolist()
    got = ops.weighted_sum([s.to(device) for s in sources], weights, torch.bfloat16).cpu()
    want = ops._weighted_sum_reference(sources, weights, torch.bfloat16)
    checks.add("weighted_sum", "K=37 chained", torch.equal(got, want))


def check_huge(checks: Checks, gen: torch.Generator, size: dict, device: str) -> None:
    """Past 2^31 elements (64-bit indexing): windows against the CPU reference."""
    if not size["huge"] or device != "cuda":
        return
    n = 2**31 + 9
    device_gen = device_generator(gen, device)
    a = torch.randn(n, generator=device_gen, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, generator=device_gen, device="cuda", dtype=torch.bfloat16)
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
    weights = [0.375, -1.25]
    ops.weighted_sum([a, b], weights, torch.bfloat16, out=out)
    thresholds = [0.5]
    ties_out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.ties_merge(a, [b], thresholds, 0.7, torch.bfloat16, out=ties_out)
    windows = [0, 2**31 - 5_000, n - 100_000, int(torch.randint(0, n - 100_000, (), generator=gen))]
    ok_ws = ok_ties = True
    for start in windows:
        sl = slice(start, start + 100_000)
        ca, cb = a[sl].cpu(), b[sl].cpu()
        ok_ws &= torch.equal(
            out[sl].cpu(), ops._weighted_sum_reference([ca, cb], weights, torch.bfloat16)
        )
        want = ops._ties_merge_reference(ca, [cb], thresholds, 0.7, torch.bfloat16)
        ok_ties &= torch.equal(ties_out[sl].cpu(), want)
    no_nan = not bool(out.isnan().any()) and not bool(ties_out.isnan().any())
    checks.add("weighted_sum", f"n=2^31+9 windows {windows}", ok_ws and no_nan, all_written=no_nan)
    checks.add("ties_merge", f"n=2^31+9 windows {windows}", ok_ties and no_nan, all_written=no_nan)
    del a, b, out, ties_out
    free_memory(device)


def check_ties(checks: Checks, gen: torch.Generator, size: dict, device: str) -> None:
    dev_gen = device_generator(gen, device)
    sizes = size["ties_sizes"]
    for k in (1, 2, 3, 4):
        for out_dtype in DTYPES:
            for n in sizes:
                for grid in (False, True):
                    dtypes = [
                        DTYPES[int(torch.randint(0, 3, (), generator=gen))] for _ in range(k + 1)
                    ]
                    offsets = [int(torch.randint(0, 8, (), generator=gen)) for _ in range(k + 2)]
                    if grid:  # multiples of 1/8: TIES decides the same in float32 and float64
                        raw = [
                            torch.randint(-64, 65, (n,), generator=dev_gen, device=device).cpu() / 8
                            for _ in dtypes
                        ]
                    else:
                        raw = [normal(n, dev_gen, device) for _ in dtypes]
                    base, *sources = [r.to(d) for r, d in zip(raw, dtypes)]
                    density = [1.0, 0.7, 0.5, 0.2][k % 4]
                    thresholds = ops.ties_thresholds(base, sources, density)
                    lam = float(torch.rand((), generator=gen)) * 2
                    gpu_base = placed(base, offsets[k], device)
                    gpu_sources = [placed(s, off, device) for s, off in zip(sources, offsets)]
                    buffer, out = poisoned_out(n, out_dtype, offsets[-1], device)
                    ops.ties_merge(gpu_base, gpu_sources, thresholds, lam, out_dtype, out=out)
                    got = out.cpu()
                    want = ops._ties_merge_reference(base, sources, thresholds, lam, out_dtype)
                    bitwise = torch.equal(got, want)
                    guards = guards_intact(buffer, offsets[-1], n)
                    gpu_thresholds = ops.ties_thresholds(gpu_base, gpu_sources, density)
                    detail = {
                        "bitwise": bitwise,
                        "guards": guards,
                        "thresholds_equal": gpu_thresholds == thresholds,
                    }
                    ok = bitwise and guards and gpu_thresholds == thresholds
                    if grid:
                        exact, magnitude = ties_float64(base, sources, thresholds, lam)
                        excess = excess_error(got, exact, 4 * 2.0**-24 * magnitude)
                        detail["excess_over_bound"] = excess
                        ok = ok and excess <= 0
                    case = (
                        f"K={k} base/src={'/'.join(NAMES[d] for d in dtypes)} out={NAMES[out_dtype]} "
                        f"n={n} off={offsets} {'grid' if grid else 'normal'}"
                    )
                    checks.add("ties_merge", case, ok, **detail)


def check_hsic(checks: Checks, gen: torch.Generator, size: dict, device: str) -> None:
    device_gen = device_generator(gen, device)
    for layers, n in size["hsic_shapes"]:
        for dtype in (torch.float32, torch.float64):
            d = n + 5
            feats = torch.randn(
                layers, n, d, generator=device_gen, dtype=torch.float64, device=device
            )  # (L, n, d), on the device: the float64 products are quick there
            feats[::2] -= feats[::2].mean(dim=1, keepdim=True)
            grams = (feats @ feats.transpose(1, 2)).to(dtype).cpu()  # (L, n, n)
            del feats
            offset = 1 if n % 2 else 0  # odd n: also a misaligned start
            buffer = torch.empty(offset + grams.numel(), dtype=dtype, device=device)
            gpu = buffer[offset:].view(grams.shape)
            gpu.copy_(grams)
            got = ops.hsic_all_pairs(gpu).cpu()
            exact = (
                hsic_pairwise(grams)
                if layers * n <= 2048
                else ops._hsic_all_pairs_reference(grams.double())
            )
            bound = (n * n + 2 * n + 10) * UNIT_ROUNDOFF[dtype] * hsic_scale(grams)
            excess = float(((got - exact).abs() - bound).max())
            ref = ops._hsic_all_pairs_reference(gpu).cpu()
            ref_excess = float(((ref - exact).abs() - bound).max())
            relative = float(((got - exact).abs() / hsic_scale(grams)).max())
            checks.add(
                "hsic_all_pairs",
                f"L={layers} n={n} {NAMES[dtype]} offset={offset}",
                excess <= 0 and ref_excess <= 0 and torch.equal(got, got.T),
                excess_over_bound=excess,
                error_over_scale=relative,
                reference_excess_over_bound=ref_excess,
            )


def check_merge_methods(checks: Checks, gen: torch.Generator, size: dict, device: str) -> None:
    from tailorkit.merge import merge_tensor
    from tailorkit.recipe import OutputLayer

    layers = {
        "linear": (OutputLayer("linear", (("a", 0), ("b", 0)), (0.3, 0.7)), False, 2),
        "task_arithmetic": (
            OutputLayer(
                "task_arithmetic", (("a", 0), ("b", 0)), (1.0, 0.5), ("base", 0), (("lambda", 0.6),)
            ),
            True,
            2,
        ),
        "laco": (OutputLayer("laco", (("base", 0), ("a", 0), ("b", 0))), False, 3),
        "slerp": (OutputLayer("slerp", (("a", 0), ("b", 0)), (), None, (("t", 0.3),)), False, 2),
        "ties": (
            OutputLayer(
                "ties", (("a", 0), ("b", 0)), (), ("base", 0), (("lambda", 0.8), ("density", 0.3))
            ),
            True,
            2,
        ),
    }
    shape = size["merge_shape"]  # odd sizes
    base = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
    a = (base.float() + 0.002 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    b = (base.float() + 0.002 * torch.randn(shape, generator=gen)).to(torch.float32)
    for method, (layer, uses_base, count) in layers.items():
        inputs = [base, a, b] if count == 3 else [a, b]
        for out_dtype in DTYPES:
            cpu = merge_tensor(layer, inputs, base if uses_base else None, out_dtype, where=method)
            gpu = merge_tensor(
                layer,
                [t.to(device) for t in inputs],
                base.to(device) if uses_base else None,
                out_dtype,
                where=method,
            ).cpu()
            detail: dict = {}
            if method == "slerp":
                ulp = (
                    2.0 * 2 * UNIT_ROUNDOFF[out_dtype]
                )  # two ulps: weights from another reduction order
                diff = (gpu.double() - cpu.double()).abs()
                ok = bool((diff <= ulp * cpu.double().abs() + 1e-30).all())
                detail["max_rel_diff"] = float((diff / cpu.double().abs().clamp(min=1e-30)).max())
                x, y = a.double(), b.double()
                omega = torch.arccos((x * y).sum() / (x.norm() * y.norm()))
                exact = (torch.sin(0.7 * omega) * x + torch.sin(0.3 * omega) * y) / torch.sin(omega)
                excess = excess_error(gpu, exact, 8 * 2.0**-24 * (x.abs() + y.abs()))
                detail["excess_over_bound"] = excess
                ok = ok and excess <= 0
            else:
                ok = torch.equal(gpu, cpu)
                detail["bitwise"] = ok
                if method != "ties":
                    t = [v.double() for v in inputs]
                    if method == "linear":
                        exact, mag = 0.3 * t[0] + 0.7 * t[1], 0.3 * t[0].abs() + 0.7 * t[1].abs()
                    elif method == "laco":
                        exact = t[0] + (t[1] - t[0]) + (t[2] - t[0])
                        mag = t[0].abs() + t[1].abs() + t[2].abs()
                    else:
                        bb = base.double()
                        exact = bb + 0.6 * ((t[0] - bb) + 0.5 * (t[1] - bb))
                        mag = bb.abs() + 0.6 * (t[0].abs() + 0.5 * t[1].abs() + 1.5 * bb.abs())
                    excess = excess_error(gpu, exact, 8 * 2.0**-24 * mag)
                    detail["excess_over_bound"] = excess
                    ok = ok and excess <= 0
            checks.add(f"merge.{method}", f"shape={shape} out={NAMES[out_dtype]}", ok, **detail)
