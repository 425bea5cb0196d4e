#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and no network (the lent device machine: torch
# 2.11+cu130, Python 3.12, nvcc 13, CMake, ninja, pybind11, pytest; no Catch2). Builds ampkit
# against the machine's torch (with its CUDA kernels), runs the CUDA tests and the GPU benchmarks,
# and writes everything under one folder: logs, JSON, PNG.
#
#   bash scripts/gpu_check.sh [build|test|bench|all] [OUT]     (default: all, OUT=${OUT:-gpu_out})
#
# Each stage fits one 10-minute device command; `all` runs the three in order. The build stays in
# build-gpu/ (carry it between commands with the device tool's `carry`). The Catch2 tests are
# built where Catch2 is found (Debian's package, or its single header under third_party/catch2/,
# carried); the pytest suite runs either way. Exit status: that of the first stage that failed.
#
# Python packages the image lacks travel as wheels in .whl/ (ignored by git; name it in `carry`),
# installed into build-gpu/site for every stage. The tests need expecttest (torch.testing._internal
# imports it; the image of 2026-11 has no copy). Here, before the first device command:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl expecttest
set -uo pipefail
stage="${1:-all}"
OUT="${2:-${OUT:-gpu_out}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
export AMPKIT_BUILD_DIR="$ROOT/build-gpu"
status=0

run() {  # run NAME COMMAND...: the command's output to OUT/NAME.log (and its tail here), its status kept
  local name="$1"
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: exit $rc, $((SECONDS - start)) s"
  tail -n 15 "$OUT/$name.log"
  [ $rc -eq 0 ] || [ $status -ne 0 ] || status=$rc
  return $rc
}

carried_wheels() {
  compgen -G ".whl/*.whl" >/dev/null || return 0
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$AMPKIT_BUILD_DIR/site" .whl/*.whl || return 1
  export PYTHONPATH="$AMPKIT_BUILD_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
}

environment() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    nvcc --version | tail -n 2 || true
    "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  } | tee "$OUT/environment.txt"
}

build() {
  # No network there: what the build needs must be installed already (setuptools >= 77 for the
  # package metadata; pybind11 and CMake come with the machine's image).
  "$PYTHON" - <<'PY' || return 1
import sys
from importlib.metadata import version
v = version("setuptools")
if int(v.split(".")[0]) < 77:
    sys.exit(f"setuptools {v} is older than the build needs (>= 77): carry a newer wheel and pip install it")
PY
  local tests=0
  if [ -f /usr/include/catch2/catch.hpp ] || [ -f third_party/catch2/catch2/catch.hpp ]; then tests=1; fi
  AMPKIT_BUILD_TESTS=$tests CMAKE_GENERATOR="${CMAKE_GENERATOR:-Ninja}" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . &&
    "$PYTHON" -c "import ampkit; k = ampkit._C._testing.cuda_kernels_built(); print('ampkit CUDA kernels:', k); \
assert k, 'ampkit was built without its CUDA kernels'"
}

tests() {
  # The CUDA tests first (they skip without a device), then everything.
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/python/test_low_precision_cuda.py \
    --junitxml="$OUT/pytest_cuda.xml" || return 1
  "$PYTHON" -c "import expecttest" 2>/dev/null || {
    echo "expecttest is missing (torch.testing._internal imports it): carry it as a wheel in .whl/ (see the header)"
    return 1
  }
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/python --junitxml="$OUT/pytest_all.xml" &&
    if [ -x "$AMPKIT_BUILD_DIR/tests/cpp/ampkit_tests" ]; then
      # The install check rebuilds a project from scratch: left to the CPU CI.
      ctest --test-dir "$AMPKIT_BUILD_DIR" --output-on-failure -j8 -E install_and_find_package
    fi
}

benchmarks() {
  local plot=(--plot "$OUT/fp32_vs_amp_cuda.png")
  "$PYTHON" -c "import matplotlib" 2>/dev/null || plot=()  # the chart needs matplotlib; the JSON does not
  "$PYTHON" benchmarks/bench_lowp_step.py --device cuda --numel $((64 * 2 ** 20)) --json "$OUT/lowp_step_cuda.json" &&
    "$PYTHON" benchmarks/fp32_vs_amp.py --device cuda --json "$OUT/fp32_vs_amp_cuda.json" "${plot[@]}"
}

carried_wheels || { echo "[gpu_check] the wheels in .whl/ did not install" >&2; exit 1; }
environment
case "$stage" in
  build) run build build ;;
  test) run tests tests ;;
  bench) run benchmarks benchmarks ;;
  all) run build build && { run tests tests; run benchmarks benchmarks; } ;;
  *)
    echo "usage: bash scripts/gpu_check.sh [build|test|bench|all] [OUT]" >&2
    exit 2
    ;;
esac
echo "[gpu_check] results in $OUT"
exit $status
