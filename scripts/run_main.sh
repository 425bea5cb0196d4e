#!/usr/bin/env bash
# The main job: set-up and build, then a short AMP training run with ampkit's guard that
# shows which dtype each op ran in (CUDA when present, else the CPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$AMPKIT_ROOT"
./build/examples/autocast_demo
