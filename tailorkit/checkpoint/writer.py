"""The streaming safetensors writer.

Every output tensor's name, shape and dtype is known before writing starts, so
each shard's header is written first and the data then streamed to its final
offset with positional writes: memory stays near one chunk whatever the
model's size, and an unchanged tensor is copied file-to-file by the kernel
(``copy_file_range``) without passing through Python at all.

Output directories are written under a temporary name beside the target and
renamed into place at the end, so a failed or interrupted write leaves nothing
at the target path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tailorkit.checkpoint.safetensors_format import DType, dtype_name, itemsize
from tailorkit.errors import CheckpointError, TailorkitError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TMP_MARK = ".tailorkit-tmp-"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, what: str = "shard size") -> int:
    """'5GB' -> 5_000_000_000 (decimal, as transformers counts), '1GiB' -> 2**30."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m or (m[2] or "").upper() not in _UNITS:
        raise TailorkitError(
            f"{what} {text!r}: expected a number with a unit, e.g. 5GB, 500MB, 1GiB"
        )
    size = int(float(m[1]) * _UNITS[(m[2] or "").upper()])
    if size <= 0:
        raise TailorkitError(f"{what} {text!r} must be positive")
    return size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType | torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def split_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor: its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """One safetensors file whose layout is fixed up front; tensors are filled in any order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self.offsets: dict[str, tuple[int, int]] = {}
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        pos = 0
        for spec in specs:
            if spec.name in self.offsets:
                raise CheckpointError(f"{path.name}: tensor {spec.name!r} would be written twice")
            header[spec.name] = {
                "dtype": dtype_name(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [pos, pos + spec.nbytes],
            }
            self.offsets[spec.name] = (pos, pos + spec.nbytes)
            pos += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _reserve(self.fd, self.size, path)
            _pwrite_all(self.fd, len(raw).to_bytes(8, "little") + raw, 0, path)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, name: str, data: torch.Tensor | memoryview, at: int = 0) -> int:
        """Write a tensor, or its next flat chunk, or their bytes, at byte ``at`` of
        ``name``; returns the number of bytes written."""
        start, end = self.offsets[name]
        buf = data if isinstance(data, memoryview) else _tensor_bytes(data)
        if start + at + buf.nbytes > end:
            raise CheckpointError(
                f"{self.path.name}: data for {name!r} overruns its {end - start} bytes"
            )
        _pwrite_all(self.fd, buf, self.data_start + start + at, self.path)
        return buf.nbytes

    def copy(self, name: str, src_file: Path, src_offset: int) -> None:
        """Copy ``name``'s bytes unchanged from another file, kernel to kernel."""
        start, end = self.offsets[name]
        with open(src_file, "rb") as src:
            _copy_range(
                src.fileno(), src_offset, self.fd, self.data_start + start, end - start, self.path
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _reserve(fd: int, size: int, path: Path) -> None:
    """Claim the disk space up front, so a full disk fails now with a clear error."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: no space left on device for {size:,} bytes") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise CheckpointError(f"{path}: cannot allocate {size:,} bytes ({e.strerror})") from e
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.pwrite(fd, view[: 1 << 30], offset)
        except OSError as e:
            raise CheckpointError(f"{path}: write failed ({e.strerror})") from e
        view = view[n:]
        offset += n


def _copy_range(
    src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int, path: Path
) -> None:
    while count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                return _copy_range_read(src_fd, src_off, dst_fd, dst_off, count, path)
            raise CheckpointError(f"{path}: copy failed ({e.strerror})") from e
        if n == 0:
            raise CheckpointError(f"{path}: source file ended {count} bytes early while copying")
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def _copy_range_read(
    src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int, path: Path
) -> None:
    while count:
        chunk = os.pread(src_fd, min(count, 64 << 20), src_off)
        if not chunk:
            raise CheckpointError(f"{path}: source file ended {count} bytes early while copying")
        _pwrite_all(dst_fd, chunk, dst_off, path)
        src_off, dst_off, count = src_off + len(chunk), dst_off + len(chunk), count - len(chunk)


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds.

    One writer per target: an advisory lock beside it makes a second writer fail, naming
    the first. ``overwrite`` replaces only what a tailorkit build wrote (see
    :func:`is_tailorkit_output`); a user's folder or file is never deleted. The result
    follows the umask (a temporary directory is created private).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(target):
        if target.exists() or target.is_symlink():
            may_replace(target, overwrite)
        for stale in clean_stale(target):
            log.warning("removed %s, left by a build of %s that was killed", stale, target)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent)
        )
        try:
            os.chmod(tmp, 0o777 & ~umask())
            yield tmp
            if target.exists():
                trash = tmp.with_name(tmp.name + "-old")
                os.rename(target, trash)
                os.rename(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def is_tailorkit_output(folder: Path) -> bool:
    """Whether ``folder`` is what a tailorkit build wrote (its recipe.yaml, with the header
    line tailorkit writes, and config.json; or heal.json beside config.json), or a search
    log that a prune writes first."""
    if is_heal_output(folder):
        return True
    recipe = folder / "recipe.yaml"
    if recipe.is_file() and (folder / "config.json").is_file():
        with open(recipe, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        return first.startswith("# tailorkit ") and first.rstrip().endswith(" recipe")
    entries = list(folder.iterdir())
    return [p.name for p in entries] == ["search"] and (
        folder / "search" / "search.jsonl"
    ).is_file()


HEAL_FILE = "heal.json"  # what `tailorkit heal` writes beside the weights
HEAL_FORMAT = "tailorkit heal"  # its "format" field


def is_heal_output(folder: Path) -> bool:
    """Whether ``folder`` is what ``tailorkit heal`` wrote: config.json and its heal.json."""
    if not (folder / "config.json").is_file():
        return False
    try:
        with open(folder / HEAL_FILE, encoding="utf-8") as f:
            return json.load(f).get("format") == HEAL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def may_replace(target: Path, overwrite: bool) -> None:
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise TailorkitError(
            f"{target}: already exists and is not empty (pass overwrite=True / --overwrite "
            "to replace a previous tailorkit build)"
        )
    if target.is_symlink() or not target.is_dir() or not is_tailorkit_output(target):
        what = "a symlink" if target.is_symlink() else "a folder" if target.is_dir() else "a file"
        raise TailorkitError(
            f"{target}: is {what} tailorkit did not build (no recipe.yaml written by tailorkit "
            "beside a config.json); --overwrite replaces only a previous tailorkit build, so "
            "nothing was touched. Choose another output path, or move it away yourself"
        )


@contextmanager
def _writer_lock(target: Path) -> Iterator[None]:
    """Hold the advisory lock of ``target`` (a file beside it) while writing it."""
    lock = target.parent / f".{target.name}.tailorkit-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TailorkitError(
                f"{target}: {holder} is writing it now (lock {lock.name}); wait for it to "
                "finish, or write elsewhere"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False  # the last holder removed it as we opened it: take a fresh one
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"tailorkit process {os.getpid()}".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale(target: Path) -> list[Path]:
    """Remove temporary directories left for ``target`` by writers that died (kill -9, reboot)."""
    removed = []
    for p in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        pid = p.name.removeprefix(f".{target.name}{TMP_MARK}").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
