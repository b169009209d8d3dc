"""Fault injection: what a kill, a full disk or a file changed underfoot leaves behind.

- A build killed with SIGKILL half-way (a real ``tailorkit build`` in a child process,
  held at a known point by a small wrapper, then killed): nothing at the output path;
  the next build to the same path removes the dead build's temporary directory, says
  so, and writes the same bytes as an uninterrupted build.
- A full disk (ENOSPC injected where each byte is written: the space reservation, a
  positional write, a kernel copy, a side file): a ``TailorkitError`` naming the file,
  the CLI's one-line message and exit status 2, nothing at the output path and no
  temporary directory left.
- A search killed with SIGKILL in the middle of a generation (``tailorkit prune
  --method gptailor`` in a child process): ``--resume`` reaches the recipe and the
  log of an uninterrupted run with the same seed.
- A shard changed (size, mtime, or content) after ``recipe.plan()`` validated it, or
  while the build reads it: refused with a ``CheckpointError``, not read as garbage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import tailorkit as tk
from tailorkit.checkpoint import writer
from tailorkit.cli import main as cli
from tailorkit.errors import CheckpointError

CHILD_TIMEOUT_S = 240  # generous: the child imports torch on a shared, busy machine


def _recipe(base: Path, ft: Path) -> dict:
    """Passthrough layers (kernel copies) and a merged one (chunked writes)."""
    return {
        "models": {"base": str(base), "ft": str(ft)},
        "layers": [
            {"from": "base", "layers": [0, 2]},
            {
                "merge": "linear",
                "sources": [{"from": "base", "layer": 2}, {"from": "ft", "layer": 2}],
            },
            {"from": "ft", "layer": 3},
        ],
    }


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _leftovers(folder: Path, out: Path) -> list[str]:
    """Temporary directories of ``out`` in ``folder``."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}{writer.TMP_MARK}")
    )


def _run_until_marker(script: str, args: list[str], marker: Path) -> subprocess.Popen:
    """Start ``script`` in a child and wait until it writes ``marker`` (it then sleeps)."""
    err = marker.with_name(marker.name + ".stderr")
    with open(err, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(marker), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"the child ended early ({child.returncode}): {err.read_text()}")
        if time.monotonic() > deadline:
            _kill(child)
            raise AssertionError("the child never reached the point where it is killed")
        time.sleep(0.05)
    return child


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL


# ----------------------------------------------------------------------------- killed build

# Runs the real CLI; after the fifth tensor is written the build announces itself and
# waits to be killed, so the kill lands mid-build every time.
BUILD_CHILD = textwrap.dedent(
    """
    import importlib, sys, time
    from pathlib import Path
    from tailorkit.cli import main

    build = importlib.import_module("tailorkit.builder")  # the module, not the function

    marker = Path(sys.argv[1])
    real, written = build._write_tensor, []

    def write_then_stall(writer, job, *args, **kwargs):
        real(writer, job, *args, **kwargs)
        written.append(job.name)
        if len(written) == 5:
            marker.write_text(str(writer.path))
            time.sleep(600)

    build._write_tensor = write_then_stall
    sys.exit(main(sys.argv[2:]))
    """
)


def test_build_killed_midway_leaves_nothing_and_the_next_build_cleans_up(family, tmp_path, caplog):
    recipe = _write_recipe(tmp_path / "recipe.yaml", _recipe(family.base, family.candidates[0]))
    out = tmp_path / "models" / "out"
    marker = tmp_path / "writing"
    child = _run_until_marker(BUILD_CHILD, ["build", str(recipe), str(out), "-q"], marker)
    partial = Path(marker.read_text())  # the shard being written, inside the temporary dir
    assert partial.is_file() and partial.parent.parent == out.parent
    _kill(child)

    assert not out.exists()
    stale = _leftovers(out.parent, out)
    assert stale == [partial.parent.name] and f"-{child.pid}-" in stale[0]

    with caplog.at_level(logging.WARNING, logger="tailorkit.checkpoint.writer"):
        assert cli(["build", str(recipe), str(out), "-q"]) == 0
    assert _leftovers(out.parent, out) == []
    assert any(stale[0] in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)

    reference = tk.build(tk.Recipe.load(recipe), tmp_path / "reference", progress=False)
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_live_builds_temporary_directory_is_left_alone(family, tmp_path):
    """Only dead writers' directories are removed: a concurrent build keeps its own."""
    recipe = tk.Recipe.from_dict(_recipe(family.base, family.candidates[0]))
    live = tmp_path / f".out{writer.TMP_MARK}{os.getpid()}-running"
    live.mkdir()
    tk.build(recipe, tmp_path / "out", progress=False)
    assert live.is_dir()


