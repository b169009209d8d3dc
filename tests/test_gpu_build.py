"""The streaming build with its merges on a device (tailorkit/gpu_build.py).

On any machine: the lane pipeline itself (run with device="cpu": same chunking,
threads, reads and positional writes, without the copies) must write exactly
the bytes the plain CPU build writes, for every merge method (and a bridge folded
into a merge), odd chunk sizes
and several shards; failures must surface as the CPU path's errors; asking for
CUDA where there is none must say why.

With a GPU (``-m cuda``): ``build(..., device="cuda")`` must write the same
bytes as ``device="cpu"``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import tailorkit as tk
from tailorkit import ops
from tailorkit.builder import _write_weights
from tailorkit.checkpoint import writer
from tailorkit.checkpoint.writer import parse_size
from tailorkit.cli import main as cli
from tailorkit.devices import resolve_device
from tailorkit.errors import CheckpointError, MergeError, TailorkitError
from tailorkit.gpu_build import DeviceStreamer, _Files

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason=f"no CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda})"
)


def _all_methods(family, dtype: str | None, width: bool = False) -> tk.Recipe:
    """Every merge method, passthroughs, and (with a dtype) float32 sources cast on the way;
    with ``width``, every layer keeping 40 of its 128 MLP channels."""
    recipe = {
        "models": {
            "base": str(family.base),
            "a": str(family.candidates[0]),
            "b": str(family.candidates[1]),
        },
        "layers": [
            {"from": "base", "layers": [0, 1]},
            {
                "merge": "linear",
                "sources": [
                    {"from": "base", "layer": 1, "weight": 0.3},
                    {"from": "a", "layer": 1, "weight": 0.7},
                ],
                "bridge": "b1",  # folded into the merged MLP output projection
            },
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": 3},
                "sources": [{"from": "a", "layer": 3}, {"from": "b", "layer": 3, "weight": 0.5}],
                "lambda": 0.6,
            },
            {
                "merge": "ties",
                "base": {"from": "base", "layer": 2},
                "sources": [{"from": "a", "layer": 2}, {"from": "b", "layer": 2}],
                "density": 0.4,
            },
            {
                "merge": "slerp",
                "t": 0.3,
                "sources": [{"from": "a", "layer": 0}, {"from": "b", "layer": 2}],
            },
            {
                "merge": "laco",
                "sources": [
                    {"from": "base", "layer": 1},
                    {"from": "a", "layer": 2},
                    {"from": "b", "layer": 3},
                ],
            },
        ],
    }
    if dtype:
        recipe["dtype"] = dtype
    recipe["tensors"] = {"file": "recipe.safetensors", "sha256": "0" * 64}
    bridge = torch.eye(64) + 0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    fitted = {"b1": bridge}
    if width:
        gen = torch.Generator().manual_seed(3)
        rows = [torch.randperm(128, generator=gen)[:40].sort().values for _ in range(6)]
        fitted["w"] = torch.stack(rows).int()
        recipe["width"] = {"intermediate_size": 40, "channels": "w"}
    return tk.Recipe.from_dict(recipe).with_fitted(fitted)


def _weight_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    }


def _assert_same_files(a: Path, b: Path) -> None:
    fa, fb = _weight_files(a), _weight_files(b)
    assert sorted(fa) == sorted(fb)
    assert len(fa) > 1, "expected several shards"
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("lanes", "chunk"), [(1, 1 << 22), (3, 777), (4, 64)], ids=["1x4M", "3x777", "4x64"]
)
def test_lane_pipeline_writes_the_cpu_bytes(family, tmp_path, dtype, lanes, chunk):
    plan = _all_methods(family, dtype).plan()
    max_bytes = parse_size("150KB")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "lanes").mkdir()
    _write_weights(plan, tmp_path / "cpu", max_bytes, False)
    with DeviceStreamer("cpu", lanes=lanes, chunk_elements=chunk) as streamer:
        _write_weights(plan, tmp_path / "lanes", max_bytes, False, streamer)
    _assert_same_files(tmp_path / "cpu", tmp_path / "lanes")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_lanes_write_the_cpu_bytes_of_a_width_pruned_recipe(family, tmp_path, device):
    """Kept MLP channels: each gathered tensor is made whole on the device, the same bytes."""
    plan = _all_methods(family, "bfloat16", width=True).plan()
    assert plan.config["intermediate_size"] == 40
    max_bytes = parse_size("150KB")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "lanes").mkdir()
    _write_weights(plan, tmp_path / "cpu", max_bytes, False)
    with DeviceStreamer(device, lanes=3, chunk_elements=777) as streamer:
        _write_weights(plan, tmp_path / "lanes", max_bytes, False, streamer)
    _assert_same_files(tmp_path / "cpu", tmp_path / "lanes")


def test_lane_builds_copy_unchanged_tensors_on_the_copy_thread(family, tmp_path, monkeypatch):
    """As on the CPU path, the raw copies run on their own thread from the start, and a
    copy that fails stops the lanes and is raised once they have stopped."""
    plan = _all_methods(family, None).plan()
    assert any(j.is_raw_copy for j in plan.jobs) and not all(j.is_raw_copy for j in plan.jobs)
    copy = writer.ShardWriter.copy
    threads = set()

    def recording(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(writer.ShardWriter, "copy", recording)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "lanes").mkdir()
    _write_weights(plan, tmp_path / "cpu", parse_size("150KB"), False)
    with DeviceStreamer("cpu", lanes=2, chunk_elements=777) as streamer:
        _write_weights(plan, tmp_path / "lanes", parse_size("150KB"), False, streamer)
        assert threads == {"tailorkit-copy"}
        _assert_same_files(tmp_path / "cpu", tmp_path / "lanes")

        def broken(self, name, *args, **kwargs):
            raise CheckpointError(f"{name}: copy failed (test)")

        monkeypatch.setattr(writer.ShardWriter, "copy", broken)
        (tmp_path / "broken").mkdir()
        with pytest.raises(CheckpointError, match="copy failed"):
            _write_weights(plan, tmp_path / "broken", parse_size("150KB"), False, streamer)
        assert streamer._tasks.empty()  # every queued task ran or was skipped


def test_lane_pipeline_reports_non_finite_merges(family, tmp_path):
    recipe = {
        "models": {"base": str(family.base), "a": str(family.candidates[0])},
        "layers": [
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": 0},
                "sources": [{"from": "a", "layer": 0}],
                "lambda": 1e300,  # inf as a float32 weight: the merge overflows
            }
        ],
    }
    plan = tk.Recipe.from_dict(recipe).plan()
    (tmp_path / "out").mkdir()
    with DeviceStreamer("cpu", lanes=3, chunk_elements=100) as streamer:
        with pytest.raises(MergeError, match=r"output layer 0 .*non-finite"):
            _write_weights(plan, tmp_path / "out", parse_size("1GB"), False, streamer)
        # The lanes are still usable after a failure.
        ok = tk.Recipe.from_dict({**recipe, "layers": [{"from": "base", "layer": 0}]}).plan()
        (tmp_path / "ok").mkdir()
        _write_weights(ok, tmp_path / "ok", parse_size("1GB"), False, streamer)


def test_lane_reads_report_a_short_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(100)))
    files = _Files()
    try:
        buffer = torch.empty(40, dtype=torch.uint8)
        files.read_into(path, 50, buffer)
        assert bytes(buffer.numpy()) == bytes(range(50, 90))
        with pytest.raises(CheckpointError, match="ended 10 bytes early"):
            files.read_into(path, 70, buffer)
    finally:
        files.close()


@pytest.mark.parametrize(
    ("device", "match"),
    [("tpu", "runs on 'cpu'"), ("not a device", "not a device name"), ("mps", "not on mps")],
)
def test_bad_device_names_are_explained(device, match):
    with pytest.raises(TailorkitError, match=match):
        resolve_device(device)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_build_without_cuda_says_why(family, tmp_path):
    recipe = _all_methods(family, None)
    with pytest.raises(TailorkitError, match=r"'cuda'.*(without CUDA|no CUDA GPU)"):
        tk.build(recipe, tmp_path / "out", progress=False, device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cli_build_device_flag_without_cuda(family, tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    _all_methods(family, None).to_yaml(recipe_path)
    code = cli(["build", str(recipe_path), str(tmp_path / "out"), "-q", "--device", "cuda"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tailorkit build: error: device 'cuda'" in err
    assert not (tmp_path / "out").exists()


def test_cli_build_device_cpu(family, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    _all_methods(family, None).to_yaml(recipe_path)
    assert cli(["build", str(recipe_path), str(tmp_path / "out"), "-q", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_cuda_build_writes_the_cpu_bytes(family, tmp_path, dtype):
    recipe = _all_methods(family, dtype)
    cpu = tk.build(recipe, tmp_path / "cpu", shard_size="150KB", progress=False)
    gpu = tk.build(recipe, tmp_path / "gpu", shard_size="150KB", progress=False, device="cuda")
    _assert_same_files(cpu, gpu)
    for name in ("config.json", "recipe.yaml", "README.md"):
        assert (cpu / name).read_bytes() == (gpu / name).read_bytes()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("lanes", "chunk"), [(1, 4096), (3, 777)], ids=["1x4096", "3x777"])
def test_cuda_lanes_with_small_chunks_write_the_cpu_bytes(family, tmp_path, lanes, chunk):
    plan = _all_methods(family, "bfloat16").plan()
    max_bytes = parse_size("150KB")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    _write_weights(plan, tmp_path / "cpu", max_bytes, False)
    with DeviceStreamer("cuda", lanes=lanes, chunk_elements=chunk) as streamer:
        _write_weights(plan, tmp_path / "gpu", max_bytes, False, streamer)
    _assert_same_files(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_are_built():
    """On a GPU machine the CUDA build must not have fallen back to the CPU kernels."""
    assert ops.backend() == "cpp+cuda", ops.backend_reason()
