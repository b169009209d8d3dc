"""Never destroy what the user did not ask to destroy: what ``--overwrite`` may replace, the
folders a build may not write over, one writer per output, SIGTERM, and the umask; against
real folders with real (tiny) models in them."""

from __future__ import annotations

import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import yaml
from test_faults import BUILD_CHILD, _leftovers, _recipe, _run_until_marker, _write_recipe

import tailorkit as tk
from tailorkit.checkpoint import writer
from tailorkit.cli import main as cli


@pytest.fixture
def models(tiny_model_factory, tmp_path):
    """Two models of one's own (copies, since some tests aim at deleting them), a user's
    note beside them, and a recipe in a folder of its own."""
    root = tmp_path / "models"
    root.mkdir()
    base = Path(shutil.copytree(tiny_model_factory("llama"), root / "base"))
    ft = Path(shutil.copytree(tiny_model_factory("llama", variant="a"), root / "ft"))
    (root / "notes.txt").write_text("my notes")
    recipe = tmp_path / "recipes" / "recipe.yaml"
    recipe.parent.mkdir()
    _write_recipe(recipe, _recipe(base, ft))
    return root, base, ft, recipe


def _untouched(root: Path, base: Path) -> None:
    assert (root / "notes.txt").read_text() == "my notes"
    assert tk.Recipe.identity(str(base), 4).plan().num_layers == 4  # still a whole model
    assert not any(p.name.startswith(".") for p in root.iterdir())


@pytest.mark.parametrize("where", ["source", "parent of sources", "inside a source"])
def test_an_output_that_is_contains_or_lies_inside_a_source_is_refused(models, where, capsys):
    root, base, ft, recipe = models
    out = {"source": base, "parent of sources": root, "inside a source": base / "sub"}[where]
    assert cli(["build", str(recipe), str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "which the build reads" in err
    assert str(base.resolve()) in err or str(ft.resolve()) in err
    _untouched(root, base)


def test_the_recipes_own_folder_is_refused(models, tmp_path, capsys):
    root, base, _, recipe = models
    built = tk.build(recipe, tmp_path / "built", progress=False)
    # Rebuilding a checkpoint in place would delete the recipe (and tensors) it reads.
    assert cli(["build", str(built / "recipe.yaml"), str(built), "--overwrite", "-q"]) == 2
    assert "the recipe's own folder" in capsys.readouterr().err
    assert (built / "recipe.yaml").is_file() and (built / "model.safetensors").is_file()
    assert cli(["build", str(recipe), str(recipe.parent), "--overwrite", "-q"]) == 2
    assert recipe.is_file()


def test_overwrite_replaces_only_a_previous_build(models, tmp_path, capsys):
    root, base, _, recipe = models
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert cli(["build", str(recipe), str(mine), "--overwrite", "-q"]) == 2
    assert "tailorkit did not build" in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file")
    assert cli(["build", str(recipe), str(a_file), "--overwrite", "-q"]) == 2
    assert a_file.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine", "models", "recipes"]
    # a previous build is replaced, and nothing is left beside it
    out = tk.build(recipe, tmp_path / "out", progress=False)
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text())  # still tailorkit's
    assert cli(["build", str(recipe), str(out), "--overwrite", "-q"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a build folder whose recipe.yaml is not tailorkit's is not a build
    (out / "recipe.yaml").write_text(yaml.safe_dump({"models": {}, "layers": []}))
    assert cli(["build", str(recipe), str(out), "--overwrite", "-q"]) == 2
    _untouched(root, base)


def test_one_writer_per_output(models, tmp_path, capsys):
    _, _, _, recipe = models
    out = tmp_path / "out"
    with writer.atomic_directory(out) as held:  # another build, still writing
        (held / "partial").write_text("x")
        assert cli(["build", str(recipe), str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"tailorkit process {os.getpid()} is writing it now" in err
        assert not out.exists()
    assert (out / "partial").exists()  # the first writer finished undisturbed
    assert not (tmp_path / ".out.tailorkit-lock").exists()  # and took its lock with it
    assert cli(["build", str(recipe), str(tmp_path / "next"), "-q"]) == 0


def test_sigterm_mid_build_leaves_nothing(models, tmp_path):
    _, _, _, recipe = models
    out = tmp_path / "out"
    marker = tmp_path / "writing"
    child = _run_until_marker(BUILD_CHILD, ["build", str(recipe), str(out), "-q"], marker)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=60) == 143
    assert "terminated; nothing was written" in marker.with_name("writing.stderr").read_text()
    assert not out.exists() and _leftovers(tmp_path, out) == []
    assert not (tmp_path / ".out.tailorkit-lock").exists()


def test_built_folders_follow_the_umask(models, tmp_path):
    _, _, _, recipe = models
    old = os.umask(0o027)
    try:
        out = tk.build(recipe, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
