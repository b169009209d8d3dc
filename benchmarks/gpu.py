"""GPU proof: tailorkit's CUDA kernels checked and timed against the device's ceilings.

One run, five independent stages (a failing stage prints its error and the
others still run; the JSON is rewritten after every stage):

  checks        every CUDA kernel against the PyTorch reference on fresh random
                inputs: weighted_sum (K = 1..4 sources of mixed dtypes, every
                output dtype), ties_merge, hsic_all_pairs, and linear /
                task_arithmetic / laco / slerp / ties through tailorkit.merge;
                lengths around the 8-element vector groups and above 2^31,
                sources and outputs at odd element offsets, outputs poisoned
                (NaN) with poisoned guard elements around them. Merges must
                equal the float32 reference bit for bit *and* sit within the
                stated rounding bound of the float64 result; HSIC (products in
                the input dtype) within its rounding bound of float64.
  ceilings      device-to-device copy bandwidth (bytes read + written) and the
                rate of a large GEMM (float32 without TF32: the ceiling for
                CKA; TF32 and bfloat16 for context).
  merge_kernel  the fused weighted sum (K = 2 and 4; bfloat16 and float32) as
                bandwidth (bytes read + written / time) against the copy;
                goal >= 80 %.
  cka           batched CKA as similarity.py runs it: centre the features
                (L, n, d), Gram matrices by torch.bmm, ops.hsic_all_pairs; as
                FLOP/s against the float32 GEMM; goal >= 50 % at large sizes.
  build         a full streaming build of a synthetic Llama-shaped bfloat16
                family (base + two fine-tunes, ~2.7 GB each; most output
                layers task-arithmetic or linear merges of 2-3 sources) with
                device="cuda" and with the CPU path, in this process, warm page
                cache; goal: GPU >= 2x faster; the outputs must be
                byte-identical.

Device timings use CUDA events after warm-ups; the build is wall-clock. Every
figure is the median of its repetitions. Prints a table last and writes
gpu.json under $OUT (default ./gpu-out).

Run:  python benchmarks/gpu.py [--stages checks,ceilings,merge_kernel,cka,build]
                               [--size full|quick|tiny] [--seed N] [--work-dir DIR]

``--size tiny --device cpu`` runs every stage at toy sizes on the CPU (timings
meaningless): a dry run of the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from tailorkit import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_checks import (  # noqa: E402
    Checks,
    check_hsic,
    check_huge,
    check_merge_methods,
    check_ties,
    check_weighted_sum,
    free_memory,
    log,
)

GOAL_MERGE_OF_COPY = 0.80
GOAL_CKA_OF_GEMM = 0.50
GOAL_BUILD_SPEEDUP = 2.0
STAGE_LIMIT_S = {"checks": 180, "ceilings": 60, "merge_kernel": 90, "cka": 120, "build": 300}
STAGES = list(STAGE_LIMIT_S)

# Problem sizes: "full" for the record (about 3 minutes on an H100 with 16 cores),
# "quick" for a smoke run on a GPU, "tiny" for a dry run of the script on a CPU.
SIZES = {
    "full": {
        "ws_small": [1, 7, 8, 9, 31, 4097, 65_537],
        "ws_large": [1_000_003, 16_777_219],
        "ties_sizes": [1, 7, 9, 31, 4097, 65_537, 1_000_003],
        "hsic_shapes": [(1, 4), (2, 5), (3, 37), (8, 128), (5, 257), (17, 1024), (12, 2048)],
        "merge_shape": (4099, 1031),
        "huge": True,
        "copy_bytes": 2 << 30,
        "gemm": 8192,
        "kernel_elements": 1 << 28,
        "cka": [(32, 1024), (32, 4096), (80, 1024), (80, 4096)],
        "cka_d": 4096,
        "model": (24, 2048, 5632, 32000),
        "build_reps": 2,
    },
    "quick": {
        "ws_small": [1, 7, 8, 9, 31, 4097],
        "ws_large": [1_000_003],
        "ties_sizes": [1, 7, 9, 4097, 65_537],
        "hsic_shapes": [(1, 4), (2, 5), (3, 37), (8, 128), (17, 1024)],
        "merge_shape": (4099, 1031),
        "huge": False,
        "copy_bytes": 1 << 30,
        "gemm": 8192,
        "kernel_elements": 1 << 27,
        "cka": [(32, 1024), (32, 4096)],
        "cka_d": 4096,
        "model": (12, 2048, 5632, 32000),
        "build_reps": 1,
    },
    "tiny": {
        "ws_small": [1, 7, 8, 9, 31, 4097],
        "ws_large": [65_537],
        "ties_sizes": [1, 7, 9, 4097],
        "hsic_shapes": [(1, 4), (2, 5), (3, 37)],
        "merge_shape": (99, 31),
        "huge": False,
        "copy_bytes": 1 << 24,
        "gemm": 256,
        "kernel_elements": 1 << 20,
        "cka": [(4, 128)],
        "cka_d": 256,
        "model": (6, 256, 704, 1000),
        "build_reps": 1,
    },
}


# --------------------------------------------------------------------------- helpers


def timed(fn, warmup: int, reps: int, device: str) -> list[float]:
    """Seconds per call of fn after warm-ups: one CUDA-event pair per call on a GPU,
    a synchronised wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def stage_checks(args, record: dict) -> dict:
    seed = int.from_bytes(os.urandom(8), "little") if args.seed is None else args.seed
    gen = torch.Generator().manual_seed(seed)
    log(f"checks: seed {seed}")
    checks = Checks()
    size, device = SIZES[args.size], args.device
    for name, fn in (
        ("weighted_sum", check_weighted_sum),
        ("ties_merge", check_ties),
        ("hsic_all_pairs", check_hsic),
        ("merge methods", check_merge_methods),
        ("n > 2^31", check_huge),
    ):
        t0 = time.perf_counter()
        try:
            fn(checks, gen, size, device)
        except Exception as e:  # noqa: BLE001 -- record and go on
            traceback.print_exc()
            checks.add(name, "crashed", False, error=f"{type(e).__name__}: {e}")
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        free_memory(device)
    summary = checks.summary()
    for kernel, s in summary.items():
        log(f"  {kernel}: {s['passed']} passed, {s['failed']} failed")
    failed = [r for r in checks.results if not r["ok"]]
    return {"seed": seed, "summary": summary, "failed": failed[:50], "count": len(checks.results)}


