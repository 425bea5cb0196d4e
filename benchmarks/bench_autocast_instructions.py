"""Instructions per op call under ampkit.autocast, torch.autocast and no autocast (callgrind).

Wall-clock timings of a 1-10 us op vary by several percent on shared machines; callgrind's
instruction counts do not (the same binary and inputs give the same count within ~0.1%). For each
op and mode this runs one process under ``valgrind --tool=callgrind`` that calls the op N times
in the region, collecting only inside one function (``--toggle-collect``):

* ``at::_ops::<op>::call``: everything one call of the op costs in C++ (dispatch, casts, kernel);
* ``*run_autocast_kernel*``: ampkit's boxed dispatcher kernel, inclusive (ampkit mode only; the
  operators of the default tables have unboxed kernels, so this is 0 for them).

Each count is also given without glibc's allocator (the functions of malloc.c): malloc's work per
call depends on the heap's history (what the process allocated before the loop), so two modes that
run the same torch code can differ by ~100-200 instructions there alone. The ``ampkit_cuda_armed``
mode runs after the CUDA table's kernels were registered (by an edit of that table; a CUDA region
does the same): ampkit has one dispatch key for every device type, so from then on CPU calls of ops
that only the CUDA table lists enter its kernel and pass.

Compare two builds by running this script with each on PYTHONPATH. Needs valgrind.

    python benchmarks/bench_autocast_instructions.py [--calls 2000] [--ops relu,mm,softmax,sum] [--json PATH]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

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
       "ampkit": lambda: ampkit.autocast("cpu", dtype=torch.bfloat16),
       "ampkit_cuda_armed": lambda: ampkit.autocast("cpu", dtype=torch.bfloat16)}[mode]
if mode == "ampkit_cuda_armed":  # an edit of the CUDA table registers its kernels; the table ends as it was
    ampkit.set_policy("aten::gelu", "cuda", "fp32")  # an op none of the measured calls reaches
    ampkit.remove_policy("aten::gelu", "cuda")
with ctx():
    for _ in range(n):
        f()
"""


def instructions(op, mode, calls, toggle):
    """(all, without glibc's allocator) instructions per call collected inside ``toggle``."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", f"--toggle-collect={toggle}", f"--callgrind-out-file={out_file}",
               sys.executable, "-c", CHILD, op, mode, str(calls)]
        log = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
        match = re.search(r"Collected : (\d+)", log)
        if match is None:
            raise RuntimeError(f"no callgrind total in the output of {cmd}:\n{log}")
        total = int(match.group(1))
        annotated = subprocess.run(["callgrind_annotate", "--threshold=100", out_file], capture_output=True,
                                   text=True, check=True).stdout
    allocator = 0
    for line in annotated.splitlines():
        # "  657,977 ( 6.42%)  ./malloc/./malloc/malloc.c:_int_malloc [/usr/lib/.../libc.so.6]"
        fields = line.split()
        if len(fields) >= 3 and "malloc/malloc.c:" in line and fields[0].replace(",", "").isdigit():
            allocator += int(fields[0].replace(",", ""))
    return total / calls, (total - allocator) / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--ops", default="relu,mm,softmax,sum", help="comma-separated subset of relu,mm,softmax,sum")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    rows = []
    # relu: in no table; mm: in the CPU table; softmax, sum: in the CUDA table only (CPU calls pass).
    symbols = {"relu": "relu", "mm": "mm", "softmax": "softmax_int", "sum": "sum"}
    unknown = set(args.ops.split(",")) - set(symbols)
    if unknown:
        p.error(f"--ops: expected names from {sorted(symbols)}, got {sorted(unknown)}")
    symbols = {op: symbol for op, symbol in symbols.items() if op in args.ops.split(",")}
    modes = ("none", "torch", "ampkit", "ampkit_cuda_armed")
    for op, symbol in symbols.items():
        row = {"op": op}
        for mode in modes:
            row[f"{mode}_instr"], row[f"{mode}_instr_no_malloc"] = instructions(op, mode, args.calls,
                                                                                f"at::_ops::{symbol}::call*")
        row["ampkit_kernel_instr"] = instructions(op, "ampkit", args.calls, "*run_autocast_kernel*")[0]
        rows.append(row)
    print(f"CPU {cpu_model()}, torch {torch.__version__}, bf16, {args.calls} calls, instructions per call "
          "(all / without glibc malloc)")
    print(f"{'op':8s} " + " ".join(f"{m:>23s}" for m in modes) + f" {'ampkit/torch':>13s}")
    for r in rows:
        cells = " ".join(f"{r[m + '_instr']:11.0f}/{r[m + '_instr_no_malloc']:<11.0f}" for m in modes)
        print(f"{r['op']:8s} {cells} {r['ampkit_instr_no_malloc'] / r['torch_instr_no_malloc']:13.3f}")
    if args.json:
        # The header's "cpu" and "torch" keep the names of the first version of this file, which
        # benchmarks/render_readme.py reads as well (it had no cpu_flags / threads / benchmark).
        # The child runs one thread; instruction counts need no CPU-time clock.
        write_json(args.json, {**header("autocast_instructions", threads=1), "tool": "valgrind --tool=callgrind",
                               "calls": args.calls, "results": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
