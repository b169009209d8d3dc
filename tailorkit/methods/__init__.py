"""Pruning methods: each turns a base model and calibration data into a Recipe.

Each method lives in its own module here and registers itself, with its settings,
summary, model-card text and citation, through :func:`registry.register`; the modules
are found and imported below. Adding a method touches one module.
"""

from __future__ import annotations

import importlib
import pkgutil

from tailorkit.errors import MethodError
from tailorkit.methods.registry import METHODS, Context, MethodSpec  # noqa: F401 (the API)

SHARED = ("common", "registry")  # modules that are not methods

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
