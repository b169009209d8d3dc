#!/usr/bin/env bash
# Compile every csrc/*.cu to an object file for sm_90 with nvcc, so the CUDA
# kernels cannot rot on machines (CI) whose torch has no CUDA.
#
# Uses the headers of the torch installed for $PYTHON (default: .venv/bin/python,
# else python3) and the flags a CUDA build through setup.py would use: torch's
# own nvcc flags, setup.py's NVCC_FLAGS, and -std=c++17. Nothing is linked and
# nothing is run: this checks that the sources compile, not that they work
# (benchmarks/gpu.py and `pytest -m cuda` do that on a GPU).
#
# Exits 0 with a "skipped" line when nvcc is not installed, non-zero when a file
# fails to compile.
#
#   bash scripts/check_cuda_compile.sh            # all csrc/*.cu
#   bash scripts/check_cuda_compile.sh -v         # also print ptxas register/spill reports
set -euo pipefail
cd "$(dirname "$0")/.."

verbose=0
if [[ "${1:-}" == "-v" ]]; then
  verbose=1
fi

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: skipped: nvcc not found (not on PATH, no \$CUDA_HOME/bin/nvcc)"
  exit 0
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# One flag per line: include dirs, torch's nvcc flags, setup.py's NVCC_FLAGS, defines.
mapfile -t FLAGS < <("$PYTHON" - <<'EOF'
import ast
import os
import sys

import torch
from torch.utils import cpp_extension

flags = [f"-I{p}" for p in cpp_extension.include_paths()]
flags += cpp_extension.COMMON_NVCC_FLAGS
flags += ["--compiler-options", "-fPIC", "-std=c++17"]
# Newer torch headers use a few C++20 features that GCC and nvcc accept in C++17
# mode with a warning each; those warnings are torch's, not ours.
flags += ["-diag-suppress=3306", "-Xcompiler=-Wno-c++20-extensions"]
flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DTAILORKIT_WITH_CUDA"]
# setup.py's own nvcc flags, read without running setup.py.
tree = ast.parse(open("setup.py").read())
for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "NVCC_FLAGS" for t in node.targets
    ):
        flags += ast.literal_eval(node.value)
# A CPU-only torch ships c10/cuda headers without the file its CUDA build generates
# (c10/cuda/impl/cuda_cmake_macros.h); c10 has a switch for building without it.
include = os.path.join(os.path.dirname(torch.__file__), "include")
if not os.path.exists(os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
print("\n".join(flags))
EOF
)

ARCH=(-gencode=arch=compute_90,code=sm_90)
if [[ $verbose == 1 ]]; then
  ARCH+=(-Xptxas -v)
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"
status=0
pids=()
names=()
for src in csrc/*.cu; do
  obj="$out/$(basename "$src" .cu).o"
  (
    start=$SECONDS
    if "$NVCC" "${FLAGS[@]}" "${ARCH[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1; then
      echo "check_cuda_compile: ok      $src ($((SECONDS - start)) s)"
      if [[ $verbose == 1 ]]; then cat "$obj.log"; fi
    else
      echo "check_cuda_compile: FAILED  $src"
      cat "$obj.log"
      exit 1
    fi
  ) &
  pids+=($!)
  names+=("$src")
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
  fi
done
if [[ $status != 0 ]]; then
  echo "check_cuda_compile: some CUDA sources failed to compile (messages above)"
fi
exit $status
