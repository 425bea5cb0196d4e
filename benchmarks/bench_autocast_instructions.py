"""Instructions per op call under ampkit.autocast, torch.autocast and no autocast (callgrind).

Wall-clock timings of a 1-10 us op vary by several percent on shared machines; callgrind's
instruction counts do not (the same binary and inputs give the same count within ~0.1%). For each
op and mode this runs one process under ``valgrind --tool=callgrind`` that calls the op N times
in the region, collecting only inside one function (``--toggle-collect``):

* ``at::_ops::<op>::call``: everything one call of the op costs in C++ (dispatch, casts, kernel);
* ``*run_autocast_kernel*``: ampkit's boxed dispatcher kernel, inclusive (ampkit mode only; the
  operators of the default tables have unboxed kernels, so this is 0 for them).

Compare two builds by running this script with each on PYTHONPATH. Needs valgrind.

    python benchmarks/bench_autocast_instructions.py [--calls 2000] [--json PATH]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

import torch

from _common import cpu_model, header, write_json

CHILD = r"""
import sys, torch, ampkit
torch.set_num_threads(1)
op, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
a, b = torch.randn(16, 16), torch.randn(16, 16)
f = {"mm": lambda: torch.mm(a, b), "relu": lambda: torch.relu(a), "softmax": lambda: torch.softmax(a, 1),
     "sum": lambda: torch.sum(a)}[op]
ctx = {"none": lambda: torch.autocast("cpu", enabled=False),
       "torch": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
       "ampkit": lambda: ampkit.autocast("cpu", dtype=torch.bfloat16)}[mode]
with ctx():
    for _ in range(n):
        f()
"""


def instructions(op, mode, calls, toggle):
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", f"--toggle-collect={toggle}", "--callgrind-out-file=/dev/null",
           sys.executable, "-c", CHILD, op, mode, str(calls)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(f"no callgrind total in the output of {cmd}:\n{out}")
    return int(match.group(1)) / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    rows = []
    # relu: in no table; mm: in the CPU table; softmax, sum: in the CUDA table only (CPU calls pass).
    symbols = {"relu": "relu", "mm": "mm", "softmax": "softmax_int", "sum": "sum"}
    for op, symbol in symbols.items():
        row = {"op": op}
        for mode in ("none", "torch", "ampkit"):
            row[f"{mode}_instr"] = instructions(op, mode, args.calls, f"at::_ops::{symbol}::call*")
        row["ampkit_kernel_instr"] = instructions(op, "ampkit", args.calls, "*run_autocast_kernel*")
        rows.append(row)
    print(f"CPU {cpu_model()}, torch {torch.__version__}, bf16, {args.calls} calls, instructions per call")
    print(f"{'op':8s} {'none':>10s} {'torch':>10s} {'ampkit':>10s} {'ampkit/torch':>13s} {'ampkit kernel':>14s}")
    for r in rows:
        print(f"{r['op']:8s} {r['none_instr']:10.0f} {r['torch_instr']:10.0f} {r['ampkit_instr']:10.0f} "
              f"{r['ampkit_instr'] / r['torch_instr']:13.3f} {r['ampkit_kernel_instr']:14.0f}")
    if args.json:
        # The header's "cpu" and "torch" keep the names of the first version of this file, which
        # benchmarks/render_readme.py reads as well (it had no cpu_flags / threads / benchmark).
        # The child runs one thread; instruction counts need no CPU-time clock.
        write_json(args.json, {**header("autocast_instructions", threads=1), "tool": "valgrind --tool=callgrind",
                               "calls": args.calls, "results": rows})


if __name__ == "__main__":
    main()
