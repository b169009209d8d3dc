"""The build's start: nothing before its first tensor byte needs torch.

torch takes a second or more to import; ``tailorkit build`` copies unchanged tensors on a
thread from the start and imports torch meanwhile, which only works while the recipe,
the headers, the plan and the writer stay free of it. These tests run fresh interpreters,
since this one has torch loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import tailorkit as tk
from tailorkit import combine
from tailorkit.checkpoint import writer
from tailorkit.errors import CheckpointError

FRESH_TIMEOUT_S = 120


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=FRESH_TIMEOUT_S,
    )


def _recipe_file(family, folder: Path) -> Path:
    recipe = {
        "models": {"base": str(family.base), "ft": str(family.candidates[0])},
        "layers": [
            {"from": "base", "layers": [0, 2]},
            {
                "merge": "linear",
                "sources": [{"from": "base", "layer": 2}, {"from": "ft", "layer": 2}],
            },
            {"from": "ft", "layer": 3},
        ],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_plan_and_validate_do_not_import_torch(family, tmp_path):
    recipe = _recipe_file(family, tmp_path)
    done = _fresh(
        """
        import json, sys
        import tailorkit as tk
        from tailorkit.cli import main

        plan = tk.Recipe.load(sys.argv[1]).plan()
        code = main(["validate", sys.argv[1], "--json"])
        print(json.dumps({"torch": "torch" in sys.modules, "code": code,
                          "jobs": len(plan.jobs), "dtype": str(plan.dtype)}))
        """,
        str(recipe),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["code"] == 0
    assert report["jobs"] == len(tk.Recipe.load(recipe).plan().jobs)


def test_a_build_without_merges_never_imports_torch(family, tmp_path):
    """With torch made unimportable, a removal-only build still writes the checkpoint and
    its model card: recipe, headers, plan, writer, copies and card need no torch, so such a
    build never pays for its import. Its files equal a build in this process."""
    recipe = tmp_path / "removal.yaml"
    layers = [{"from": "base", "layers": [0, 2]}, {"from": "base", "layer": 3}]
    recipe.write_text(yaml.safe_dump({"models": {"base": str(family.base)}, "layers": layers}))
    done = _fresh(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now raises
        import tailorkit as tk

        tk.build(sys.argv[1], sys.argv[2], progress=False)
        print(sorted(m for m in sys.modules if m.startswith(("torch", "transformers"))))
        """,
        str(recipe),
        str(tmp_path / "fresh"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "['torch']"  # only the blocking entry
    tk.build(recipe, tmp_path / "here", progress=False)
    assert "@article{su2025gptailor" in (tmp_path / "fresh" / "README.md").read_text()
    for path in sorted((tmp_path / "here").iterdir()):
        assert path.read_bytes() == (tmp_path / "fresh" / path.name).read_bytes(), path.name


@pytest.mark.skipif(combine._kernels is None, reason="tailorkit._kernels is not built")
def test_a_build_of_linear_merges_never_imports_torch(family, tmp_path, monkeypatch):
    """Fixed linear combinations are computed by tailorkit._kernels on the mapped bytes:
    with torch made unimportable, a build that merges writes what the torch path writes
    (here, in this process, with the torch-free path switched off)."""
    recipe = _recipe_file(family, tmp_path)
    done = _fresh(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now raises
        import tailorkit as tk

        tk.build(sys.argv[1], sys.argv[2], progress=False, dtype="float16")
        """,
        str(recipe),
        str(tmp_path / "fresh"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setattr(combine, "_kernels", None)
    tk.build(recipe, tmp_path / "here", progress=False, dtype="float16")
    for path in sorted((tmp_path / "here").iterdir()):
        assert path.read_bytes() == (tmp_path / "fresh" / path.name).read_bytes(), path.name


def test_functions_are_not_hidden_by_modules():
    """``tk.build`` stays the function whichever modules were imported (the functions live
    in modules of other names), and the lazy names are listed and typed."""
    import tailorkit.analysis
    import tailorkit.assembly
    import tailorkit.builder
    import tailorkit.healing
    import tailorkit.pruning  # noqa: F401

    for name in ("build", "prune", "heal", "analyze", "assemble", "bridge", "evaluate"):
        assert callable(getattr(tk, name)) and not isinstance(getattr(tk, name), type(sys)), name
    assert tk.build is tailorkit.builder.build
    assert set(tk.__all__) <= set(dir(tk))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        tk.no_such_name  # noqa: B018


@pytest.mark.parametrize("fails", ["copy", "merge"])
def test_an_error_on_either_thread_stops_the_build(family, tmp_path, monkeypatch, fails):
    """The copies run beside the merges: a failure of either is raised, after both have
    stopped, and leaves nothing behind."""
    recipe = _recipe_file(family, tmp_path)
    method = "copy" if fails == "copy" else "write"

    def broken(self, name, *args, **kwargs):
        raise CheckpointError(f"{self.path}: {fails} failed (test)")

    monkeypatch.setattr(writer.ShardWriter, method, broken)
    with pytest.raises(CheckpointError, match=f"{fails} failed"):
        tk.build(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if writer.TMP_MARK in p.name]
