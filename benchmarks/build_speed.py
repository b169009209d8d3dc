"""Build speed: `tailorkit build` against the byte-moving floor and mergekit.

One job, three ways, in one run, all on a warm page cache:

  floor      read every needed source byte and write every output byte with
             plain file I/O (merged tensors: read both inputs, write one
             output's worth); no arithmetic. Nothing can be faster without
             skipping bytes.
  tailorkit  ``python -m tailorkit.cli build RECIPE OUT --shard-size 1GB``
  mergekit   ``mergekit-yaml CONFIG OUT`` (mergekit 0.1.5 in its own venv) on
             the identical job.

The job: two Llama-shaped random bf16 checkpoints A and B (B = A + small noise,
i.e. a "fine-tune"); output = layers [0, 0.3L) of A passed through, layers
[0.3L, 0.6L) a linear 0.5/0.5 merge of A and B, layers [0.6L, 0.8L) dropped,
layers [0.8L, L) of B passed through; embeddings from A, final norm and LM
head from B (mergekit takes the head from the last slice's model, so the
tailorkit recipe says ``head: b``).

Every method runs in a child process, timed wall-clock from spawn to exit
(interpreter start and imports included: that is what a user waits for).
Peak RSS is the child's ``ru_maxrss`` from wait4; peak anonymous and file-backed
RSS are polled from /proc as a hint (mmap'd pages a reader touches count in RSS).
Each method gets one warm-up run, then ``--reps`` timed runs; the table shows
the median. Before every run the previous output is deleted, ``sync`` is
called and the job's input spans are read once (all untimed), so no run pays
for an earlier run's writeback and every run starts from a warm page cache.

Afterwards the outputs of tailorkit and mergekit are compared tensor by tensor
with each other and with a reference computed here: names, shapes, dtypes;
passthrough tensors must be bit-identical; linear-merged tensors must be within
1 bf16 ulp of the fp32 reference (0.5*a + 0.5*b rounded to bf16, which is in
fact exact in fp32, so 0 ulp is expected).

Run:  python benchmarks/build_speed.py [--reps 3] [--layers 20] [--hidden 2048] [--job cut]
                                       [--skip-mergekit] [--cache-dir DIR]
                                       [--json benchmarks/results/build_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1  # bump when the generated checkpoints change
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"  # the CPU build; an unpinned torch pulls a CUDA build
SHARD_BYTES = 10**9  # "1GB" for sources, tailorkit output and the floor
BF16_ULP_TOLERANCE = 1
GOAL_X_FLOOR = 1.5  # issue 16
GOAL_X_FASTER_THAN_MERGEKIT = 5.0
GOAL_PEAK_RSS_MB = 1024.0
GOAL_FIRST_BYTE_S = 0.4  # from spawn to the first tensor byte moved

LAYER_TENSORS = (  # (name suffix, shape as a function of the config)
    ("self_attn.q_proj.weight", lambda c: (c.heads * c.head_dim, c.hidden)),
    ("self_attn.k_proj.weight", lambda c: (c.kv_heads * c.head_dim, c.hidden)),
    ("self_attn.v_proj.weight", lambda c: (c.kv_heads * c.head_dim, c.hidden)),
    ("self_attn.o_proj.weight", lambda c: (c.hidden, c.heads * c.head_dim)),
    ("mlp.gate_proj.weight", lambda c: (c.intermediate, c.hidden)),
    ("mlp.up_proj.weight", lambda c: (c.intermediate, c.hidden)),
    ("mlp.down_proj.weight", lambda c: (c.hidden, c.intermediate)),
    ("input_layernorm.weight", lambda c: (c.hidden,)),
    ("post_attention_layernorm.weight", lambda c: (c.hidden,)),
)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int = 20
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 32000
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tag(self) -> str:
        return (
            f"llama-l{self.layers}-h{self.hidden}-i{self.intermediate}-"
            f"a{self.heads}-kv{self.kv_heads}-v{self.vocab}-s{self.seed}-g{GENERATOR_VERSION}"
        )

    def config_json(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """All tensor names and shapes, in Hugging Face order."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += [(f"model.layers.{i}.{suffix}", shape(self)) for suffix, shape in LAYER_TENSORS]
        out += [
            ("model.norm.weight", (self.hidden,)),
            ("lm_head.weight", (self.vocab, self.hidden)),
        ]
        return out