# --------------------------------------------------------------------------- stage: ceilings


def stage_ceilings(args, record: dict) -> dict:
    out: dict = {}
    size, device = SIZES[args.size], args.device
    nbytes = size["copy_bytes"]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = timed(functools.partial(dst.copy_, src), 3, 10, device)
    out["copy"] = {
        "bytes": nbytes,
        "seconds": statistics.median(times),
        "tb_per_s": 2 * nbytes / statistics.median(times) / 1e12,
    }
    log(
        f"  device copy {nbytes / 2**30:.0f} GiB: {out['copy']['tb_per_s']:.2f} TB/s (read + written)"
    )
    del src, dst
    free_memory(device)
    n = size["gemm"]
    for name, dtype, tf32 in (
        ("gemm_f32", torch.float32, False),
        ("gemm_tf32", torch.float32, True),
        ("gemm_bf16", torch.bfloat16, False),
    ):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            x = torch.randn(n, n, device=device, dtype=dtype)
            y = torch.randn(n, n, device=device, dtype=dtype)
            times = timed(functools.partial(torch.mm, x, y), 2, 5, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        rate = 2 * n**3 / statistics.median(times) / 1e12
        out[name] = {"size": n, "seconds": statistics.median(times), "tflop_per_s": rate}
        log(f"  {name} {n}^3: {rate:.1f} TFLOP/s")
        del x, y
        free_memory(device)
    return out


# --------------------------------------------------------------------------- stage: merge kernel


def stage_merge_kernel(args, record: dict) -> dict:
    copy = (record["stages"].get("ceilings") or {}).get("result", {}).get("copy")
    copy_tbs = copy["tb_per_s"] if copy else None
    size, device = SIZES[args.size], args.device
    n = size["kernel_elements"]  # elements per tensor
    configs = [
        ("K=2 bf16->bf16", [torch.bfloat16] * 2, torch.bfloat16),
        ("K=4 bf16->bf16", [torch.bfloat16] * 4, torch.bfloat16),
        ("K=2 f32->f32", [torch.float32] * 2, torch.float32),
        ("K=4 f32->f32", [torch.float32] * 4, torch.float32),
        ("K=3 bf16,f32,f16->bf16", [torch.bfloat16, torch.float32, torch.float16], torch.bfloat16),
    ]
    rows = []
    for name, dtypes, out_dtype in configs:
        sources = [torch.randn(n, device=device).to(d) for d in dtypes]
        weights = [1.0 / len(dtypes)] * len(dtypes)
        out = torch.empty(n, device=device, dtype=out_dtype)
        moved = sum(s.element_size() for s in sources) * n + out.element_size() * n
        t_kernel = statistics.median(
            timed(
                functools.partial(ops.weighted_sum, sources, weights, out_dtype, out=out),
                3,
                20,
                device,
            )
        )
        t_ref = statistics.median(
            timed(
                functools.partial(
                    ops._weighted_sum_reference, sources, weights, out_dtype, out=out
                ),
                1,
                5,
                device,
            )
        )
        row = {
            "config": name,
            "elements": n,
            "bytes_moved": moved,
            "seconds": t_kernel,
            "tb_per_s": moved / t_kernel / 1e12,
            "reference_seconds": t_ref,
            "speedup_vs_reference": t_ref / t_kernel,
        }
        if copy_tbs:
            row["of_copy"] = row["tb_per_s"] / copy_tbs
            row["goal_met"] = row["of_copy"] >= GOAL_MERGE_OF_COPY
        rows.append(row)
        log(
            f"  {name}: {row['tb_per_s']:.2f} TB/s"
            + (f" = {row['of_copy']:.0%} of copy" if copy_tbs else "")
            + f"; torch reference {t_ref * 1e3:.2f} ms vs kernel {t_kernel * 1e3:.2f} ms"
        )
        del sources, out
        free_memory(device)
    # TIES for context (reads each source twice from L1/L2, DRAM once).
    base = torch.randn(n, device=device).to(torch.bfloat16)
    srcs = [torch.randn(n, device=device).to(torch.bfloat16) for _ in range(2)]
    out = torch.empty(n, device=device, dtype=torch.bfloat16)
    t = statistics.median(
        timed(
            functools.partial(ops.ties_merge, base, srcs, [0.5, 0.5], 1.0, torch.bfloat16, out=out),
            3,
            10,
            device,
        )
    )
    ties = {"config": "ties K=2 bf16", "seconds": t, "tb_per_s": 4 * 2 * n / t / 1e12}
    if copy_tbs:
        ties["of_copy"] = ties["tb_per_s"] / copy_tbs
    log(f"  ties K=2 bf16: {ties['tb_per_s']:.2f} TB/s")
    del base, srcs, out
    free_memory(device)
    return {"copy_tb_per_s": copy_tbs, "weighted_sum": rows, "ties": ties}


# --------------------------------------------------------------------------- stage: CKA


def batched_cka_hsic(features: torch.Tensor) -> torch.Tensor:
    """(L, n, d) features -> (L, L) HSIC: centre, Gram by bmm, ops.hsic_all_pairs."""
    centred = features - features.mean(dim=1, keepdim=True)  # (L, n, d)
    grams = torch.bmm(centred, centred.transpose(1, 2))  # (L, n, n)
    return ops.hsic_all_pairs(grams)


def gram_matrices(features: torch.Tensor) -> torch.Tensor:
    return torch.bmm(features, features.transpose(1, 2))  # (L, n, n)


def stage_cka(args, record: dict) -> dict:
    gemm = (record["stages"].get("ceilings") or {}).get("result", {}).get("gemm_f32")
    gemm_rate = gemm["tflop_per_s"] if gemm else None
    size, device = SIZES[args.size], args.device
    d = size["cka_d"]
    rows = []
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as the default; the f32 ceiling
    try:
        for layers, n in size["cka"]:
            feats = torch.randn(layers, n, d, device=device)  # (L, n, d)
            flops = 2 * layers * n * n * d + 2 * layers * layers * n * n + 2 * layers * layers * n
            t_total = statistics.median(
                timed(functools.partial(batched_cka_hsic, feats), 1, 3, device)
            )
            grams = torch.bmm(feats, feats.transpose(1, 2))
            t_hsic = statistics.median(
                timed(functools.partial(ops.hsic_all_pairs, grams), 1, 3, device)
            )
            t_bmm = statistics.median(timed(functools.partial(gram_matrices, feats), 1, 3, device))
            rate = flops / t_total / 1e12
            row = {
                "L": layers,
                "n": n,
                "d": d,
                "flops": flops,
                "seconds": t_total,
                "tflop_per_s": rate,
                "bmm_seconds": t_bmm,
                "hsic_seconds": t_hsic,
            }
            if gemm_rate:
                row["of_gemm_f32"] = rate / gemm_rate
                row["goal_met"] = row["of_gemm_f32"] >= GOAL_CKA_OF_GEMM
            rows.append(row)
            log(
                f"  L={layers} n={n} d={d}: {t_total * 1e3:.1f} ms, {rate:.1f} TFLOP/s"
                + (f" = {row['of_gemm_f32']:.0%} of f32 GEMM" if gemm_rate else "")
                + f" (bmm {t_bmm * 1e3:.1f} ms, hsic_all_pairs {t_hsic * 1e3:.1f} ms)"
            )
            del feats, grams
            free_memory(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"gemm_f32_tflop_per_s": gemm_rate, "rows": rows}


# --------------------------------------------------------------------------- stage: build


LLAMA_LAYER = (
    ("self_attn.q_proj.weight", lambda h, i: (h, h)),
    ("self_attn.k_proj.weight", lambda h, i: (h, h)),
    ("self_attn.v_proj.weight", lambda h, i: (h, h)),
    ("self_attn.o_proj.weight", lambda h, i: (h, h)),
    ("mlp.gate_proj.weight", lambda h, i: (i, h)),
    ("mlp.up_proj.weight", lambda h, i: (i, h)),
    ("mlp.down_proj.weight", lambda h, i: (h, i)),
    ("input_layernorm.weight", lambda h, i: (h,)),
    ("post_attention_layernorm.weight", lambda h, i: (h,)),
)


def llama_config(layers: int, hidden: int, inter: int, vocab: int) -> dict:
    heads = hidden // 128
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": 128,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_family(
    root: Path, layers: int, hidden: int, inter: int, vocab: int, seed: int, device: str
) -> list[Path]:
    """base, a, b: one model.safetensors each; a and b = base + N(0, 0.002), drawn on ``device``."""
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for li in range(layers):
        names += [(f"model.layers.{li}.{s}", shape(hidden, inter)) for s, shape in LLAMA_LAYER]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in names:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    dirs = [root / m for m in ("base", "a", "b")]
    files = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(llama_config(layers, hidden, inter, vocab)))
        f = open(d / "model.safetensors", "wb")
        f.write(len(raw).to_bytes(8, "little") + raw)
        files.append(f)
    g = torch.Generator(device=device).manual_seed(seed)
    try:
        for name, shape in names:
            if len(shape) == 1:
                base = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
            else:
                base = 0.02 * torch.randn(shape, generator=g, device=device)
            noise = [0.002 * torch.randn(shape, generator=g, device=device) for _ in range(2)]
            for f, v in zip(files, [base, base + noise[0], base + noise[1]]):
                f.write(v.to(torch.bfloat16).view(torch.int16).cpu().numpy())
    finally:
        for f in files:
            f.close()
    return dirs


