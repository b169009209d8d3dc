"""The strict safetensors header reader: valid files load, lying files are refused by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tailorkit.checkpoint.safetensors_format import read_header
from tailorkit.checkpoint.source import Source
from tailorkit.errors import CheckpointError


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {n: (t.dtype.torch, t.shape) for n, t in header.tensors.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()
    }
    data = (tmp_path / "x.safetensors").read_bytes()
    for name, info in header.tensors.items():
        expected = tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        assert data[info.start : info.end] == expected


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            "outside the data area",
        ),
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
            b"\0" * 16,
            "needs 16 bytes",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}},
            b"\0" * 16,
            "outside the data area",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
            b"\0" * 16,
            "outside the data area",
        ),
        (
            {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}},
            b"\0" * 16,
            "unknown dtype 'Q4'",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 16,
            "non-negative integers",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
            b"\0" * 16,
            "needs",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2]}},
            b"\0" * 16,
            "exactly dtype, shape and data_offsets",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 16,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_lying_headers_are_refused(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(path)
    assert "bad.safetensors" in str(e.value)
    if "tensor '" in str(e.value):
        assert "'a'" in str(e.value)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="larger than the file"):
        read_header(path)


def test_huge_header_length_rejected_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        read_header(path)


def test_not_json_and_too_short(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        read_header(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(tiny)


def test_truncated_shard_is_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(tmp_path / "x.safetensors")


def test_views_are_zero_copy_and_match(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "model_type": "llama"})
    )
    tensors = {
        "model.layers.0.w": torch.randn(5, 3),
        "model.embed_tokens.weight": torch.randn(4, 3),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    src = Source(str(tmp_path))
    a = src.view(src.tensors["model.layers.0.w"])
    b = src.view(src.tensors["model.layers.0.w"])
    assert torch.equal(a, tensors["model.layers.0.w"])
    assert a.data_ptr() == b.data_ptr()  # both views of the one mapping: no copy
    a.mul_(0)  # copy-on-write: the file is untouched
    assert torch.equal(
        Source(str(tmp_path)).view(src.tensors["model.layers.0.w"]), tensors["model.layers.0.w"]
    )


def test_shard_changed_after_validation_is_detected(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "model_type": "llama"})
    )
    save_file({"model.layers.0.w": torch.randn(8)}, tmp_path / "model.safetensors")
    src = Source(str(tmp_path))
    save_file({"model.layers.0.w": torch.randn(16)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed on disk"):
        src.view(src.tensors["model.layers.0.w"])


def test_sharded_index_errors(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "model_type": "llama"})
    )
    save_file(
        {"model.layers.0.w": torch.randn(8), "model.norm.weight": torch.randn(8)},
        tmp_path / "s1.safetensors",
    )
    save_file({"lm_head.weight": torch.randn(8)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.layers.0.w": "s1.safetensors",
                    "lm_head.weight": "s2.safetensors",
                }
            }
        )
    )
    with pytest.raises(CheckpointError, match="missing index entry for tensor 'model.norm.weight'"):
        Source(str(tmp_path))
    index.write_text(
        json.dumps({"weight_map": {"model.layers.0.w": "s1.safetensors", "x": "s3.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="s3.safetensors, which is missing"):
        Source(str(tmp_path))
    index.write_text(json.dumps({"weight_map": {"model.layers.0.w": "../s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file name"):
        Source(str(tmp_path))
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.layers.0.w": "s1.safetensors",
                    "model.norm.weight": "s1.safetensors",
                    "lm_head.weight": "s2.safetensors",
                }
            }
        )
    )
    assert set(Source(str(tmp_path)).tensors) == {
        "model.layers.0.w",
        "model.norm.weight",
        "lm_head.weight",
    }


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "model_type": "llama"})
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="pickle"):
        Source(str(tmp_path))


def test_not_a_model_reference(tmp_path):
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        Source(str(tmp_path / "nowhere" / "at" / "all"))
    with pytest.raises(CheckpointError, match="no config.json"):
        Source(str(tmp_path))
