"""SGD with momentum on bf16 / fp16 parameters on the CPU: ampkit.optim.SGD (one fused pass in
float32 opmath per tensor) against torch.optim.SGD(foreach=True), the fastest correct torch path
there (torch's CPU fused kernel misreads these buffers).

Interleaved repeats, median wall time and process CPU time (all threads) per step, and minor page
faults per step (temporaries that the allocator has to fault in).

    python benchmarks/bench_sgd_lowp.py [--dtype bfloat16] [--numel 2500000] [--tensors 4] [--repeats 31] [--json PATH]
"""
import argparse
import json
import platform
import resource
import statistics
import time

import torch

import ampkit


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--numel", type=int, default=2_500_000)
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--json")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(args.numel, generator=g).to(dtype) for _ in range(args.tensors)]
    grads = [torch.randn(args.numel, generator=g).to(dtype) for _ in range(args.tensors)]
    kwargs = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    setups = {}
    for name, make in (("torch-foreach", lambda ps: torch.optim.SGD(ps, foreach=True, **kwargs)),
                       ("ampkit", lambda ps: ampkit.optim.SGD(ps, **kwargs))):
        params = [t.clone().requires_grad_() for t in base]
        for q, gr in zip(params, grads):
            q.grad = gr.clone()
        opt = make(params)
        opt.step()  # creates the momentum buffers
        setups[name] = opt
    samples = {n: {"wall_ms": [], "cpu_ms": [], "faults": []} for n in setups}
    for r in range(args.repeats):
        order = list(setups.items())
        if r % 2:
            order.reverse()
        for name, opt in order:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, w0 = time.process_time(), time.perf_counter()
            opt.step()
            w1, c1 = time.perf_counter(), time.process_time()
            samples[name]["wall_ms"].append((w1 - w0) * 1e3)
            samples[name]["cpu_ms"].append((c1 - c0) * 1e3)
            samples[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    ratio = med["ampkit"]["wall_ms"] / med["torch-foreach"]["wall_ms"]
    print(f"CPU {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tensors} x "
          f"{args.numel} {args.dtype}, SGD momentum 0.9 nesterov, median of {args.repeats}")
    for n, m in med.items():
        print(f"{n:14s} wall {m['wall_ms']:8.2f} ms  cpu {m['cpu_ms']:8.2f} ms  page faults {m['faults']:8.0f}")
    print(f"ampkit / torch-foreach (wall): {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "dtype": args.dtype, "numel": args.numel, "tensors": args.tensors, "repeats": args.repeats,
                       "median": med, "ampkit_over_torch_foreach_wall": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
