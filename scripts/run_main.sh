#!/usr/bin/env bash
# The main job: set-up and build, then the FP32-vs-AMP benchmark (CUDA when present, else the
# CPU) in Python (ampkit and torch's own AMP) and in C++ (ampkit's trainer and fused AdamW
# against the stock LibTorch loop). Results: build/results/ (JSON and a PNG chart).
# Extra arguments go to benchmarks/fp32_vs_amp.py (e.g. --models mlp --steps 50).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$AMPKIT_ROOT"
mkdir -p build/results
device=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
"$PYTHON" benchmarks/fp32_vs_amp.py --device "$device" \
  --json "build/results/fp32_vs_amp_${device}.json" --plot "build/results/fp32_vs_amp_${device}.png" "$@"
echo
./build/benchmarks/fp32_vs_amp_cpp --device "$device" --json "build/results/fp32_vs_amp_cpp_${device}.json"
