"""Fitted tensors: the numbers a recipe needs that no source model holds.

A bridge (a hidden x hidden map that stands in for removed layers) is fitted on
calibration data. Such tensors live in one safetensors file beside the recipe, which
names it with its sha256. They are written in a fixed layout (names sorted, dtypes as
given), so the same tensors give the same bytes and the same digest, and read back by
checking the digest first, then the header with the strict parser, from the one copy of
the bytes that was checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tailorkit.checkpoint.safetensors_format import read_header
from tailorkit.checkpoint.writer import ShardWriter, TensorSpec
from tailorkit.errors import RecipeError

METADATA = {"format": "pt", "content": "tailorkit fitted tensors"}


def write(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` to ``path``; return the file's sha256 (hex)."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())]
    writer = ShardWriter(path, specs, metadata=METADATA)
    try:
        for spec in specs:
            writer.write(spec.name, tensors[spec.name].detach().cpu())
    finally:
        writer.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(path: Path, sha256: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` once its digest is ``sha256``; errors name ``where``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{where}: cannot read {path} ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise RecipeError(
            f"{where}: {path} has sha256 {digest}, but the recipe says {sha256}: the file "
            "changed since the recipe was written, or belongs to another recipe"
        )
    header = read_header(path, data)
    return {
        name: torch.frombuffer(
            bytearray(data[info.start : info.end]), dtype=info.dtype.torch
        ).reshape(info.shape)
        for name, info in header.tensors.items()
    }


def digest(tensors: dict[str, torch.Tensor], scratch: Path) -> str:
    """The sha256 ``write`` gives for ``tensors`` (written to ``scratch``, then removed)."""
    try:
        return write(tensors, scratch)
    finally:
        scratch.unlink(missing_ok=True)
