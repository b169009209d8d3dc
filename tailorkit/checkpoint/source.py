"""A source model: resolved to a local directory, headers parsed, shards memory-mapped.

Opening a source reads config.json and the safetensors headers only; tensor
data is touched when a view is first used.  Each shard is mapped once,
copy-on-write, so views are zero-copy, writable for torch and never write back
to the file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailorkit.checkpoint import builtin
from tailorkit.checkpoint.architecture import Architecture, detect
from tailorkit.checkpoint.safetensors_format import (
    DTYPES,
    DType,
    Header,
    TensorInfo,
    as_dtype,
    read_header,
)
from tailorkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a Hub download fetches: weights, config and tokenizer, never pickles or code.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve(ref: str) -> Path:
    """A model reference (local directory, ``builtin:NAME`` or Hub id) as a local directory."""
    if builtin.is_builtin(ref):
        return builtin.builtin_path(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{ref}: is a file; a model is a directory holding config.json and safetensors"
        )
    if not _REPO_ID.match(ref) or ".." in ref:
        raise CheckpointError(
            f"{ref!r}: no such directory, and not a Hub repo id of the form "
            "'org/name' or 'org/name@revision'"
        )
    repo_id, _, revision = ref.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
        )
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get it"
        raise CheckpointError(
            f"{ref}: could not download from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "check the id and your network, or pass a local directory"
        ) from e


class Source:
    """One model of a recipe, opened for reading."""

    def __init__(self, ref: str, name: str | None = None):
        self.ref = ref
        self.name = name or ref
        self.path = resolve(ref)
        self.config = _read_config(self.path)
        self.headers = _read_headers(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for header in self.headers:
            self.tensors.update(header.tensors)
        self.arch: Architecture = detect(self.config, list(self.tensors), str(self.path))
        self._maps: dict[Path, mmap.mmap] = {}

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {str(self.path)!r}, layers={self.num_layers})"

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @cached_property
    def dtype(self) -> DType:
        """The checkpoint's dtype: config.json's if it names one, else the commonest float dtype."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str):
            with contextlib.suppress(CheckpointError):
                return as_dtype(name)
        counts: dict[DType, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return max(counts, key=counts.__getitem__) if counts else DTYPES["F32"]

    def layer(self, index: int) -> dict[str, TensorInfo]:
        """The tensors of decoder layer ``index``, keyed by the name after the layer index."""
        if not 0 <= index < self.num_layers:
            raise CheckpointError(
                f"layer {index} of model {self.name!r} does not exist: it has "
                f"{self.num_layers} layers (0-{self.num_layers - 1})"
            )
        return {rest: self.tensors[name] for rest, name in self.arch.layer_tensors[index].items()}

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def view(self, info: TensorInfo) -> torch.Tensor:
        """A zero-copy tensor over the mapped shard (copy-on-write: never changes the file)."""
        import torch

        dtype = info.dtype.torch
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._map(info.file)
        if info.start % info.dtype.itemsize:
            # Unaligned span (legal in safetensors): torch needs alignment, so copy.
            data = bytearray(mm[info.start : info.end])
            return torch.frombuffer(data, dtype=dtype).reshape(info.shape)
        return torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start).reshape(
            info.shape
        )

    def buffer(self, info: TensorInfo) -> memoryview:
        """A tensor's bytes as a zero-copy memoryview of the mapped shard (no torch)."""
        if info.numel == 0:
            return memoryview(b"")
        return memoryview(self._map(info.file))[info.start : info.end]

    def release(self, info: TensorInfo, begin: int = 0, end: int | None = None) -> None:
        """Drop the mapped pages of a tensor (or of its bytes [begin, end)) from this
        process's memory; the file is untouched and a later read maps them again."""
        mm = self._maps.get(info.file)
        lo, hi = (
            info.start + begin,
            info.start + min(info.nbytes, info.nbytes if end is None else end),
        )
        if mm is None or hi <= lo:
            return
        lo -= lo % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def check_unchanged(self, file: Path | None = None) -> None:
        """Fail if a shard (``file``, or any) changed on disk since its header was validated."""
        for header in self.headers:
            if file is not None and header.path != file:
                continue
            try:
                st = os.stat(header.path)
            except OSError as e:
                raise CheckpointError(
                    f"{header.path}: disappeared while in use ({e.strerror})"
                ) from e
            if st.st_size != header.file_size or st.st_mtime_ns != header.mtime_ns:
                raise CheckpointError(
                    f"{header.path}: changed on disk after it was validated "
                    f"(size {header.file_size} -> {st.st_size}); refusing to read it"
                )

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            self.check_unchanged()
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; a model directory needs one")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        # ValueError: bad UTF-8 or JSON, or an integer past Python's digit limit.
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg}: must hold a JSON object")
    return config


def _read_headers(path: Path) -> list[Header]:
    index = path / INDEX_FILE
    if index.is_file():
        return _read_sharded(path, index)
    single = path / SINGLE_FILE
    if single.is_file():
        return [read_header(single)]
    shards = sorted(path.glob("*.safetensors"))
    if len(shards) == 1:
        return [read_header(shards[0])]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{path}: holds only pickle checkpoints ({', '.join(pickles[:3])}); tailorkit reads "
            "safetensors only, because unpickling a file from a stranger can run code. Convert it "
            "first, e.g. load with torch.load(..., weights_only=True) and save with "
            "safetensors.torch.save_file, on a machine where you trust the file."
        )
    raise CheckpointError(
        f"{path}: no model.safetensors, {INDEX_FILE} or single *.safetensors file"
    )


def _read_sharded(path: Path, index: Path) -> list[Header]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: not a valid index (needs a 'weight_map' object): {e}"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object")
    headers = []
    for file in sorted(set(weight_map.values())):
        if not isinstance(file, str) or Path(file).name != file:
            raise CheckpointError(f"{index}: shard name {file!r} must be a plain file name")
        shard = path / file
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard {file}, which is missing")
        headers.append(read_header(shard))
    in_files: dict[str, str] = {}
    for h in headers:
        for name in h.tensors:
            if name in in_files:
                raise CheckpointError(
                    f"{index}: tensor {name!r} is in both {in_files[name]} and {h.path.name}"
                )
            in_files[name] = h.path.name
    for name, file in weight_map.items():
        if in_files.get(name) != file:
            raise CheckpointError(
                f"{index}: tensor {name!r} is mapped to {file}, but that shard does not hold it"
            )
    extra = sorted(set(in_files) - set(weight_map))
    if extra:
        raise CheckpointError(
            f"{index}: missing index entry for tensor {extra[0]!r} (in {in_files[extra[0]]})"
        )
    return headers
