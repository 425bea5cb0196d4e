#!/usr/bin/env bash
# Set-up on a fresh machine, idempotent: Debian's Catch2/cmake/ninja/doxygen, torch (the local CPU
# wheel, 2.13.0) when none is installed, the Python test and docs tools, then the build of the library,
# the Python module, the Catch2 tests and the examples into build/ (pip editable install).
# Sourced by run_main.sh and run_tests.sh. Honours PYTHON (default python3).
set -euo pipefail
AMPKIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$AMPKIT_ROOT"
PYTHON="${PYTHON:-python3}"

missing=()
[ -f /usr/include/catch2/catch.hpp ] || missing+=(catch2)
# gloo's headers, for c10d's ProcessGroupGloo.hpp (the torch wheel does not ship them).
[ -f /usr/include/gloo/context.h ] || missing+=(libgloo-dev)
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v doxygen >/dev/null || missing+=(doxygen)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[ampkit] installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[ampkit] installing torch==2.13.0"
  "$PYTHON" -m pip install -q torch==2.13.0
fi
# The installed torch is pinned: no requirement (lightning, accelerate) may replace it, and what is
# installed beside it must suit it (torch 2.11 asks for setuptools < 82, for one). The pin is the
# distribution's version, not torch.__version__: PyPI's CUDA wheels call themselves 2.11.0 while
# torch.__version__ says 2.11.0+cu130, a version nothing installed has. setuptools >= 77 is
# pyproject.toml's build-system.requires: --no-build-isolation makes pip build with what is here.
torch_pin="torch==$("$PYTHON" -c "from importlib.metadata import version; print(version('torch'))")"
"$PYTHON" -m pip install -q -r requirements-dev.txt "setuptools>=77" "$torch_pin"

echo "[ampkit] building (build/: library, ampkit._C, Catch2 tests, examples)"
export AMPKIT_BUILD_TESTS=1
export CMAKE_GENERATOR="${CMAKE_GENERATOR:-Ninja}"
"$PYTHON" -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PYTHON" -c "import ampkit" # fails loudly if the build did not produce a loadable module
