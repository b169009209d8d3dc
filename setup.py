"""Builds tailorkit's optional C++ extension, ``tailorkit._C``.

Package metadata lives in pyproject.toml; this file only decides whether and how
to compile ``csrc/``. tailorkit runs without the extension (tailorkit.ops falls
back to its PyTorch reference kernels), so every reason not to build it -- torch
not importable, no C++ compiler, a failed compile -- is reported in one line and
the install carries on.

The extension must be compiled against the very torch it will run with (the C++
ABI differs between torch releases). build_backend.py arranges that for isolated
builds; with ``pip install --no-build-isolation`` the environment's torch is used
directly.
"""

import os
import shutil
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/merge_cpu.cpp"]
CXX_FLAGS = [
    "-O3",
    "-g0",  # no debug info: a 10x smaller .so and a faster build
    "-ffp-contract=off",  # no FMA contraction: results match the reference bit for bit
    # Float compares may not trap, so GCC can turn the TIES selects into vector
    # blends; it changes no value (unlike -ffast-math's other parts).
    "-fno-trapping-math",
    "-fopenmp",
]
LINK_FLAGS = ["-fopenmp"]


# Commands that only gather metadata or sources: a build backend runs these first (before
# the build requirements, torch among them, are installed), so saying "skipped" then is noise.
_METADATA_COMMANDS = {"egg_info", "dist_info", "sdist"}
_BUILDING = not _METADATA_COMMANDS.intersection(sys.argv[1:])


def _note(message: str) -> None:
    if _BUILDING:
        print(f"tailorkit setup: {message}", file=sys.stderr, flush=True)


def _cxx_compiler() -> str | None:
    """Path of the C++ compiler torch's build helpers will call, or None."""
    candidates = [os.environ["CXX"].split()[0]] if os.environ.get("CXX") else ["c++", "g++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _extension_build():
    """Return ``(ext_modules, cmdclass)`` for setup(): empty when the build is skipped."""
    fallback = "tailorkit will use its PyTorch reference kernels"
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # noqa: BLE001 -- any reason means "no extension"
        _note(
            f"skipping the C++ extension tailorkit._C: torch is not importable "
            f"({type(exc).__name__}: {exc}); {fallback}"
        )
        return [], {}
    if _cxx_compiler() is None:
        _note(
            "skipping the C++ extension tailorkit._C: no C++ compiler found (install g++ or "
            f"clang++, or set CXX); {fallback}"
        )
        return [], {}

    class BuildExtensionOrSkip(BuildExtension):
        """torch's BuildExtension, except that a failed compile does not fail the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 -- the package works without it
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                _note(
                    f"the C++ extension tailorkit._C failed to build "
                    f"({type(exc).__name__}: {first_line}); installing without it, {fallback}"
                )

    extensions = [
        CppExtension(
            name="tailorkit._C",
            sources=CPU_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]
    # CUDA kernels (a later change) belong here: when torch.version.cuda is set and
    # torch.utils.cpp_extension.CUDA_HOME exists, build CPU_SOURCES plus csrc/*.cu as
    # a CUDAExtension instead; otherwise say in one line that the CUDA kernels were skipped.
    return extensions, {"build_ext": BuildExtensionOrSkip}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