# ----------------------------------------------------------------------------- full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _after(n: int, real):
    """``real``, except that every call after the first ``n`` fails with ENOSPC."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            _enospc()
        return real(*args, **kwargs)

    return wrapped


def _no_fallocate(*args):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def _reserve_fails(mp):
    mp.setattr(os, "posix_fallocate", _enospc)


def _write_fails(mp):  # a filesystem without fallocate, whose writes then fail
    mp.setattr(os, "posix_fallocate", _no_fallocate)
    mp.setattr(os, "pwrite", _after(1, os.pwrite))


def _copy_fails(mp):
    mp.setattr(os, "copy_file_range", _enospc)


def _side_file_fails(mp):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        return _enospc() if self.name == "config.json" else real(self, *args, **kwargs)

    mp.setattr(Path, "write_text", write_text)


FULL_DISK = {
    # the reservation of a shard's space: the common case, before any data is written
    "reserve": (
        _reserve_fails,
        r"model-00001-of-\d+\.safetensors: no space left on device for [\d,]+ bytes",
    ),
    "write": (
        _write_fails,
        r"model-\d{5}-of-\d{5}\.safetensors: write failed \(No space left on device\)",
    ),
    "copy": (_copy_fails, r"\.safetensors: copy failed \(No space left on device\)"),
    "side-file": (_side_file_fails, r"config\.json: write failed \(No space left on device\)"),
}


@pytest.mark.parametrize("where", list(FULL_DISK))
def test_full_disk_is_a_clear_error_and_leaves_nothing(
    family, tmp_path, monkeypatch, capsys, where
):
    patch, message = FULL_DISK[where]
    recipe = _write_recipe(tmp_path / "recipe.yaml", _recipe(family.base, family.candidates[0]))
    out = tmp_path / "out"
    patch(monkeypatch)
    with pytest.raises(CheckpointError, match=message) as e:
        tk.build(tk.Recipe.load(recipe), out, shard_size="100KB", progress=False)
    assert str(out.parent) in str(e.value)  # the full path of the file, not a bare errno
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]

    # The same through the command line: one line on stderr, exit status 2, no traceback.
    assert cli(["build", str(recipe), str(out), "--shard-size", "100KB", "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and pytest.importorskip("re").search(message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ----------------------------------------------------------------------------- killed search

# Runs the real CLI; in generation KILL_AT, after its first candidate is scored, the search
# announces itself and waits to be killed: generations before it are logged, it is not.
SEARCH_CHILD = textwrap.dedent(
    """
    import importlib, sys, time
    from pathlib import Path
    from tailorkit.cli import main

    driver = importlib.import_module("tailorkit.search.driver")

    marker, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    real = driver._evaluate_generation

    def stall_mid_generation(gen, recipes, prints, executor, small, *rest):
        if gen == kill_at:
            executor.map(recipes[:1], small)
            marker.write_text(str(gen))
            time.sleep(600)
        return real(gen, recipes, prints, executor, small, *rest)

    driver._evaluate_generation = stall_mid_generation
    sys.exit(main(sys.argv[3:]))
    """
)


def test_search_killed_mid_generation_resumes_to_the_same_result(family, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    args = ["prune", "--method", "gptailor", "--base", str(family.base)]
    args += [f"--candidate={c}" for c in family.candidates]
    args += ["--target-ratio", "0.22", "--calibration", str(text), "--seed", "0"]
    args += ["--seq-len", "16", "--num-windows", "8", "--batch-size", "4", "-q"]
    args += ["--set", "budget=12", "--set", "popsize=6", "--set", "fidelity_windows=4"]

    straight = tmp_path / "straight"
    assert cli([*args, "--out", str(straight)]) == 0

    killed = tmp_path / "killed"
    marker = tmp_path / "mid-generation"
    child = _run_until_marker(SEARCH_CHILD, ["1", *args, "--out", str(killed)], marker)
    _kill(child)
    # Generation 0 is logged; generation 1 was under way; no checkpoint was written.
    assert sorted(p.name for p in killed.iterdir()) == ["search"]
    log = (killed / "search" / "search.jsonl").read_text().splitlines()
    assert [json.loads(line)["generation"] for line in log] == [0]

    assert cli([*args, "--out", str(killed), "--resume"]) == 0
    assert tk.Recipe.load(killed / "recipe.yaml") == tk.Recipe.load(straight / "recipe.yaml")
    resumed = [
        json.loads(line) for line in (killed / "search" / "search.jsonl").read_text().splitlines()
    ]
    uninterrupted = [
        json.loads(line) for line in (straight / "search" / "search.jsonl").read_text().splitlines()
    ]
    assert (
        resumed == uninterrupted
    )  # every candidate and every fitness value, generation by generation
    assert _leftovers(tmp_path, killed) == []


# ----------------------------------------------------------------------------- changed shards


@pytest.fixture
def own_copy(family, tmp_path):
    """A private copy of the base and one fine-tune (the session's models are shared)."""
    base = shutil.copytree(family.base, tmp_path / "base")
    ft = shutil.copytree(family.candidates[0], tmp_path / "ft")
    return Path(base), Path(ft)


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


def _touch(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _rewrite_same_size(path: Path) -> None:
    """New bytes at the end, written in place: the file never shrinks, so a merge reading it
    through the memory map at that moment (the copy thread makes this change while the main
    thread merges) reads changed bytes rather than dying of SIGBUS, as it would mid-truncation."""
    with open(path, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 16)  # the last tensor's bytes: NaN-ish garbage of the same size
    _touch(path)  # a rewrite moves mtime; make sure it does on a coarse-clock filesystem too


@pytest.mark.parametrize(
    "change", [_grow, _touch, _rewrite_same_size], ids=["size", "mtime", "content"]
)
def test_shard_changed_after_validation_is_refused(own_copy, tmp_path, change):
    base, ft = own_copy
    plan = tk.Recipe.from_dict(_recipe(base, ft)).plan()
    change(ft / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"ft/model\.safetensors: changed on disk after it was validated"
    ):
        tk.build(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, tmp_path / "out") == []
    with pytest.raises(CheckpointError, match="changed on disk"):
        tk.assemble(plan)


def test_shard_changed_while_the_build_reads_it_is_refused(own_copy, tmp_path, monkeypatch):
    """A change between the first and the last byte read: caught before a merge maps the
    changed file, or by the check at the end."""
    base, ft = own_copy
    plan = tk.Recipe.from_dict(_recipe(base, ft)).plan()
    real = writer.ShardWriter.copy
    calls = []

    def copy_then_change(self, name, src_file, src_offset):
        real(self, name, src_file, src_offset)
        if not calls:
            _rewrite_same_size(ft / "model.safetensors")
            _touch(ft / "model.safetensors")
        calls.append(name)

    monkeypatch.setattr(writer.ShardWriter, "copy", copy_then_change)
    with pytest.raises(CheckpointError, match="changed on disk"):
        tk.build(plan, tmp_path / "out", progress=False)
    assert calls  # the file changed after the build had started copying
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, tmp_path / "out") == []


# Runs the real CLI with small merge chunks; after the first chunk of merged data is written,
# the fine-tune's shard is cut in half, as another process truncating it would.
TRUNCATE_CHILD = textwrap.dedent(
    """
    import importlib, os, sys
    from pathlib import Path
    from tailorkit.cli import main

    merge = importlib.import_module("tailorkit.merge")
    writer = importlib.import_module("tailorkit.checkpoint.writer")
    victim = Path(sys.argv[1])
    real_chunks, real_write, done = merge.merge_chunks, writer.ShardWriter.write, []

    def small_chunks(*args, **kwargs):
        return real_chunks(*args, **{**kwargs, "chunk_elements": 512})

    def write_then_truncate(self, name, data, at=0):
        n = real_write(self, name, data, at)
        if not done:
            done.append(name)
            os.truncate(victim, victim.stat().st_size // 2)
        return n

    merge.merge_chunks = small_chunks
    writer.ShardWriter.write = write_then_truncate
    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_shard_truncated_mid_merge_is_an_error_not_a_crash(own_copy, tmp_path):
    """Reading a mapped file past the end another process cut off kills the reader with
    SIGBUS; the build checks the sizes of a merge's shards before each chunk instead."""
    base, ft = own_copy
    recipe = _write_recipe(tmp_path / "recipe.yaml", _recipe(base, ft))
    out = tmp_path / "out"
    args = [str(ft / "model.safetensors"), "build", str(recipe), str(out), "-q"]
    done = subprocess.run(
        [sys.executable, "-c", TRUNCATE_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr[-2000:]  # not -SIGBUS
    assert "changed on disk" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and _leftovers(tmp_path, out) == []