def build_recipe(dirs: list[Path], layers: int) -> dict:
    """Layers [0, L/6) passthrough; [L/6, 5L/6) task arithmetic of a and b against the
    base (3 sources); [5L/6, L) linear 0.5/0.5 of a and b (2 sources)."""
    lo, hi = layers // 6, layers - layers // 6
    out: list[dict] = [{"from": "base", "layers": [0, lo]}]
    for i in range(lo, hi):
        out.append(
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": i},
                "sources": [{"from": "a", "layer": i}, {"from": "b", "layer": i}],
                "lambda": 0.5,
            }
        )
    for i in range(hi, layers):
        out.append(
            {
                "merge": "linear",
                "sources": [
                    {"from": "a", "layer": i, "weight": 0.5},
                    {"from": "b", "layer": i, "weight": 0.5},
                ],
            }
        )
    return {"models": {"base": str(dirs[0]), "a": str(dirs[1]), "b": str(dirs[2])}, "layers": out}


def bytes_moved(plan) -> tuple[int, int]:
    read = 0
    seen = set()
    for job in plan.jobs:
        for inp in job.all_inputs():
            key = (inp.info.file, inp.info.start)
            if key not in seen:
                seen.add(key)
                read += inp.info.end - inp.info.start
    return read, plan.nbytes


