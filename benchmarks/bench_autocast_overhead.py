"""Per-call cost of ampkit's dispatcher kernel against torch's own autocast.

Measures, in one process and interleaved (these machines are shared and noisy), the per-call
time of a listed op (mm 16x16) and an unlisted op (relu) in four modes: no autocast,
torch.autocast, a second identical torch.autocast ("torch-control": its ratio to torch.autocast
is the noise band of the ampkit ratio) and ampkit.autocast. Reports medians of wall time and of
the thread's CPU time (one thread: torch.set_num_threads(1), so the calling thread does all the
work and other processes on the machine add wall time, not thread CPU time), and the ratios the
autocast issue targets: listed op under ampkit <= 1.2x torch.autocast, unlisted op within 5% of
no autocast.

    python benchmarks/bench_autocast_overhead.py [--device cpu] [--rounds 41] [--calls 2000] [--json PATH]
"""
import argparse

import torch

import ampkit
from _common import OtherLoad, Timer, header, summary, write_json

MODES = ("none", "torch", "torch-control", "ampkit")


def per_call_us(fn, calls, clock):
    """(wall, CPU) microseconds per call of fn over calls calls."""
    with Timer(clock) as t:
        for _ in range(calls):
            fn()
    return t.wall_s / calls * 1e6, t.cpu_s / calls * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    # On CUDA the host thread only launches kernels: its CPU time is the dispatch cost, the wall
    # time (synchronized after each round) includes the GPU's.
    clock = "thread"
    dtype = torch.get_autocast_dtype(args.device)
    a = torch.randn(16, 16, device=args.device)
    b = torch.randn(16, 16, device=args.device)
    ops = {"mm 16x16 (listed)": lambda: torch.mm(a, b), "relu (unlisted)": lambda: torch.relu(a)}
    modes = {
        "none": lambda: torch.autocast(args.device, enabled=False),
        "torch": lambda: torch.autocast(args.device, dtype=dtype),
        "torch-control": lambda: torch.autocast(args.device, dtype=dtype),
        "ampkit": lambda: ampkit.autocast(args.device, dtype=dtype),
    }
    assert tuple(modes) == MODES
    samples = {(o, m): {"wall": [], "cpu": []} for o in ops for m in modes}
    load = OtherLoad().start()
    for name, fn in ops.items():  # warm-up
        for mode in modes.values():
            with mode():
                per_call_us(fn, args.calls, clock)
    for r in range(args.rounds):
        order = list(modes.items())
        order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
        for name, fn in ops.items():
            for mode_name, mode in order:
                with mode():
                    wall, cpu = per_call_us(fn, args.calls, clock)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                samples[(name, mode_name)]["wall"].append(wall)
                samples[(name, mode_name)]["cpu"].append(cpu)
    load.stop()

    results = []
    print(f"device {args.device}, torch {torch.__version__}, autocast dtype {dtype}, "
          f"{args.rounds} rounds x {args.calls} calls, median per-call time (wall / thread CPU)")
    print(f"{'op':20s} {'clock':6s} {'none':>9s} {'torch':>9s} {'control':>9s} {'ampkit':>9s}  "
          f"ampkit/torch  control/torch  ampkit/none")
    for name in ops:
        row = {"op": name}
        for m in modes:
            row[m] = {**summary(samples[(name, m)]["wall"], "us"),
                      **{k.replace("_us", "_cpu_us"): v for k, v in summary(samples[(name, m)]["cpu"], "us").items()}}
        for kind, key in (("wall", "median_us"), ("cpu", "median_cpu_us")):
            n, t, c, k = (row[m][key] for m in modes)
            row[f"ampkit_over_torch_{kind}"] = k / t
            row[f"control_over_torch_{kind}"] = c / t
            row[f"ampkit_over_none_{kind}"] = k / n
            print(f"{name:20s} {kind:6s} {n:8.2f}u {t:8.2f}u {c:8.2f}u {k:8.2f}u  {k / t:11.3f}x "
                  f"{c / t:13.3f}x {k / n:11.3f}x")
        # The first version's flat fields (wall-time medians), kept for its readers.
        row.update({"none_us": row["none"]["median_us"], "torch_us": row["torch"]["median_us"],
                    "ampkit_us": row["ampkit"]["median_us"], "ampkit_over_torch": row["ampkit_over_torch_wall"],
                    "ampkit_over_none": row["ampkit_over_none_wall"]})
        results.append(row)
    if args.json:
        write_json(args.json, {**header("autocast_overhead", cpu_clock=clock, threads=1, device=args.device,
                                      other_load=load),
                               "dtype": str(dtype), "rounds": args.rounds, "calls": args.calls, "modes": list(MODES),
                               "results": results})


if __name__ == "__main__":
    main()
