"""PEP 517 build backend: setuptools, plus the exact torch the target environment has.

Why: ``tailorkit._C`` must be compiled against the same torch it will be
imported with, because torch's C++ ABI changes between releases (and between
its CPU and CUDA builds). pip builds in an isolated environment that cannot see
the target's packages, and listing a bare ``torch`` in ``[build-system]
requires`` would install whatever torch the index offers first -- on Linux a
multi-GB CUDA build of possibly another version.

How: the requirement hooks ask the *target* interpreter (``sys.executable``,
started with ``-I`` and without ``PYTHONPATH``, so pip's build-environment path
tweaks do not hide the target's site-packages) which torch it has, and, if it
has one, add ``torch==<that exact version>`` (e.g. ``torch==2.13.0+cpu``) to the
build requirements. If it has none, nothing is added and setup.py builds
tailorkit without the extension, saying so.

If that torch cannot be found on your indexes (for example a CPU build from
download.pytorch.org), give pip the same index, ``--extra-index-url ...``, or
build against the installed torch directly: ``pip install --no-build-isolation .``.
Every other hook is setuptools' own.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 -- re-export every other PEP 517 hook

_PROBE = (
    "import importlib.metadata as m\n"
    "try:\n"
    "    print(m.version('torch'))\n"
    "except m.PackageNotFoundError:\n"
    "    pass\n"
)


def _note(message: str) -> None:
    print(f"tailorkit build backend: {message}", file=sys.stderr, flush=True)


def _target_torch_version() -> str | None:
    """The torch version installed for ``sys.executable`` outside pip's build env, or None."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-c", _PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _note(f"could not ask {sys.executable} for its torch version ({exc}); not adding torch")
        return None
    version = probe.stdout.strip()
    if probe.returncode != 0 or not version:
        return None
    return version


def _torch_requirement() -> list[str]:
    version = _target_torch_version()
    if version is None:
        _note(
            f"no torch installed for {sys.executable}: building without the C++ extension "
            "(install torch first, then tailorkit, to get it)"
        )
        return []
    _note(f"compiling the C++ extension against torch=={version}, the target's torch")
    return [f"torch=={version}"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_requirement()
