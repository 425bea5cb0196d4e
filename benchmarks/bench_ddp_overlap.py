"""Communication overlap of ampkit::dist::DataParallel on CPU with gloo: starts two ranks of
build/benchmarks/ddp_overlap_cpp (benchmarks/ddp_overlap.cpp) on 127.0.0.1 for each bucket cap and
prints, for fp32_vs_amp's transformer model, backward alone, the all-reduce alone, their sum and
backward with the overlapped all-reduce, and the share of the all-reduce hidden behind backward.

    python benchmarks/bench_ddp_overlap.py [--caps 25,4] [--steps 20] [--threads 1] [--tiny]

Each rank runs with --threads intra-op threads (default 1: two ranks on a 2-core machine).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(os.environ.get("AMPKIT_BUILD_DIR", os.path.join(ROOT, "build")), "benchmarks", "ddp_overlap_cpp")


def run(cap, steps, threads, tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        procs = []
        for rank in range(2):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                       OMP_NUM_THREADS=str(threads))
            cmd = [BINARY, "--steps", str(steps), "--bucket-cap-mb", str(cap), "--json", out] + (["--tiny"] if tiny else [])
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE))
        for p in procs:
            p.communicate(timeout=1800)
            if p.returncode != 0:
                sys.exit(f"ddp_overlap_cpp exited with {p.returncode}")
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", default="25,4", help="bucket caps in MB, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a smoke test at tiny sizes")
    args = parser.parse_args()
    print(f"CPU: {_common.cpu_model()}, {os.cpu_count()} logical CPUs; 2 ranks x {args.threads} thread(s), gloo")
    print("| bucket cap | backward alone | all-reduce alone | sum | backward + all-reduce | hidden |")
    print("|---|---|---|---|---|---|")
    for cap in [float(c) for c in args.caps.split(",")]:
        r = run(cap, args.steps, args.threads, args.tiny)
        print(f"| {cap:g} MB | {r['backward_ms']:.1f} ms | {r['all_reduce_ms']:.1f} ms | "
              f"{r['backward_ms'] + r['all_reduce_ms']:.1f} ms | {r['overlapped_ms']:.1f} ms | "
              f"{100 * r['hidden_fraction']:.0f} % |")


if __name__ == "__main__":
    main()
