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

import io
import json
import math
import os
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tailorkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Largest header we accept; the reference implementation uses the same bound.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class DType:
    """A tensor dtype as the file spells it, known without importing torch: reading
    headers, planning a build and copying unchanged tensors need only names and sizes, so
    ``tailorkit build`` starts moving bytes while torch is still loading."""

    name: str  # safetensors' spelling, "BF16"
    torch_name: str  # "bfloat16"
    itemsize: int
    is_floating_point: bool

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)

    def __str__(self) -> str:
        return self.torch_name


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", "float64", 8, True),
        DType("F32", "float32", 4, True),
        DType("F16", "float16", 2, True),
        DType("BF16", "bfloat16", 2, True),
        DType("I64", "int64", 8, False),
        DType("I32", "int32", 4, False),
        DType("I16", "int16", 2, False),
        DType("I8", "int8", 1, False),
        DType("U8", "uint8", 1, False),
        DType("BOOL", "bool", 1, False),
    )
}
_BY_TORCH_NAME = {d.torch_name: d for d in DTYPES.values()}


def as_dtype(dtype: DType | torch.dtype | str) -> DType:
    """A DType from itself, a torch dtype or a torch name ("bfloat16")."""
    if isinstance(dtype, DType):
        return dtype
    found = _BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors by tailorkit")
    return found


def dtype_name(dtype: DType | torch.dtype) -> str:
    """The safetensors spelling of a dtype."""
    return as_dtype(dtype).name


def itemsize(dtype: DType | torch.dtype) -> int:
    return as_dtype(dtype).itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and its absolute byte span in it."""

    name: str
    dtype: DType
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


def read_header(path: str | os.PathLike, data: bytes | None = None) -> Header:
    """Parse and validate the header of ``path`` without reading tensor data; or, with
    ``data``, of the whole file already read into memory (its errors still name ``path``)."""
    path = Path(path)
    try:
        with open(path, "rb") if data is None else io.BytesIO(data) as f:
            stat = os.fstat(f.fileno()) if data is None else os.stat_result((0,) * 10)
            size = stat.st_size if data is None else len(data)
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
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise CheckpointError(
            f"{path}: header names {_short(e.args[0])} twice; a header that can be read two ways "
            "is refused"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and integers past Python's digit limit;
        # RecursionError, arrays or objects nested thousands deep.
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({why})") from None
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
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{where}: unknown dtype {_short(entry['dtype'])} (supported: {', '.join(DTYPES)})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(
            f"{where}: shape must be a list of non-negative integers, got {_short(shape)}"
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets must be two integers, got {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets {_short(offsets)} lie outside the data area "
            f"(0..{data_len} bytes); the file is truncated or its header lies"
        )
    # Checked against the span while multiplying, so an absurd shape (a product past int64,
    # or a list of a million dimensions) is refused at once, before any allocation.
    size = itemsize(dtype)
    numel = _numel_up_to(shape, (end - begin) // size + 1)
    if numel is None or numel * size != end - begin:
        needs = f"more than {end - begin}" if numel is None else f"{numel * size}"
        raise CheckpointError(
            f"{where}: shape {_short(shape)} x {entry['dtype']} needs {needs} bytes "
            f"but data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return doc


def _numel_up_to(shape: list[int], limit: int) -> int | None:
    """The product of ``shape``, or None as soon as it passes ``limit``."""
    if 0 in shape:
        return 0
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > limit:
            return None
    return numel


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 8, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def _short(value: object) -> str:
    """A header value for a message: never a megabyte of text from a hostile file."""
    return _REPR.repr(value)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(
                f"{path}: tensors {_short(name_a)} and {_short(name_b)} overlap in the file"
            )
