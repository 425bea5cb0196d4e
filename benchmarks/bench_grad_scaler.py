"""ampkit.GradScaler against torch.amp.GradScaler: the time of one unscale_ + step + update.

Both scalers drive the same parameters and gradients (fp32, CPU by default), interleaved in one
process and alternating which goes first, so that both see the same machine state. Between
timed iterations the gradients are multiplied back by the scale (a power of two, so exactly),
outside the timing, so every iteration unscales the same values and none drifts into denormals.

    python benchmarks/bench_grad_scaler.py [--elements 100000000] [--tensors 400] [--repeats 30]
                                           [--device cpu] [--json PATH]

Reports the median, p10 and p90 of each and the ratio ampkit / torch (target <= 1.05).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import ampkit


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(seconds):
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "p10_ms": percentile(seconds, 0.1) * 1e3,
        "p90_ms": percentile(seconds, 0.9) * 1e3,
    }


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=100_000_000, help="total gradient elements")
    parser.add_argument("--tensors", type=int, default=400, help="number of parameter tensors")
    parser.add_argument("--repeats", type=int, default=30, help="timed iterations per scaler")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per scaler")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    device = args.device
    per_tensor = args.elements // args.tensors
    torch.manual_seed(0)
    params = [torch.randn(per_tensor, device=device).requires_grad_() for _ in range(args.tensors)]
    scale = 2.0**16
    for p in params:
        p.grad = torch.randn_like(p) * scale
    optimizer = torch.optim.SGD(params, lr=1e-6, foreach=True)
    grads = [p.grad for p in params]

    scalers = {
        "torch": torch.amp.GradScaler(device, init_scale=scale, growth_interval=10**9),
        "ampkit": ampkit.GradScaler(device, init_scale=scale, growth_interval=10**9),
    }
    for s in scalers.values():
        s.scale(torch.ones((), device=device))  # creates the scale on the device

    def iteration(name):
        s = scalers[name]
        sync(device)
        t0 = time.perf_counter()
        s.unscale_(optimizer)
        s.step(optimizer)
        s.update()
        sync(device)
        elapsed = time.perf_counter() - t0
        torch._foreach_mul_(grads, scale)  # back to scaled grads, exactly (power of two)
        return elapsed

    times = {name: [] for name in scalers}
    for i in range(args.warmup + args.repeats):
        order = ("torch", "ampkit") if i % 2 == 0 else ("ampkit", "torch")
        for name in order:
            t = iteration(name)
            if i >= args.warmup:
                times[name].append(t)
    for name, s in scalers.items():
        assert s.get_scale() == scale, f"{name} changed the scale: a gradient overflowed"

    ratios = [a / t for a, t in zip(times["ampkit"], times["torch"])]
    result = {
        "benchmark": "GradScaler unscale_ + step + update (SGD foreach, fp32 grads)",
        "device": device,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "elements": per_tensor * args.tensors,
        "tensors": args.tensors,
        "repeats": args.repeats,
        "torch": summary(times["torch"]),
        "ampkit": summary(times["ampkit"]),
        "ratio_of_medians": statistics.median(times["ampkit"]) / statistics.median(times["torch"]),
        "ratio_per_pair": {
            "median": statistics.median(ratios),
            "p10": percentile(ratios, 0.1),
            "p90": percentile(ratios, 0.9),
        },
        "target_ratio": 1.05,
    }
    print(f"{result['elements']:,} fp32 grad elements in {args.tensors} tensors on {device}, {args.repeats} repeats")
    for name in ("torch", "ampkit"):
        r = result[name]
        print(f"  {name:7s} median {r['median_ms']:8.2f} ms   p10 {r['p10_ms']:8.2f}   p90 {r['p90_ms']:8.2f}")
    pr = result["ratio_per_pair"]
    print(
        f"  ratio ampkit/torch: {result['ratio_of_medians']:.3f} (medians); per pair median {pr['median']:.3f}, "
        f"p10 {pr['p10']:.3f}, p90 {pr['p90']:.3f}  (target <= 1.05)"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
