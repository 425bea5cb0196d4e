"""SGD with momentum on bf16 / fp16 parameters on the CPU: ampkit.optim.SGD (one fused pass in
float32 opmath per tensor) against torch.optim.SGD(foreach=True), the fastest correct torch path
there (torch's CPU fused kernel misreads these buffers).

Interleaved repeats, median wall time and process CPU time (all threads) per step, and minor page
faults per step (temporaries that the allocator has to fault in).

    python benchmarks/bench_sgd_lowp.py [--dtype bfloat16 float16] [--numel 2500000] [--tensors 4] [--repeats 31] [--json PATH]

The JSON records the CPU model and the vector extensions that pick ampkit's kernel copy (AVX-512,
AVX2 with F16C, or the baseline).
"""
import argparse
import resource
import statistics
import time

import torch

import ampkit
from _common import CPU_CLOCKS, OtherLoad, cpu_model, header, percentile, write_json

CLOCK = "process"  # the kernels (torch's foreach and ampkit's) run on torch's intra-op threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    p.add_argument("--numel", type=int, default=2_500_000)
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--json")
    args = p.parse_args(argv)
    with OtherLoad() as load:
        results = [run(getattr(torch, d), args) for d in args.dtype]
    out = {**header("sgd_lowp", cpu_clock=CLOCK, other_load=load), "numel": args.numel, "tensors": args.tensors,
           "repeats": args.repeats, "results": results}
    if args.json:
        write_json(args.json, out)
    return out


def run(dtype, args):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(args.numel, generator=g).to(dtype) for _ in range(args.tensors)]
    grads = [torch.randn(args.numel, generator=g).to(dtype) for _ in range(args.tensors)]
    kwargs = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    setups = {}
    # "torch-control" is a second torch optimizer, identical to the first: its ratio to torch-foreach
    # shows how far two runs of the same code differ here (the noise floor of the ampkit ratio).
    for name, make in (("torch-foreach", lambda ps: torch.optim.SGD(ps, foreach=True, **kwargs)),
                       ("torch-control", lambda ps: torch.optim.SGD(ps, foreach=True, **kwargs)),
                       ("ampkit", lambda ps: ampkit.optim.SGD(ps, **kwargs))):
        params = [t.clone().requires_grad_() for t in base]
        for q, gr in zip(params, grads):
            q.grad = gr.clone()
        opt = make(params)
        opt.step()  # creates the momentum buffers
        setups[name] = opt
    cpu_clock = CPU_CLOCKS[CLOCK][0]
    samples = {n: {"wall_ms": [], "cpu_ms": [], "faults": []} for n in setups}
    for r in range(args.repeats):
        order = list(setups.items())
        order = order[r % len(order):] + order[:r % len(order)]  # each goes first in turn
        for name, opt in order:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, w0 = cpu_clock(), time.perf_counter()
            opt.step()
            w1, c1 = time.perf_counter(), cpu_clock()
            samples[name]["wall_ms"].append((w1 - w0) * 1e3)
            samples[name]["cpu_ms"].append((c1 - c0) * 1e3)
            samples[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    p10 = {n: {k: percentile(v, 0.1) for k, v in s.items()} for n, s in samples.items()}
    p90 = {n: {k: percentile(v, 0.9) for k, v in s.items()} for n, s in samples.items()}
    ratio = med["ampkit"]["wall_ms"] / med["torch-foreach"]["wall_ms"]
    control = med["torch-control"]["wall_ms"] / med["torch-foreach"]["wall_ms"]
    ratio_cpu = med["ampkit"]["cpu_ms"] / med["torch-foreach"]["cpu_ms"]
    control_cpu = med["torch-control"]["cpu_ms"] / med["torch-foreach"]["cpu_ms"]
    print(f"CPU {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tensors} x "
          f"{args.numel} {dtype}, SGD momentum 0.9 nesterov, median of {args.repeats}")
    for n, m in med.items():
        print(f"{n:14s} wall {m['wall_ms']:8.2f} ms  cpu {m['cpu_ms']:8.2f} ms  page faults {m['faults']:8.0f}")
    print(f"ampkit / torch-foreach: wall {ratio:.3f}, CPU {ratio_cpu:.3f}   control: torch-control / torch-foreach "
          f"wall {control:.3f}, CPU {control_cpu:.3f}")
    return {"dtype": str(dtype).split(".")[1], "median": med, "p10": p10, "p90": p90,
            "ampkit_over_torch_foreach_wall": ratio, "control_over_torch_foreach_wall": control,
            "ampkit_over_torch_foreach_cpu": ratio_cpu, "control_over_torch_foreach_cpu": control_cpu}


if __name__ == "__main__":
    main()