def same_files(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Whether two directories (or two files) hold the same bytes; the names that differ."""
    if a.is_file():
        pairs = [(a.name, a, b)]
    else:
        names_a = sorted(p.name for p in a.iterdir())
        names_b = sorted(p.name for p in b.iterdir())
        if names_a != names_b:
            return False, [f"file lists differ: {names_a} vs {names_b}"]
        pairs = [(name, a / name, b / name) for name in names_a]
    diffs = []
    for name, file_a, file_b in pairs:
        with open(file_a, "rb") as fa, open(file_b, "rb") as fb:
            while True:
                x, y = fa.read(64 << 20), fb.read(64 << 20)
                if x != y:
                    diffs.append(name)
                    break
                if not x:
                    break
    return not diffs, diffs


def stage_build(args, record: dict) -> dict:
    import tailorkit as tk
    from tailorkit.builder import _write_weights
    from tailorkit.checkpoint.writer import parse_size
    from tailorkit.gpu_build import DeviceStreamer

    size, device = SIZES[args.size], args.device
    layers, hidden, inter, vocab = size["model"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tailorkit-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = 2 * (2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter))
    need = 3 * model_bytes + 2 * model_bytes + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        layers = max(6, int(layers * free / need))
        log(f"  only {free / 1e9:.1f} GB free under {work}: {layers} layers instead")
    try:
        t0 = time.perf_counter()
        dirs = write_family(work / "models", layers, hidden, inter, vocab, 1234, device)
        gen_s = time.perf_counter() - t0
        os.sync()
        log(
            f"  generated 3 x {model_bytes / 1e9:.2f} GB in {gen_s:.1f} s (+ sync {time.perf_counter() - t0 - gen_s:.1f} s)"
        )
        recipe = tk.Recipe.from_dict(build_recipe(dirs, layers))
        read_b, write_b = bytes_moved(recipe.plan())
        log(f"  job: {layers} layers, reads {read_b / 1e9:.2f} GB, writes {write_b / 1e9:.2f} GB")
        # "gpu" builds with device=cuda (with --device cpu, a dry run: the CPU path again).
        # For context, "cpu-lanes": gpu_build's lane pipeline run with device="cpu" (not a
        # public path): it separates what the pipeline's I/O brings from what the GPU brings.
        kinds = {"cpu": "cpu", "gpu": device, "cpu-lanes": "cpu"}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        identical, lanes_identical, diffs = True, True, []
        for rep in range(size["build_reps"] + 1):  # the first is a warm-up
            # Delete the last outputs and sync before each round (untimed), so no build
            # pays for another's writeback; alternate the order between rounds.
            for old in work.glob("out-*"):
                shutil.rmtree(old, ignore_errors=True)
            os.sync()
            outs: dict[str, Path] = {}
            order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
            for kind in order:
                build_device = kinds[kind]
                out = work / f"out-{kind}"
                plan = recipe.plan()
                t = time.perf_counter()
                if kind == "cpu-lanes":
                    out.mkdir()
                    with DeviceStreamer("cpu") as streamer:
                        _write_weights(plan, out, parse_size("2GB"), False, streamer)
                else:
                    tk.build(plan, out, shard_size="2GB", progress=False, device=build_device)
                elapsed = time.perf_counter() - t
                outs[kind] = out
                if rep > 0:
                    times[kind].append(elapsed)
                label = "warm-up" if rep == 0 else f"rep {rep}"
                log(f"  {label} {kind} (device={build_device}): {elapsed:.2f} s")
            same, differ = same_files(outs["cpu"], outs["gpu"])
            identical, diffs = identical and same, diffs + differ
            lanes_identical = lanes_identical and all(
                same_files(outs["cpu"] / p.name, p)[0] for p in outs["cpu-lanes"].iterdir()
            )
        log(
            f"  outputs byte-identical (every round): {identical}"
            + (f" (differ: {sorted(set(diffs))})" if diffs else "")
            + f"; lane pipeline on the CPU too: {lanes_identical}"
        )
        cpu_s, gpu_s = statistics.median(times["cpu"]), statistics.median(times["gpu"])
        lanes_s = statistics.median(times["cpu-lanes"])
        moved = read_b + write_b
        return {
            "layers": layers,
            "hidden": hidden,
            "intermediate": inter,
            "vocab": vocab,
            "model_gb": model_bytes / 1e9,
            "read_bytes": read_b,
            "write_bytes": write_b,
            "generate_seconds": gen_s,
            "device": device,
            "cpu_seconds": times["cpu"],
            "cuda_seconds": times["gpu"],
            "cpu_median_s": cpu_s,
            "cuda_median_s": gpu_s,
            "cpu_gb_per_s": moved / cpu_s / 1e9,
            "cuda_gb_per_s": moved / gpu_s / 1e9,
            "speedup": cpu_s / gpu_s,
            "cpu_lanes_seconds": times["cpu-lanes"],
            "cpu_lanes_median_s": lanes_s,
            "cpu_lanes_gb_per_s": moved / lanes_s / 1e9,
            "speedup_vs_cpu_lanes": lanes_s / gpu_s,
            "cpu_lanes_byte_identical": lanes_identical,
            "goal_met": cpu_s / gpu_s >= GOAL_BUILD_SPEEDUP,
            "byte_identical": identical,
            "differing_files": diffs,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report


def table(record: dict) -> str:
    rows = ["| stage | measure | value | goal | met |", "|---|---|---:|---:|---|"]
    st = record["stages"]

    def res(name):
        s = st.get(name) or {}
        return s.get("result"), s.get("error")

    checks, err = res("checks")
    if checks:
        for kernel, s in checks["summary"].items():
            rows.append(
                f"| checks | {kernel} | {s['passed']} passed, {s['failed']} failed | all pass | {'yes' if s['failed'] == 0 else 'NO'} |"
            )
    elif err:
        rows.append(f"| checks | FAILED | {err} | | |")
    ceil, err = res("ceilings")
    if ceil:
        rows.append(
            f"| ceilings | device copy (read+write) | {ceil['copy']['tb_per_s']:.2f} TB/s | | |"
        )
        for k in ("gemm_f32", "gemm_tf32", "gemm_bf16"):
            if k in ceil:
                rows.append(
                    f"| ceilings | {k} {ceil[k]['size']}^3 | {ceil[k]['tflop_per_s']:.1f} TFLOP/s | | |"
                )
    elif err:
        rows.append(f"| ceilings | FAILED | {err} | | |")
    merge, err = res("merge_kernel")
    if merge:
        for r in merge["weighted_sum"]:
            of = f"{r['tb_per_s']:.2f} TB/s" + (
                f" ({r['of_copy']:.0%} of copy)" if "of_copy" in r else ""
            )
            met = "" if "goal_met" not in r else ("yes" if r["goal_met"] else "NO")
            rows.append(
                f"| merge kernel | {r['config']} | {of} | >= {GOAL_MERGE_OF_COPY:.0%} of copy | {met} |"
            )
        t = merge["ties"]
        rows.append(f"| merge kernel | {t['config']} | {t['tb_per_s']:.2f} TB/s | (context) | |")
    elif err:
        rows.append(f"| merge kernel | FAILED | {err} | | |")
    cka, err = res("cka")
    if cka:
        for r in cka["rows"]:
            of = f"{r['tflop_per_s']:.1f} TFLOP/s" + (
                f" ({r['of_gemm_f32']:.0%} of f32 GEMM)" if "of_gemm_f32" in r else ""
            )
            met = "" if "goal_met" not in r else ("yes" if r["goal_met"] else "NO")
            rows.append(
                f"| batched CKA | L={r['L']} n={r['n']} d={r['d']} | {of} | >= {GOAL_CKA_OF_GEMM:.0%} of GEMM | {met} |"
            )
    elif err:
        rows.append(f"| batched CKA | FAILED | {err} | | |")
    build, err = res("build")
    if build:
        rows.append(
            f"| build | CPU path ({build['read_bytes'] / 1e9:.1f} GB read, {build['write_bytes'] / 1e9:.1f} GB written) | {build['cpu_median_s']:.2f} s ({build['cpu_gb_per_s']:.2f} GB/s) | | |"
        )
        rows.append(
            f"| build | device={build['device']} | {build['cuda_median_s']:.2f} s ({build['cuda_gb_per_s']:.2f} GB/s) | | |"
        )
        rows.append(
            f"| build | lane pipeline on the CPU (context) | {build['cpu_lanes_median_s']:.2f} s ({build['cpu_lanes_gb_per_s']:.2f} GB/s); GPU {build['speedup_vs_cpu_lanes']:.2f}x faster | | |"
        )
        rows.append(
            f"| build | speedup | {build['speedup']:.2f}x | >= {GOAL_BUILD_SPEEDUP:g}x | {'yes' if build['goal_met'] else 'NO'} |"
        )
        rows.append(
            f"| build | outputs byte-identical | {build['byte_identical']} | True | {'yes' if build['byte_identical'] else 'NO'} |"
        )
    elif err:
        rows.append(f"| build | FAILED | {err} | | |")
    return "\n".join(rows)


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "tailorkit_backend": ops.backend(),
        "tailorkit_backend_reason": ops.backend_reason(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
        )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}"
    )
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="full",
        help="problem sizes: full (for the record), quick (a smoke run), tiny (a CPU dry run)",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cuda (the point), or cpu for a dry run of the script with --size tiny",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the checks (default random)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the build stage writes (default a temp dir)"
    )
    args = parser.parse_args(argv)
    out_dir = Path(os.environ.get("OUT") or "gpu-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu.json"
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")

    record = {
        "benchmark": "gpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(
            ["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "stages": {},
    }
    log(json.dumps(record["machine"], indent=1))
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = (
            f"no CUDA: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU, so there is "
            "nothing to check or time; run this on a machine with an NVIDIA GPU"
        )
        log(msg)
        record["error"] = msg
        json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        log(f"wrote {json_path}")
        return 3
    if args.device == "cuda" and ops.backend() != "cpp+cuda":
        log(
            f"WARNING: tailorkit's CUDA kernels are not in use ({ops.backend_reason()}); "
            "the stages below measure the PyTorch reference instead"
        )

    fns = {
        "checks": stage_checks,
        "ceilings": stage_ceilings,
        "merge_kernel": stage_merge_kernel,
        "cka": stage_cka,
        "build": stage_build,
    }
    t_all = time.perf_counter()
    for name in stages:
        log(f"\n== {name} ==")
        t0 = time.perf_counter()
        # A stage that hangs dumps every thread's stack and ends the run; the JSON holds the rest.
        faulthandler.dump_traceback_later(STAGE_LIMIT_S[name], exit=True)
        entry: dict = {}
        try:
            entry["result"] = fns[name](args, record)
        except Exception as e:  # noqa: BLE001 -- one stage's failure must not lose the others
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            faulthandler.cancel_dump_traceback_later()
        entry["seconds"] = time.perf_counter() - t0
        record["stages"][name] = entry
        try:
            free_memory(args.device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        log(f"== {name}: {entry['seconds']:.1f} s{' (FAILED)' if 'error' in entry else ''}")
    record["seconds"] = time.perf_counter() - t_all
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    log(f"\nwrote {json_path} ({record['seconds']:.0f} s in all)\n")
    log(f"device: {record['machine'].get('gpu')}, torch {torch.__version__}, {record['date']}")
    log(table(record))
    failed_stage = any("error" in e for e in record["stages"].values())
    checks = (record["stages"].get("checks") or {}).get("result")
    failed_check = bool(checks) and any(s["failed"] for s in checks["summary"].values())
    return 1 if failed_stage or failed_check else 0


if __name__ == "__main__":
    sys.exit(main())
