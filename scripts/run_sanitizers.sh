#!/usr/bin/env bash
# The sanitizer stage: the Catch2 suite built with AddressSanitizer + UndefinedBehaviorSanitizer,
# and its concurrency cases ([concurrency]) built with ThreadSanitizer. Only ampkit and its tests
# are instrumented (LibTorch is a prebuilt wheel); reports from inside LibTorch or libgomp alone are
# suppressed (tests/sanitizers/*.supp), any report in ampkit's code fails the stage.
# Needs what scripts/setup.sh installs (torch, Catch2, cmake, ninja). Builds into build-asan/ and
# build-tsan/ (the test target only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
SUPP="$ROOT/tests/sanitizers"
# One intra-op thread: OpenMP's worker threads are uninstrumented and only add noise.
export OMP_NUM_THREADS=1

build() {  # build DIR SANITIZERS
  cmake -S . -B "$1" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release \
    -DAMPKIT_SANITIZE="$2" -DAMPKIT_BUILD_PYTHON=OFF -DAMPKIT_BUILD_EXAMPLES=OFF \
    -DAMPKIT_BUILD_BENCHMARKS=OFF -DAMPKIT_INSTALL=OFF >/dev/null
  cmake --build "$1" --target ampkit_tests -j "${AMPKIT_JOBS:-2}"
}

stage() {  # stage NAME COMMAND...
  local start=$SECONDS
  echo "[ampkit] sanitizers: $1"
  "${@:2}"
  echo "[ampkit] sanitizers: $1 took $((SECONDS - start)) s"
}

asan() {
  build build-asan address,undefined
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1" \
  LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    ./build-asan/tests/cpp/ampkit_tests "~[cuda]"
}

tsan() {
  build build-tsan thread
  TSAN_OPTIONS="suppressions=$SUPP/tsan.supp:halt_on_error=1:exitcode=66:second_deadlock_stack=1" \
    ./build-tsan/tests/cpp/ampkit_tests "[concurrency]"
}

stage "ASan+UBSan, every Catch2 case" asan
stage "TSan, the [concurrency] cases" tsan
