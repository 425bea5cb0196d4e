"""ampkit.GradScaler against torch.amp.GradScaler: the time of one unscale_ + step + update.

The scalers drive the same parameters and gradients (fp32, CPU by default), interleaved in one
process and rotating which goes first, so that all see the same machine state. "torch-control" is
a second torch.amp.GradScaler, identical to the first: its ratio to torch is the noise band of the
ampkit ratio. Between timed iterations the gradients are multiplied back by the scale (a power of
two, so exactly), outside the timing, so every iteration unscales the same values and none drifts
into denormals.

    python benchmarks/bench_grad_scaler.py [--preset large|small] [--elements N] [--tensors N]
                                           [--repeats N] [--warmup N] [--device cpu] [--json PATH]

Presets: large (default) 100,000,000 elements in 400 tensors (the cost is memory traffic);
small 2,000,000 elements in 2000 tensors (the cost is the per-tensor work in Python or C++).
--elements / --tensors / --repeats override the preset's.

Reports the median, p10 and p90 of wall time and of the process's CPU time (all threads: the
foreach ops run on torch's intra-op threads) and the ratio ampkit / torch (target <= 1.05).
"""
import argparse
import statistics
import sys

import torch

import ampkit
from _common import OtherLoad, Timer, header, percentile, summary, write_json

PRESETS = {
    "large": dict(elements=100_000_000, tensors=400, repeats=60),
    "small": dict(elements=2_000_000, tensors=2000, repeats=60),
}
SCALERS = ("torch", "torch-control", "ampkit")
CLOCK = "process"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="large")
    parser.add_argument("--elements", type=int, help="total gradient elements (default: the preset's)")
    parser.add_argument("--tensors", type=int, help="number of parameter tensors (default: the preset's)")
    parser.add_argument("--repeats", type=int, help="timed iterations per scaler (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per scaler")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    elements = args.elements if args.elements is not None else preset["elements"]
    tensors = args.tensors if args.tensors is not None else preset["tensors"]
    repeats = args.repeats if args.repeats is not None else preset["repeats"]
    if not (tensors >= 1 and elements >= tensors and repeats >= 1 and args.warmup >= 0):
        parser.error(f"expected --tensors >= 1, --elements >= --tensors, --repeats >= 1, --warmup >= 0, got "
                     f"{tensors}, {elements}, {repeats}, {args.warmup}")

    device = args.device
    per_tensor = elements // tensors
    torch.manual_seed(0)
    params = [torch.randn(per_tensor, device=device).requires_grad_() for _ in range(tensors)]
    scale = 2.0**16
    for p in params:
        p.grad = torch.randn_like(p) * scale
    optimizer = torch.optim.SGD(params, lr=1e-6, foreach=True)
    grads = [p.grad for p in params]

    scalers = {
        "torch": torch.amp.GradScaler(device, init_scale=scale, growth_interval=10**9),
        "torch-control": torch.amp.GradScaler(device, init_scale=scale, growth_interval=10**9),
        "ampkit": ampkit.GradScaler(device, init_scale=scale, growth_interval=10**9),
    }
    assert tuple(scalers) == SCALERS
    for s in scalers.values():
        s.scale(torch.ones((), device=device))  # creates the scale on the device

    def iteration(name):
        s = scalers[name]
        sync(device)
        with Timer(CLOCK) as t:
            s.unscale_(optimizer)
            s.step(optimizer)
            s.update()
            sync(device)
        torch._foreach_mul_(grads, scale)  # back to scaled grads, exactly (power of two)
        return t.wall_s, t.cpu_s

    wall = {name: [] for name in scalers}
    cpu = {name: [] for name in scalers}
    names = list(scalers)
    load = OtherLoad().start()
    for i in range(args.warmup + repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # each goes first in turn
        for name in order:
            w, c = iteration(name)
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    load.stop()
    for name, s in scalers.items():
        assert s.get_scale() == scale, f"{name} changed the scale: a gradient overflowed"

    def pair_ratios(times, name):
        ratios = [a / t for a, t in zip(times[name], times["torch"])]
        return {"median": statistics.median(ratios), "p10": percentile(ratios, 0.1), "p90": percentile(ratios, 0.9)}

    result = {
        **header("grad_scaler", cpu_clock=CLOCK, device=device, other_load=load),
        "what": "GradScaler unscale_ + step + update (SGD foreach, fp32 grads)",
        "preset": args.preset,
        "elements": per_tensor * tensors,
        "tensors": tensors,
        "repeats": repeats,
        "warmup": args.warmup,
        "scalers": list(SCALERS),
    }
    result["results"] = {}
    for name in SCALERS:
        result["results"][name] = {**summary(wall[name], "ms", 1e3),
                        **{k.replace("_ms", "_cpu_ms"): v for k, v in summary(cpu[name], "ms", 1e3).items()}}
    for name in ("ampkit", "torch-control"):
        key = "ratio" if name == "ampkit" else "control_ratio"
        result[f"{key}_of_medians"] = statistics.median(wall[name]) / statistics.median(wall["torch"])
        result[f"{key}_of_cpu_medians"] = statistics.median(cpu[name]) / statistics.median(cpu["torch"])
        result[f"{key}_per_pair"] = pair_ratios(wall, name)
    result["target_ratio"] = 1.05

    print(f"{result['cpu']}, torch {result['torch']}, {result['threads']} threads: {result['elements']:,} fp32 grad "
          f"elements in {tensors} tensors on {device}, {repeats} repeats")
    for name in SCALERS:
        r = result["results"][name]
        print(f"  {name:14s} wall median {r['median_ms']:8.2f} ms  p10 {r['p10_ms']:8.2f}  p90 {r['p90_ms']:8.2f}   "
              f"CPU median {r['median_cpu_ms']:8.2f} ms")
    pr = result["ratio_per_pair"]
    print(f"  ampkit / torch: {result['ratio_of_medians']:.3f} wall, {result['ratio_of_cpu_medians']:.3f} CPU "
          f"(medians); per pair median {pr['median']:.3f}, p10 {pr['p10']:.3f}, p90 {pr['p90']:.3f} (target <= 1.05)")
    print(f"  torch-control / torch: {result['control_ratio_of_medians']:.3f} wall, "
          f"{result['control_ratio_of_cpu_medians']:.3f} CPU (the noise band)")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
