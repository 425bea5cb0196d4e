#!/usr/bin/env bash
# Every test: set-up and build, then the Catch2 suite (CTest) and the pytest suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$AMPKIT_ROOT"
ctest --test-dir build --output-on-failure -j2
"$PYTHON" -m pytest tests/python -q -p no:cacheprovider