def default_intermediate(hidden: int) -> int:
    """Llama's 8/3 * hidden rounded up to a multiple of 256 (2048 -> 5632)."""
    return -(-(8 * hidden // 3) // 256) * 256


JOBS = ("merge", "cut")  # --job: the default above, or the same with A's layers unmerged


def job_layers(n_layers: int, job: str = "merge") -> dict:
    """The job's layer plan: which source layers go where, as index ranges. The "cut" job
    passes layers [0, 0.6L) of A through instead of merging [0.3L, 0.6L): nothing is
    computed, every tensor is a copy (what a depth-pruning recipe builds)."""
    a_end, merge_end, drop_end = round(0.3 * n_layers), round(0.6 * n_layers), round(0.8 * n_layers)
    if not 0 < a_end < merge_end < drop_end < n_layers:
        raise SystemExit(f"--layers {n_layers} is too small for the job (needs at least 5)")
    if job == "cut":
        a_end = merge_end
    return {
        "a": (0, a_end),
        "merge": (a_end, merge_end),
        "drop": (merge_end, drop_end),
        "b": (drop_end, n_layers),
    }


def output_plan(n_layers: int, job: str = "merge") -> list[list[tuple[str, int, float]]]:
    """Output layer i -> its sources [(model, layer, weight)]."""
    j = job_layers(n_layers, job)
    plan = [[("a", i, 1.0)] for i in range(*j["a"])]
    plan += [[("a", i, 0.5), ("b", i, 0.5)] for i in range(*j["merge"])]
    plan += [[("b", i, 1.0)] for i in range(*j["b"])]
    return plan


NON_LAYER_SOURCE = {
    "model.embed_tokens.weight": "a",
    "model.norm.weight": "b",
    "lm_head.weight": "b",
}


# --------------------------------------------------------------------------- safetensors I/O


def read_header(path: Path) -> tuple[int, dict]:
    """Parse a safetensors header ourselves: (data offset, {name: entry})."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def checkpoint_index(model_dir: Path) -> dict[str, dict]:
    """name -> {file, dtype, shape, start, end} with absolute byte offsets."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        base, header = read_header(model_dir / fname)
        for name, e in header.items():
            s, t = e["data_offsets"]
            out[name] = {
                "file": str(model_dir / fname),
                "dtype": e["dtype"],
                "shape": e["shape"],
                "start": base + s,
                "end": base + t,
            }
    return out


def generate_checkpoints(shape: ModelShape, root: Path) -> tuple[Path, Path]:
    """Write A (random, std 0.02) and B = A + N(0, 0.002), sharded at ~1 GB. Cached."""
    import torch
    from safetensors.torch import save_file

    dirs = (root / shape.tag / "a", root / shape.tag / "b")
    done = root / shape.tag / "COMPLETE"
    if done.exists():
        return dirs
    shutil.rmtree(root / shape.tag, ignore_errors=True)
    for d in dirs:
        d.mkdir(parents=True)
    # Assign tensors to shards of at most SHARD_BYTES (one tensor may exceed it).
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shp in shape.tensors():
        nbytes = 2 * _numel(shp)
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shp))
        used += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    gen = torch.Generator().manual_seed(shape.seed)
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        ta, tb = {}, {}
        for name, shp in shard:
            if len(shp) == 1:  # norm weights: around 1
                a = 1.0 + 0.05 * torch.randn(shp, generator=gen)
            else:
                a = 0.02 * torch.randn(shp, generator=gen)
            b = a + 0.002 * torch.randn(shp, generator=gen)
            ta[name], tb[name] = a.to(torch.bfloat16), b.to(torch.bfloat16)
            del a, b
        for d, tensors in zip(dirs, (ta, tb)):
            save_file(tensors, str(d / names[k]), metadata={"format": "pt"})
        print(
            f"  generated shard {k + 1}/{len(shards)} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        del ta, tb
    total = sum(2 * _numel(s) for _, s in shape.tensors())
    weight_map = {name: names[k] for k, shard in enumerate(shards) for name, _ in shard}
    for d in dirs:
        (d / "config.json").write_text(json.dumps(shape.config_json(), indent=2) + "\n")
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            + "\n"
        )
    done.write_text("ok\n")
    return dirs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- the job, three ways


