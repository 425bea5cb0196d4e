#!/usr/bin/env bash
# The documentation, warnings as errors: Doxygen for the C++ headers (include/ampkit/), then
# Sphinx for the guide and the Python API (docs/), into build/docs/:
#   build/docs/html/index.html      the site (guide, Python API)
#   build/docs/html/cpp/index.html  the C++ API (Doxygen's HTML, copied into the site)
# Needs doxygen, the Python packages of requirements-dev.txt and an importable, built ampkit
# (scripts/setup.sh provides all three). Honours PYTHON (default python3).
set -euo pipefail
AMPKIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$AMPKIT_ROOT"
PYTHON="${PYTHON:-python3}"
OUT="$AMPKIT_ROOT/build/docs"

command -v doxygen >/dev/null || { echo "[ampkit] build_docs: doxygen not found (apt-get install doxygen, or run scripts/setup.sh)" >&2; exit 1; }
"$PYTHON" -c "import sphinx, myst_parser" 2>/dev/null \
  || { echo "[ampkit] build_docs: sphinx / myst-parser not found ($PYTHON -m pip install -r requirements-dev.txt)" >&2; exit 1; }
# autodoc documents this tree's package, with its compiled module.
export PYTHONPATH="$AMPKIT_ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import ampkit" \
  || { echo "[ampkit] build_docs: ampkit does not import from $AMPKIT_ROOT/python (build it: scripts/setup.sh)" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/doxygen"
# docs/Doxyfile fails on any warning (WARN_AS_ERROR = FAIL_ON_WARNINGS); the output folder is set here.
{ cat docs/Doxyfile; echo "OUTPUT_DIRECTORY = $OUT/doxygen"; } | doxygen -
AMPKIT_DOXYGEN_DIR="$OUT/doxygen" "$PYTHON" -m sphinx -W --keep-going -q -b html -d "$OUT/doctrees" docs "$OUT/html"
echo "[ampkit] docs: $OUT/html/index.html (C++ API: $OUT/html/cpp/index.html)"
