"""A strict reader of the safetensors header, and the dtype table.

The format is an 8-byte little-endian header length, a JSON header mapping
tensor names to ``{dtype, shape, data_offsets}``, then the raw data.  Files
come from strangers on the Hub, so every claim the header makes is checked
against the file before a single tensor byte is trusted: the length fits the
file, the JSON parses to the expected shape, each dtype is known, each
``shape x itemsize`` equals its byte span, every span lies inside the data
area, and no two spans overlap.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorkit.errors import CheckpointError

# Largest header we accept; the reference implementation uses the same bound.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(
            f"dtype {dtype} cannot be stored in safetensors by tailorkit"
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and its absolute byte span in it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    mtime_ns: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of ``path`` without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            if size < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short for a safetensors header"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; "
                    "the file is corrupt or not safetensors"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes); "
                    "the file is truncated or corrupt"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(doc).__name__}")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_no_overlap(path, tensors)
    return Header(path, tensors, metadata, data_start, size, stat.st_mtime_ns)


def _tensor_info(
    path: Path, name: str, entry: object, data_start: int, data_len: int
) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{where}: unknown dtype {entry['dtype']!r} (supported: {', '.join(DTYPES)})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(
            f"{where}: shape must be a list of non-negative integers, got {shape!r}"
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data area "
            f"(0..{data_len} bytes); the file is truncated or its header lies"
        )
    # Python ints do not overflow, so an absurd shape is caught here, before any allocation.
    expected = math.prod(shape) * itemsize(dtype)
    if expected != end - begin:
        raise CheckpointError(
            f"{where}: shape {shape} x {entry['dtype']} needs {expected} bytes "
            f"but data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the file")