def job_tensors(shape: ModelShape, indexes: dict[str, dict], job: str) -> list[dict]:
    """Every output tensor: {name, nbytes, sources: [(model, source name, weight)]}, in output order."""
    out = []

    def add(name, sources):
        nbytes = (
            indexes[sources[0][0]][sources[0][1]]["end"]
            - indexes[sources[0][0]][sources[0][1]]["start"]
        )
        out.append({"name": name, "nbytes": nbytes, "sources": sources})

    add(
        "model.embed_tokens.weight",
        [(NON_LAYER_SOURCE["model.embed_tokens.weight"], "model.embed_tokens.weight", 1.0)],
    )
    for i, sources in enumerate(output_plan(shape.layers, job)):
        for suffix, _ in LAYER_TENSORS:
            add(
                f"model.layers.{i}.{suffix}",
                [(m, f"model.layers.{j}.{suffix}", w) for m, j, w in sources],
            )
    for name in ("model.norm.weight", "lm_head.weight"):
        add(name, [(NON_LAYER_SOURCE[name], name, 1.0)])
    return out


def bytes_moved(tensors: list[dict], indexes: dict[str, dict]) -> tuple[int, int]:
    read = {(m, n) for t in tensors for m, n, _ in t["sources"]}
    read_bytes = sum(indexes[m][n]["end"] - indexes[m][n]["start"] for m, n in read)
    return read_bytes, sum(t["nbytes"] for t in tensors)


