"""Per-call cost of ampkit's dispatcher kernel against torch's own autocast.

Measures, in one process and interleaved (these machines are shared and noisy), the per-call
time of a listed op (mm 16x16) and an unlisted op (relu) in three modes: no autocast,
torch.autocast, ampkit.autocast. Reports medians and the ratios the autocast issue targets:
listed op under ampkit <= 1.2x torch.autocast, unlisted op within 5% of no autocast.

    python benchmarks/bench_autocast_overhead.py [--device cpu] [--rounds 41] [--calls 2000] [--json PATH]
"""
import argparse
import json
import statistics
import time

import torch

import ampkit


def per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    dtype = torch.get_autocast_dtype(args.device)
    a = torch.randn(16, 16, device=args.device)
    b = torch.randn(16, 16, device=args.device)
    ops = {"mm 16x16 (listed)": lambda: torch.mm(a, b), "relu (unlisted)": lambda: torch.relu(a)}
    modes = {
        "none": lambda: torch.autocast(args.device, enabled=False),
        "torch.autocast": lambda: torch.autocast(args.device, dtype=dtype),
        "ampkit.autocast": lambda: ampkit.autocast(args.device, dtype=dtype),
    }
    samples = {(o, m): [] for o in ops for m in modes}
    for name, fn in ops.items():  # warm-up
        for mode in modes.values():
            with mode():
                per_call_us(fn, args.calls)
    for r in range(args.rounds):
        order = list(modes.items())
        order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
        for name, fn in ops.items():
            for mode_name, mode in order:
                with mode():
                    samples[(name, mode_name)].append(per_call_us(fn, args.calls))
                if args.device == "cuda":
                    torch.cuda.synchronize()

    med = {k: statistics.median(v) for k, v in samples.items()}
    results = []
    print(f"device {args.device}, torch {torch.__version__}, autocast dtype {dtype}, "
          f"{args.rounds} rounds x {args.calls} calls, median per-call time")
    print(f"{'op':20s} {'none':>9s} {'torch':>9s} {'ampkit':>9s}  ampkit/torch  ampkit/none")
    for name in ops:
        n, t, k = (med[(name, m)] for m in modes)
        print(f"{name:20s} {n:8.2f}u {t:8.2f}u {k:8.2f}u  {k / t:11.3f}x {k / n:11.3f}x")
        results.append({"op": name, "none_us": n, "torch_us": t, "ampkit_us": k,
                        "ampkit_over_torch": k / t, "ampkit_over_none": k / n})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "dtype": str(dtype),
                       "rounds": args.rounds, "calls": args.calls, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
