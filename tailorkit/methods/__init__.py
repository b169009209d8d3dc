"""Pruning methods: each turns a base model and calibration data into a Recipe.

A method is a function registered under a name with :func:`register`. It gets a
:class:`Context` (the base model opened layer by layer, its activations on the
calibration windows, the removal budget) and its own keyword settings, and
returns a :class:`MethodResult`. Adding a method touches one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tailorkit.activations import Activations
from tailorkit.checkpoint.source import Source
from tailorkit.errors import MethodError
from tailorkit.forward import DecoderStack
from tailorkit.recipe import Recipe


@dataclass
class Context:
    """What every method may use; built once by :func:`tailorkit.prune`."""

    base: str  # the base model reference, as the recipe will name it
    source: Source
    stack: DecoderStack
    activations: Activations
    work_dir: Path  # where a method may write figures
    windows: torch.Tensor  # (N, T) calibration token ids
    candidates: list[str] = field(default_factory=list)  # fine-tunes of the base (gptailor)
    batch_size: int = 8
    progress: bool = True


@dataclass
class MethodResult:
    recipe: Recipe
    report: dict[str, Any] = field(default_factory=dict)  # figures as plain JSON data
    images: dict[str, Path] = field(default_factory=dict)  # caption -> PNG
    files: dict[str, Path] = field(default_factory=dict)  # name -> file or folder to ship


Method = Callable[..., MethodResult]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> Method:
    # Importing the modules registers their methods.
    from tailorkit.methods import baselines, gptailor, slm  # noqa: F401

    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