def write_tailorkit_recipe(
    path: Path, shape: ModelShape, dir_a: Path, dir_b: Path, job: str
) -> None:
    import yaml

    j = job_layers(shape.layers, job)
    layers: list[dict] = [{"from": "a", "layers": list(j["a"])}]
    for i in range(*j["merge"]):
        layers.append(
            {
                "merge": "linear",
                "sources": [
                    {"from": "a", "layer": i, "weight": 0.5},
                    {"from": "b", "layer": i, "weight": 0.5},
                ],
            }
        )
    layers.append({"from": "b", "layers": list(j["b"])})
    recipe = {
        "models": {"a": str(dir_a), "b": str(dir_b)},
        "dtype": "bfloat16",
        "layers": layers,
        "embeddings": NON_LAYER_SOURCE["model.embed_tokens.weight"],
        "head": NON_LAYER_SOURCE["lm_head.weight"],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def write_mergekit_config(
    path: Path, shape: ModelShape, dir_a: Path, dir_b: Path, job: str
) -> None:
    """The same job for mergekit. Its merge method is global, so passthrough slices are
    one-source linear slices with weight 1 (exact: (0 + 1*x) / 1). Embeddings come from the
    first slice's model (A), final norm and LM head from the last slice's model (B)."""
    import yaml

    j = job_layers(shape.layers, job)

    def src(d, rng, w):
        return {"model": str(d), "layer_range": list(rng), "parameters": {"weight": w}}

    cfg = {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "out_dtype": "bfloat16",
        "slices": [
            {"sources": [src(dir_a, j["a"], 1.0)]},
            *(
                [{"sources": [src(dir_a, j["merge"], 0.5), src(dir_b, j["merge"], 0.5)]}]
                if j["merge"][0] < j["merge"][1]
                else []
            ),
            {"sources": [src(dir_b, j["b"], 1.0)]},
        ],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def write_floor_plan(path: Path, tensors: list[dict], indexes: dict[str, dict]) -> None:
    """For the floor worker: output shards as lists of [[file, start, end], ...] per tensor."""
    shards: list[list] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t["nbytes"] > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(
            [
                [indexes[m][n]["file"], indexes[m][n]["start"], indexes[m][n]["end"]]
                for m, n, _ in t["sources"]
            ]
        )
        used += t["nbytes"]
    path.write_text(json.dumps(shards))


def floor_worker(plan_path: str, out_dir: str, chunk: int = 8 << 20) -> None:
    """Plain file I/O, no arithmetic: read each needed span, write one output's worth."""
    shards = json.loads(Path(plan_path).read_text())
    os.makedirs(out_dir, exist_ok=True)
    bufs = [bytearray(chunk), bytearray(chunk)]
    views = [memoryview(b) for b in bufs]
    files: dict[str, object] = {}
    for k, shard in enumerate(shards):
        with open(os.path.join(out_dir, f"floor-{k:05d}.bin"), "wb", buffering=0) as out:
            for spans in shard:
                length = spans[0][2] - spans[0][1]
                pos = 0
                while pos < length:
                    n = min(chunk, length - pos)
                    for s, (fname, start, _) in enumerate(spans):
                        f = files.get(fname) or files.setdefault(
                            fname, open(fname, "rb", buffering=0)
                        )
                        got = os.preadv(f.fileno(), [views[s % 2][:n]], start + pos)
                        if got != n:
                            raise OSError(f"short read from {fname}")
                    out.write(views[0][:n])
                    pos += n
    for f in files.values():
        f.close()


# --------------------------------------------------------------------------- measuring


def run_measured(
    cmd: list[str],
    env: dict | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.02,
    marker: bytes | None = None,
) -> dict:
    """Run a child: wall seconds, CPU seconds, peak RSS and polled peak anon/file RSS (MB),
    and the seconds from spawn to the first output line containing ``marker`` (the line a
    build logs as it starts moving tensor bytes).

    Peak RSS is the child's own VmHWM from /proc (polled; it only grows), which is
    not inflated by this parent's memory the way wait4's ru_maxrss is (Linux copies
    the parent's high-water mark into the child at fork/exec); ru_maxrss is kept too.
    """
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop = threading.Event()
    out_chunks: list[bytes] = []
    marked: list[float] = []

    def drain():
        for line in proc.stdout:
            if marker and not marked and marker in line:
                marked.append(time.perf_counter() - t0)
            out_chunks.append(line)

    def poll():
        path = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
            stop.wait(poll_s)

    threads = [
        threading.Thread(target=drain, daemon=True),
        threading.Thread(target=poll, daemon=True),
    ]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(timeout=5)
    text = b"".join(out_chunks).decode(errors="replace")
    return {
        "seconds": seconds,
        "rc": os.waitstatus_to_exitcode(status),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": max(peaks["VmHWM"], peaks["RssAnon"] + peaks["RssFile"]) / 1024,
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,
        "load_before": load_before,
        "first_byte_seconds": marked[0] if marked else None,
        "output_tail": text[-3000:],
    }


def prewarm(spans: list[tuple[str, int, int]], chunk: int = 8 << 20) -> float:
    """Read the job's input spans once (into one scratch buffer) and return the seconds taken.

    On this kind of shared VM the page cache was seen to drop source pages between
    runs even with most memory free, so each run is preceded by this untimed read;
    a long prewarm means pages had been evicted.
    """
    buf = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    fds: dict[str, int] = {}
    try:
        for fname, start, end in spans:
            fd = fds.get(fname)
            if fd is None:
                fd = fds[fname] = os.open(fname, os.O_RDONLY)
            pos = start
            while pos < end:
                pos += os.preadv(fd, [buf[: min(chunk, end - pos)]], pos) or end
    finally:
        for fd in fds.values():
            os.close(fd)
    return time.perf_counter() - t0


def ensure_mergekit_venv(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(
        f"creating {venv} (torch=={TORCH_VERSION} CPU first, then mergekit=={MERGEKIT_VERSION})",
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    return exe


@dataclasses.dataclass
class Method:
    name: str
    cmd: list[str]
    out_dir: Path
    env: dict | None = None
    cwd: Path | None = None  # not the repo: `python -m` puts the cwd first on sys.path
    marker: bytes | None = None  # the output line that says tensor bytes start moving
    runs: list = dataclasses.field(default_factory=list)
    failure: dict | None = None

    def run_once(self, label: str, warm_spans: list) -> None:
        if self.failure:
            return
        shutil.rmtree(self.out_dir, ignore_errors=True)
        os.sync()  # untimed: no run pays for an earlier run's writeback
        warm_s = prewarm(warm_spans)  # untimed: every run starts with the inputs in the page cache
        res = run_measured(self.cmd, env=self.env, cwd=self.cwd, marker=self.marker)
        res["prewarm_seconds"] = warm_s
        print(
            f"  {self.name:9s} {label:7s} {res['seconds']:7.2f} s  cpu {res['cpu_seconds']:6.2f} s  "
            f"peak RSS {res['peak_rss_mb']:5.0f} MB (anon {res['peak_anon_mb']:.0f}, file {res['peak_file_mb']:.0f})"
            f"  load {res['load_before']:.1f}  prewarm {warm_s:.1f} s  rc={res['rc']}",
            flush=True,
        )
        if res["rc"] != 0:
            print(res["output_tail"])
            self.failure = {"rc": res["rc"], "output_tail": res["output_tail"], "label": label}
        elif label != "warm-up":
            self.runs.append(res)

    def summary(self) -> dict:
        base = {"method": self.name, "command": self.cmd}
        if self.failure or not self.runs:
            return {**base, "failed": True, **(self.failure or {})}

        def med(key: str) -> float:
            return statistics.median(r[key] for r in self.runs)

        return {
            **base,
            "failed": False,
            "seconds": med("seconds"),
            "cpu_seconds": med("cpu_seconds"),
            "all_seconds": [round(r["seconds"], 3) for r in self.runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in self.runs),
            "peak_anon_mb": max(r["peak_anon_mb"] for r in self.runs),
            "peak_file_mb": max(r["peak_file_mb"] for r in self.runs),
            "ru_maxrss_mb": max(r["ru_maxrss_mb"] for r in self.runs),
            "first_byte_seconds": (
                statistics.median(r["first_byte_seconds"] for r in self.runs)
                if self.marker and all(r["first_byte_seconds"] for r in self.runs)
                else None
            ),
            "load_before": [round(r["load_before"], 2) for r in self.runs],
            "prewarm_seconds": [round(r["prewarm_seconds"], 2) for r in self.runs],
            "output_tail": self.runs[-1]["output_tail"][-1500:],
        }


# --------------------------------------------------------------------------- agreement


def _ordered_bits(t):
    """bf16 -> int32 that orders like the float values (for ulp distances)."""
    import torch

    i = t.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def compare_outputs(
    dirs: dict[str, Path], tensors: list[dict], indexes: dict[str, dict], n_out_layers: int
) -> dict:
    """Each output vs the reference computed here, and the outputs with each other."""
    import torch
    from safetensors import safe_open

    def open_all(d: Path):
        idx = checkpoint_index(d)
        handles = {f: safe_open(f, "pt") for f in {e["file"] for e in idx.values()}}
        return idx, handles

    src = {m: open_all(Path(indexes[m][next(iter(indexes[m]))]["file"]).parent) for m in indexes}
    outs = {k: open_all(d) for k, d in dirs.items()}
    expected_names = [t["name"] for t in tensors]
    report: dict = {}
    for k, (idx, _) in outs.items():
        missing = sorted(set(expected_names) - set(idx))
        extra = sorted(set(idx) - set(expected_names))
        report[k] = {
            "missing": missing[:10],
            "n_missing": len(missing),
            "extra": extra[:10],
            "n_extra": len(extra),
            "bad_meta": [],
            "passthrough_not_exact": [],
            "merged_over_tol": [],
            "merged_max_ulp": 0,
            "merged_max_abs": 0.0,
            "merged_elems_differing": 0,
        }
    pair = {"tensors_not_identical": [], "max_ulp": 0, "max_abs": 0.0} if len(outs) == 2 else None

    def get(handle_pair, name):
        idx, handles = handle_pair
        return handles[idx[name]["file"]].get_tensor(name)

    for t in tensors:
        name = t["name"]
        ref_parts = [(get(src[m], n), w) for m, n, w in t["sources"]]
        if len(ref_parts) == 1:
            ref = ref_parts[0][0]
        else:
            total = sum(w for _, w in ref_parts)
            acc = torch.zeros(ref_parts[0][0].shape, dtype=torch.float32)
            for x, w in ref_parts:
                acc.add_(x.float(), alpha=w / total)
            ref = acc.to(torch.bfloat16)
        got_all = {}
        for k, pair_h in outs.items():
            r = report[k]
            if name not in pair_h[0]:
                continue
            got = get(pair_h, name)
            got_all[k] = got
            if got.dtype != ref.dtype or tuple(got.shape) != tuple(ref.shape):
                r["bad_meta"].append(
                    f"{name}: {got.dtype} {tuple(got.shape)} vs {ref.dtype} {tuple(ref.shape)}"
                )
                continue
            if len(ref_parts) == 1:
                if not torch.equal(got.view(torch.int16), ref.view(torch.int16)):
                    r["passthrough_not_exact"].append(name)
            else:
                ulp = (_ordered_bits(got) - _ordered_bits(ref)).abs()
                mx = int(ulp.max())
                r["merged_max_ulp"] = max(r["merged_max_ulp"], mx)
                r["merged_max_abs"] = max(
                    r["merged_max_abs"], float((got.float() - ref.float()).abs().max())
                )
                r["merged_elems_differing"] += int((ulp > 0).sum())
                if mx > BF16_ULP_TOLERANCE:
                    r["merged_over_tol"].append(f"{name}: {mx} ulp")
        if pair is not None and len(got_all) == 2:
            x, y = got_all.values()
            if x.shape == y.shape and x.dtype == y.dtype == torch.bfloat16:
                ulp = (_ordered_bits(x) - _ordered_bits(y)).abs()
                if int(ulp.max()) > 0:
                    pair["tensors_not_identical"].append(name)
                pair["max_ulp"] = max(pair["max_ulp"], int(ulp.max()))
                pair["max_abs"] = max(pair["max_abs"], float((x.float() - y.float()).abs().max()))
    for k, d in dirs.items():
        cfg = json.loads((d / "config.json").read_text())
        report[k]["num_hidden_layers"] = cfg.get("num_hidden_layers")
    for k, r in report.items():
        r["ok"] = (
            not r["n_missing"]
            and not r["n_extra"]
            and not r["bad_meta"]
            and not r["passthrough_not_exact"]
            and not r["merged_over_tol"]
            and r["num_hidden_layers"] == n_out_layers
        )
    if pair is not None:
        pair["tensors_not_identical_count"] = len(pair["tensors_not_identical"])
        pair["tensors_not_identical"] = pair["tensors_not_identical"][:10]
        report["tailorkit_vs_mergekit"] = pair
    return report


# --------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument(
        "--intermediate", type=int, default=None, help="default: 8/3*hidden rounded up to 256"
    )
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed runs per method after one warm-up each, interleaved (median shown)",
    )
    p.add_argument(
        "--job",
        choices=JOBS,
        default="merge",
        help="merge: the job above; cut: the same layers with none merged (copies only)",
    )
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument(
        "--skip-tailorkit", action="store_true", help="time only the floor (and mergekit)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "tailorkit" / "bench",
        help="checkpoints, outputs and the mergekit venv live here (default: %(default)s)",
    )
    p.add_argument(
        "--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "build_speed.json"
    )
    p.add_argument(
        "--tailorkit-path",
        type=Path,
        default=REPO_ROOT,
        help="source tree put first on PYTHONPATH for `python -m tailorkit.cli` "
        "(e.g. a copy with the C++ extension built in place; default: this repo)",
    )
    p.add_argument(
        "--compare-path",
        type=Path,
        help="another tailorkit source tree (e.g. a worktree of an older commit), timed "
        "beside the first as tailorkit@NAME",
    )
    p.add_argument(
        "--generate-only", action="store_true", help="write (or find) the checkpoints and stop"
    )
    p.add_argument("--floor-worker", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.floor_worker:
        floor_worker(*args.floor_worker)
        return 0
    if args.reps < 1:
        p.error("--reps must be at least 1")
    shape = ModelShape(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate or default_intermediate(args.hidden),
        heads=args.heads,
        kv_heads=args.heads,
        vocab=args.vocab,
    )
    job_layers(shape.layers, args.job)  # validates --layers
    cache = args.cache_dir.expanduser()
    if args.generate_only:
        print(f"checkpoints: {shape}", flush=True)
        for d in generate_checkpoints(shape, cache / "models"):
            print(f"  {d}")
        return 0
    # Generate in a child, so this process stays small (its memory would otherwise
    # leak into the children's ru_maxrss) and does not import torch until the check.
    own_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *own_args, "--generate-only"], check=True
    )
    dir_a, dir_b = (cache / "models" / shape.tag / "a", cache / "models" / shape.tag / "b")
    indexes = {"a": checkpoint_index(dir_a), "b": checkpoint_index(dir_b)}
    tensors = job_tensors(shape, indexes, args.job)
    n_out_layers = len(output_plan(shape.layers, args.job))
    read_b, write_b = bytes_moved(tensors, indexes)
    moved = read_b + write_b
    src_bytes = sum(e["end"] - e["start"] for idx in indexes.values() for e in idx.values())
    print(
        f"  sources {src_bytes / 1e9:.2f} GB; job reads {read_b / 1e9:.2f} GB, writes {write_b / 1e9:.2f} GB "
        f"({n_out_layers} of {shape.layers} layers out): {moved / 1e9:.2f} GB moved",
        flush=True,
    )

    work = cache / "work" / (shape.tag if args.job == "merge" else f"{shape.tag}-{args.job}")
    work.mkdir(parents=True, exist_ok=True)
    recipe, mk_cfg, floor_plan = (
        work / "recipe.yaml",
        work / "mergekit.yml",
        work / "floor_plan.json",
    )
    write_tailorkit_recipe(recipe, shape, dir_a, dir_b, args.job)
    write_mergekit_config(mk_cfg, shape, dir_a, dir_b, args.job)
    write_floor_plan(floor_plan, tensors, indexes)

    methods = [
        Method(
            "floor",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--floor-worker",
                str(floor_plan),
                str(work / "out-floor"),
            ],
            work / "out-floor",
            cwd=work,
        )
    ]
    tk_backend = None
    if not args.skip_tailorkit:
        tk_backend = tailorkit_backend(_tailorkit_env(args.tailorkit_path), work)
        print(f"  tailorkit from {args.tailorkit_path}: merge kernels = {tk_backend}", flush=True)
        methods.append(tailorkit_method("tailorkit", args.tailorkit_path, recipe, work))
    if args.compare_path:
        label = f"tailorkit@{args.compare_path.name}"
        print(f"  {label} from {args.compare_path}", flush=True)
        methods.append(tailorkit_method(label, args.compare_path, recipe, work))
    if not args.skip_mergekit:
        exe = ensure_mergekit_venv(cache / "mergekit-venv")
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1"
        )
        out = work / "out-mergekit"
        # A fair CPU configuration: it reads safetensors lazily (one tensor at a time, mmap) by
        # default; --lazy-unpickle only matters for pickles but costs nothing. Its
        # --out-shard-size counts bytes despite the help text ("parameters"), so 1e9 = 1 GB
        # shards like the others. All cores for torch; no tokenizer or card to write.
        methods.append(
            Method(
                "mergekit",
                [
                    str(exe),
                    str(mk_cfg),
                    str(out),
                    "--out-shard-size",
                    str(SHARD_BYTES),
                    "--no-copy-tokenizer",
                    "--no-write-model-card",
                    "--lazy-unpickle",
                    "--quiet",
                    "-j",
                    str(os.cpu_count() or 1),
                ],
                out,
                env,
                cwd=work,
            )
        )

    print(
        f"timing: one warm-up each, then {args.reps} interleaved rep(s); median reported",
        flush=True,
    )
    spans = sorted(
        {
            (indexes[m][n]["file"], indexes[m][n]["start"], indexes[m][n]["end"])
            for t in tensors
            for m, n, _ in t["sources"]
        }
    )
    for m in methods:
        m.run_once("warm-up", spans)
    for r in range(args.reps):
        for m in methods:
            m.run_once(f"rep {r + 1}", spans)
    results = [m.summary() for m in methods]
    by = {r["method"]: r for r in results}
    floor_s = None if by["floor"]["failed"] else by["floor"]["seconds"]
    for r in results:
        if not r["failed"]:
            r["gb_per_s"] = moved / 1e9 / r["seconds"]
            r["x_floor"] = r["seconds"] / floor_s if floor_s else None

    print()
    print(table(results))

    agreement = None
    compare = {
        k: work / f"out-{k}" for k in ("tailorkit", "mergekit") if k in by and not by[k]["failed"]
    }
    if compare:
        print(
            f"\nagreement (names, shapes, dtypes; passthrough bit-exact; linear within "
            f"{BF16_ULP_TOLERANCE} bf16 ulp of the fp32 reference):",
            flush=True,
        )
        agreement = compare_outputs(compare, tensors, indexes, n_out_layers)
        for k, r in agreement.items():
            print(f"  {k}: {json.dumps(r)}")

    goals = {}
    tk = by.get("tailorkit")
    if tk and not tk["failed"]:
        goals["x_floor"] = round(tk["x_floor"], 3)
        goals[f"within_{GOAL_X_FLOOR}x_floor"] = tk["x_floor"] <= GOAL_X_FLOOR
        if tk["first_byte_seconds"] is not None:
            goals["first_byte_seconds"] = round(tk["first_byte_seconds"], 3)
            goals[f"first_byte_within_{GOAL_FIRST_BYTE_S}s"] = (
                tk["first_byte_seconds"] <= GOAL_FIRST_BYTE_S
            )
        goals["peak_rss_mb"] = round(tk["peak_rss_mb"])
        goals["peak_rss_under_1GB"] = tk["peak_rss_mb"] < GOAL_PEAK_RSS_MB
        mk = by.get("mergekit")
        if mk and not mk["failed"]:
            goals["speedup_vs_mergekit"] = round(mk["seconds"] / tk["seconds"], 2)
            goals[f"{GOAL_X_FASTER_THAN_MERGEKIT:g}x_faster_than_mergekit"] = (
                goals["speedup_vs_mergekit"] >= GOAL_X_FASTER_THAN_MERGEKIT
            )
        if agreement:
            goals["output_correct"] = bool(agreement["tailorkit"]["ok"])
        print("\ngoals:", json.dumps(goals))

    record = {
        "benchmark": "build_speed",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
        },
        "command": " ".join(
            ["python", "benchmarks/build_speed.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "shape": dataclasses.asdict(shape),
        "job": {"name": args.job, **job_layers(shape.layers, args.job)},
        "bytes": {"read": read_b, "written": write_b, "moved": moved},
        "reps": args.reps,
        "tailorkit_path": str(args.tailorkit_path),
        "tailorkit_merge_backend": tk_backend,
        "results": results,
        "agreement": agreement,
        "goals": goals,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(not r["failed"] for r in results) else 1


def _tailorkit_env(path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return env


def tailorkit_method(label: str, path: Path, recipe: Path, work: Path) -> Method:
    """``tailorkit build`` of the job with the tailorkit source tree at ``path``."""
    out = work / f"out-{label.replace('@', '-')}"
    command = [sys.executable, "-m", "tailorkit.cli", "-v", "build", str(recipe), str(out)]
    # -v logs the line that marks the first tensor bytes.
    command += ["--shard-size", "1GB"]
    env = _tailorkit_env(path)
    return Method(label, command, out, env, cwd=work, marker=b"file to file while computing")


def tailorkit_backend(env: dict, cwd: Path) -> str:
    """Which merge implementation the CLI will use (C++ extension or PyTorch reference), in words."""
    probe = "import tailorkit.ops as o; print(o.backend(), '--', o.backend_reason())"
    res = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True
    )
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[-1] if lines else f"unknown (probe exited {res.returncode})"


def table(results: list[dict]) -> str:
    """Markdown table: the same text goes to the terminal and to RESULTS.md."""
    rows = [
        "| method | seconds (median) | GB/s moved | × floor | peak RSS MB (anon / file) | CPU s "
        "| first tensor byte (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["failed"]:
            rows.append(f"| {r['method']} | FAILED (rc {r.get('rc')}) | | | | | |")
            continue
        first = r.get("first_byte_seconds")
        rows.append(
            f"| {r['method']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['x_floor']:.2f} | "
            f"{r['peak_rss_mb']:.0f} ({r['peak_anon_mb']:.0f} / {r['peak_file_mb']:.0f}) | "
            f"{r['cpu_seconds']:.1f} | {'' if first is None else f'{first:.2f}'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
