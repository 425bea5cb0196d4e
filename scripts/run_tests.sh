#!/usr/bin/env bash
# Every test: set-up and build, then the Catch2 suite (CTest), the pytest suite, the documentation
# (scripts/build_docs.sh, warnings as errors) and the sanitizer stage (scripts/run_sanitizers.sh;
# AMPKIT_SANITIZERS=0 leaves it out). Prints each stage's time.
set -euo pipefail
start=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$AMPKIT_ROOT"
echo "[ampkit] set-up and build took $((SECONDS - start)) s"
start=$SECONDS
ctest --test-dir build --output-on-failure -j2
echo "[ampkit] Catch2 suite took $((SECONDS - start)) s"
start=$SECONDS
"$PYTHON" -m pytest tests/python -q -p no:cacheprovider
echo "[ampkit] pytest suite took $((SECONDS - start)) s"
start=$SECONDS
bash scripts/build_docs.sh
echo "[ampkit] docs stage took $((SECONDS - start)) s"
if [ "${AMPKIT_SANITIZERS:-1}" != "0" ]; then
  start=$SECONDS
  bash scripts/run_sanitizers.sh
  echo "[ampkit] sanitizer stage took $((SECONDS - start)) s"
fi
