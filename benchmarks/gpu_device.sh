#!/usr/bin/env bash
# The GPU proof in one command, for a bare GPU machine, run from the repo root:
#
#   bash benchmarks/gpu_device.sh
#
# 1. installs the Python packages tailorkit needs that the machine lacks, from
#    wheels carried in .whl/ (pydantic and its dependencies), into /tmp/site;
# 2. builds tailorkit._C in place with its CUDA kernels (Hopper only, to keep
#    the compile short) and prints how long that took;
# 3. runs the GPU tests: python3 -m pytest -q -m cuda tests/;
# 4. runs benchmarks/gpu.py (checks, ceilings, kernel and CKA timings, the
#    streaming build CPU vs GPU), which writes $OUT/gpu.json.
#
# Everything printed also goes to $OUT/log.txt ($OUT defaults to ./gpu-out).
# Each step has a time limit so that the whole run ends inside
# TAILORKIT_DEVICE_BUDGET_S seconds (default 560); a failing step is reported
# and the next one still runs. Exit status: 0 if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BUDGET_S="${TAILORKIT_DEVICE_BUDGET_S:-560}"
export PYTHONUNBUFFERED=1

# Seconds left for a step: its own cap, or what the budget has left minus a reserve
# for the steps after it, whichever is smaller (at least 30).
limit() {
  local cap=$1 reserve=$2
  local left=$((BUDGET_S - SECONDS - reserve))
  if ((left < cap)); then cap=$left; fi
  if ((cap < 30)); then cap=30; fi
  echo "$cap"
}

main() {
  local status=0 rc
  echo "== gpu_device.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET_S} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>&1 || echo "nvidia-smi failed"
  echo "cores: $(nproc); memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
  df -h "${TMPDIR:-/tmp}" . 2>&1 | sed 's/^/  /'
  command -v nvcc && nvcc --version | tail -n 2
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())'

  echo
  echo "== 1. wheels -> /tmp/site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "!! wheel install failed"; status=1; }
  else
    echo "!! no .whl/*.whl here: carry .whl with the call (pydantic is not on the machine)"
    status=1
  fi
  export PYTHONPATH="/tmp/site:$PWD"
  python3 -c 'import pydantic, tailorkit; print("tailorkit imports; pydantic", pydantic.VERSION)' ||
    { echo "!! import tailorkit failed (see above)"; status=1; }

  echo
  echo "== 2. build tailorkit._C with CUDA (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)"
  rm -rf build tailorkit/_C*.so
  local start=$SECONDS
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0" timeout "$(limit 300 300)" \
    python3 setup.py build_ext --inplace
  rc=$?
  echo "build: exit $rc after $((SECONDS - start)) s"
  python3 -c 'import tailorkit.ops as o; print("kernels:", o.backend(), "|", o.backend_reason())'
  if ! python3 -c 'import sys, tailorkit.ops as o; sys.exit(o.backend() != "cpp+cuda")'; then
    echo "!! the CUDA kernels are NOT in use: the build output above says why"
    status=1
  fi

  echo
  echo "== 3. pytest -m cuda"
  start=$SECONDS
  timeout "$(limit 180 240)" python3 -m pytest -q -m cuda -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/pytest-cuda.xml" tests/
  rc=$?
  echo "pytest: exit $rc after $((SECONDS - start)) s"
  if ((rc != 0)); then status=1; fi

  echo
  echo "== 4. benchmarks/gpu.py"
  start=$SECONDS
  OUT="$OUT" timeout "$(limit 400 5)" python3 benchmarks/gpu.py
  rc=$?
  echo "gpu.py: exit $rc after $((SECONDS - start)) s"
  if ((rc != 0)); then status=1; fi

  echo
  echo "== gpu_device.sh: done in ${SECONDS} s, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  return $status
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
