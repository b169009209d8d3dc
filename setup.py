"""Builds tailorkit's optional C++ extensions, ``tailorkit._C`` and ``tailorkit._kernels``.

Package metadata lives in pyproject.toml; this file only decides whether and how
to compile ``csrc/``. ``_C`` holds the torch ops (CPU, and CUDA where it can be
built); ``_kernels`` is the same merge arithmetic for plain buffers, without
torch, which lets a build merge before torch is imported. tailorkit runs without
either (tailorkit.ops falls back to its PyTorch reference kernels, the build to
the torch ops), so every reason not to build them -- torch not importable, no C++
compiler, a failed compile -- is reported in one line and the install carries on.

The extension must be compiled against the very torch it will run with (the C++
ABI differs between torch releases). build_backend.py arranges that for isolated
builds; with ``pip install --no-build-isolation`` the environment's torch is used
directly.
"""

import os
import shutil
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/merge_cpu.cpp", "csrc/cka_cpu.cpp"]
KERNELS_SOURCES = ["csrc/merge_buffers.cpp"]
CUDA_SOURCES = ["csrc/merge_cuda.cu", "csrc/cka_cuda.cu"]
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
# _kernels splits its work with std::thread, not OpenMP: it may run in a process that
# later loads torch's own OpenMP runtime, and two runtimes in one process fight.
KERNELS_FLAGS = ["-std=c++17", "-pthread", *(f for f in CXX_FLAGS if f != "-fopenmp")]
NVCC_FLAGS = [
    "-O3",
    # No FMA contraction (the kernels also spell out __fmul_rn/__fadd_rn): results
    # match the CPU kernels and the PyTorch references bit for bit.
    "--fmad=false",
]
# GPU targets when TORCH_CUDA_ARCH_LIST is not set (when it is, torch's build helper
# uses it instead, e.g. TORCH_CUDA_ARCH_LIST="9.0" for a quicker Hopper-only build):
# machine code for Ampere (sm_80) and Hopper (sm_90), and sm_90 PTX that the
# driver compiles for newer GPUs.
DEFAULT_CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


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


def _cuda_build_problem() -> str | None:
    """Why the CUDA kernels cannot be built here, in words, or None if they can."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # noqa: BLE001
        return f"torch's CUDA build helpers are not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TAILORKIT_NO_CUDA", "") not in ("", "0"):
        return f"TAILORKIT_NO_CUDA={os.environ['TAILORKIT_NO_CUDA']} is set"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return (
            f"no CUDA toolkit found for torch {torch.__version__} (CUDA {torch.version.cuda}): "
            "install nvcc, or set CUDA_HOME to the toolkit's directory"
        )
    return None


def _kernels_extension():
    from setuptools import Extension

    return Extension(
        name="tailorkit._kernels",
        sources=KERNELS_SOURCES,
        depends=["csrc/merge_kernels.h"],
        extra_compile_args=KERNELS_FLAGS,
        extra_link_args=["-pthread"],
        language="c++",
    )


def _extension_build():
    """Return ``(ext_modules, cmdclass)`` for setup(): empty when the build is skipped."""
    if _cxx_compiler() is None:
        _note(
            "skipping the C++ extensions: no C++ compiler found (install g++ or clang++, or "
            "set CXX); tailorkit will use its PyTorch reference kernels"
        )
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 -- any reason means "no torch extension"
        from setuptools.command.build_ext import build_ext

        _note(
            f"skipping the C++ extension tailorkit._C: torch is not importable "
            f"({type(exc).__name__}: {exc}); building tailorkit._kernels alone"
        )
        return [_kernels_extension()], {"build_ext": _skipping_failures(build_ext, None)}

    def cpu_extension():
        return CppExtension(
            name="tailorkit._C",
            sources=CPU_SOURCES,
            depends=["csrc/merge_kernels.h", "csrc/tailorkit.h"],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )

    def cuda_extension():
        arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCH_FLAGS
        return CUDAExtension(
            name="tailorkit._C",
            sources=CPU_SOURCES + CUDA_SOURCES,
            depends=["csrc/merge_kernels.h", "csrc/tailorkit.h"],
            extra_compile_args={
                "cxx": CXX_FLAGS + ["-DTAILORKIT_WITH_CUDA"],
                "nvcc": NVCC_FLAGS + arch_flags + ["-DTAILORKIT_WITH_CUDA"],
            },
            extra_link_args=LINK_FLAGS,
        )

    problem = _cuda_build_problem()
    extensions = None
    if problem is None:
        try:
            extensions = [cuda_extension()]
            _note("building tailorkit._C with its CUDA kernels (" + ", ".join(CUDA_SOURCES) + ")")
        except Exception as exc:  # noqa: BLE001 -- torch's helper refused: build without CUDA
            problem = f"torch could not set up a CUDA build ({_first_line(exc)})"
    if extensions is None:
        _note(f"skipping the CUDA kernels of tailorkit._C: {problem}; building the CPU kernels")
        extensions = [cpu_extension()]
    extensions.append(_kernels_extension())
    return extensions, {"build_ext": _skipping_failures(BuildExtension, cpu_extension)}


# What tailorkit does without each extension.
WITHOUT = {
    "tailorkit._C": "tailorkit.ops will use its PyTorch reference kernels",
    "tailorkit._kernels": "builds will merge with the torch ops",
}


def _skipping_failures(base, cpu_extension):
    """``base`` (torch's or setuptools' build_ext), except that a failed compile does not
    fail the install: after a failure each extension is built alone, so that one failing
    does not take the other with it; if the CUDA kernels fail, the CPU ones are built
    instead (``cpu_extension`` makes that ``_C``); what still fails is left out."""

    class BuildOrSkip(base):
        def run(self):
            # run() replaces the compiler name by an object and clears `inplace` while it
            # builds; a retry needs both as they were.
            compiler, inplace = self.compiler, self.inplace
            try:
                super().run()
                return
            except Exception as exc:  # noqa: BLE001 -- the package works without them
                failure = exc
            for ext in list(self.extensions):
                self.extensions = [ext]
                for retry in (None, self._without_cuda):
                    if retry is not None and not retry(ext, failure):
                        continue
                    self.compiler, self.inplace = compiler, inplace
                    try:
                        super().run()
                        break
                    except Exception as exc:  # noqa: BLE001
                        failure = exc
                else:
                    _note(
                        f"{ext.name} failed to build ({_first_line(failure)}); installing "
                        f"without it, {WITHOUT[ext.name]}"
                    )

        def _without_cuda(self, ext, failure: Exception) -> bool:
            if cpu_extension is None or not any(s.endswith(".cu") for s in ext.sources):
                return False
            _note(
                f"the CUDA kernels of {ext.name} failed to build ({_first_line(failure)}; "
                "the compiler's messages are above); building the CPU kernels alone"
            )
            # Turn the finalised extension into the CPU one in place: setuptools has
            # attached build state to the object that a fresh Extension would lack.
            ext.__dict__.update(vars(cpu_extension()))
            return True

    return BuildOrSkip


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line if len(line) <= 200 else line[:200] + '...'}"


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
