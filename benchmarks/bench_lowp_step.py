"""One AdamW step over low-precision parameters on the CPU or a CUDA device: ampkit's fused master-weight and
stochastic-rounding steps against the torch recipe that composes the same master step, and against
the fp32 fused step that torch-bf16 (torch.autocast) trains with, in bytes moved per parameter and
the bandwidth achieved.

Variants (AdamW, lr 1e-3, weight decay 0.01, no loss scale):

* ``ampkit-master``: ``ampkit.optim.AdamW(master_weights=True)`` on bf16 parameters and grads, a
  float32 master and float32 states: one pass reads grad 2 + master 4 + states 8 bytes and writes
  master 4 + states 8 + parameter 2 = 28 bytes per parameter.
* ``ampkit-sr-bf16``: ``AdamW(stochastic_rounding=True, state_dtype=torch.bfloat16)``, no master:
  reads grad 2 + parameter 2 + states 4, writes parameter 2 + states 4 = 14 bytes.
* ``ampkit-sr-fp32``: the same with float32 states: reads 2 + 2 + 8, writes 2 + 8 = 22 bytes.
* ``torch-composed-master``: the same master step from torch's parts: ``g32 = [g.float() for g in
  grads]`` (2 read, 4 written), ``torch._fused_adamw_`` on the float32 masters (28), then
  ``torch._foreach_copy_(params, masters)`` (4 read, 2 written): 40 bytes, in three passes.
* ``torch-fused-fp32``: ``torch.optim.AdamW(fused=True)`` on float32 parameters and grads, the
  optimizer step of torch-bf16 training: reads param 4 + grad 4 + states 8, writes param 4 +
  states 8 = 28 bytes. (torch's CPU kernel writes the grad back, 4 bytes more, only when it is given
  a loss scale to divide by; there is none here.)

The byte counts are those of the algorithm (each tensor read once and written once per pass), not
a hardware counter; the 4-byte step counters per tensor are left out. GB/s is those bytes over the
step's median wall time (and, beside it, over its process CPU time: all threads, so with two
threads that is about half the wall-time figure when both are busy). The variants run interleaved,
each repeat rotating which goes first; every repeat times one step of each.

Before timing, one step of ampkit-master and of torch-composed-master from the same state is
compared bitwise (masters, states and parameters): ``master_matches_composed`` in the JSON.

On CUDA (``--device cuda``: ampkit's CUDA kernels where the build has them) each step is timed with
device events, and there is no CPU time; the bitwise check is against torch's fused CUDA kernel.

    python benchmarks/bench_lowp_step.py [--device cpu|cuda] [--numel 4194304] [--tensors 4] [--repeats 21]
                                         [--json PATH]
"""
import argparse
import statistics
import time

import torch

import ampkit
from _common import CPU_CLOCKS, OtherLoad, cpu_model, header, percentile, write_json

CLOCK = "process"  # ampkit's kernels and torch's fused/foreach ops run on torch's intra-op threads
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01

# variant: (bytes read, bytes written) per parameter per step, and how they add up
BYTES = {
    "ampkit-master": (14, 14, "read grad 2 + master 4 + states 8; write master 4 + states 8 + param 2"),
    "ampkit-sr-bf16": (8, 6, "read grad 2 + param 2 + states 4; write param 2 + states 4"),
    "ampkit-sr-fp32": (12, 10, "read grad 2 + param 2 + states 8; write param 2 + states 8"),
    "torch-composed-master": (22, 18, "grad upcast: read 2, write 4; fused AdamW on masters: read 16, write 12; "
                                      "copy into params: read 4, write 2"),
    "torch-fused-fp32": (16, 12, "read param 4 + grad 4 + states 8; write param 4 + states 8"),
}
VARIANTS = list(BYTES)


class ComposedMaster:
    """torch's parts for a master-weight AdamW step on bf16 parameters: upcast the grads, the fused
    float32 AdamW on the masters (as torch.optim.AdamW(fused=True) calls it), copy back."""

    def __init__(self, params):
        self.params = params
        self.masters = [p.detach().float() for p in params]
        self.exp_avgs = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.masters]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def step(self):
        g32 = [p.grad.float() for p in self.params]
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(self.masters, g32, self.exp_avgs, self.exp_avg_sqs, [], self.steps, lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False, maximize=False)
        torch._foreach_copy_([p.detach() for p in self.params], self.masters)


def make(variant, base, grads):
    """(optimizer-like object with step(), its parameters) for one variant, on copies of base/grads."""
    if variant == "torch-fused-fp32":
        params = [b.float().requires_grad_() for b in base]
        for p, g in zip(params, grads):
            p.grad = g.float()
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True), params
    params = [b.clone().requires_grad_() for b in base]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if variant == "torch-composed-master":
        return ComposedMaster(params), params
    kwargs = {"ampkit-master": dict(master_weights=True),
              "ampkit-sr-bf16": dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=0),
              "ampkit-sr-fp32": dict(stochastic_rounding=True, state_dtype=torch.float32, seed=0)}[variant]
    return ampkit.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs), params


def master_matches_composed(base, grads):
    """One step of ampkit's master AdamW and of the composed torch recipe from the same state: the
    masters, states and parameters bitwise equal?"""
    opt, params = make("ampkit-master", base, grads)
    ref, ref_params = make("torch-composed-master", base, grads)
    opt.step()
    ref.step()
    same = True
    for i, p in enumerate(params):
        st = opt.state[p]
        same &= torch.equal(st["master"], ref.masters[i]) and torch.equal(p, ref_params[i])
        same &= torch.equal(st["exp_avg"], ref.exp_avgs[i]) and torch.equal(st["exp_avg_sq"], ref.exp_avg_sqs[i])
    return bool(same)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--numel", type=int, default=4 * 2**20, help="elements per tensor")
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in BYTES:
            p.error(f"--variants: expected names among {', '.join(VARIANTS)}, got {v!r}")
    if args.numel < 1 or args.tensors < 1 or args.repeats < 1:
        p.error("expected --numel, --tensors and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: expected a CUDA device, torch sees none")
    cuda = args.device == "cuda"

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(args.numel, generator=g).to(args.device, torch.bfloat16) for _ in range(args.tensors)]
    grads = [(torch.randn(args.numel, generator=g) * 1e-2).to(args.device, torch.bfloat16)
             for _ in range(args.tensors)]
    matches = master_matches_composed(base, grads)
    setups = {}
    for v in variants:
        opt, params = make(v, base, grads)
        opt.step()  # creates the states (and masters)
        setups[v] = opt
    del base, grads
    n = args.numel * args.tensors
    cpu_clock = CPU_CLOCKS[CLOCK][0]
    samples = {v: {"wall_ms": [], "cpu_ms": []} for v in setups}
    with OtherLoad() as load:
        for r in range(args.repeats):
            order = list(setups.items())
            order = order[r % len(order):] + order[:r % len(order)]  # each goes first in turn
            for v, opt in order:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    opt.step()
                    end.record()
                    end.synchronize()
                    samples[v]["wall_ms"].append(start.elapsed_time(end))
                    samples[v]["cpu_ms"].append(float("nan"))
                    continue
                c0, w0 = cpu_clock(), time.perf_counter()
                opt.step()
                w1, c1 = time.perf_counter(), cpu_clock()
                samples[v]["wall_ms"].append((w1 - w0) * 1e3)
                samples[v]["cpu_ms"].append((c1 - c0) * 1e3)
    results = []
    where = torch.cuda.get_device_name() if cuda else f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, {args.tensors} x "
          f"{args.numel:,} elements, AdamW, median of {args.repeats} interleaved steps")
    print(f"{'variant':24s} {'B/param':>8s} {'wall ms':>9s} {'cpu ms':>9s} {'GB/s wall':>10s} {'GB/s cpu':>9s}")
    for v, s in samples.items():
        read, written, how = BYTES[v]
        wall, cpu = statistics.median(s["wall_ms"]), statistics.median(s["cpu_ms"])
        total = (read + written) * n
        row = {"variant": v, "bytes_read_per_param": read, "bytes_written_per_param": written,
               "bytes_per_param": read + written, "bytes_accounting": how,
               "wall_ms": wall, "p10_ms": percentile(s["wall_ms"], 0.1), "p90_ms": percentile(s["wall_ms"], 0.9),
               "cpu_ms": cpu, "cpu_p10_ms": percentile(s["cpu_ms"], 0.1), "cpu_p90_ms": percentile(s["cpu_ms"], 0.9),
               "gb_per_s_wall": total / (wall * 1e-3) / 1e9, "gb_per_s_cpu": total / (cpu * 1e-3) / 1e9,
               "ns_per_param_wall": wall * 1e6 / n}
        results.append(row)
        print(f"{v:24s} {read + written:8d} {wall:9.2f} {cpu:9.2f} {row['gb_per_s_wall']:10.2f} "
              f"{row['gb_per_s_cpu']:9.2f}")
    by = {r["variant"]: r for r in results}
    for r in results:
        for ref in ("torch-composed-master", "torch-fused-fp32"):
            r[f"wall_over_{ref}"] = r["wall_ms"] / by[ref]["wall_ms"] if ref in by else None
            r[f"cpu_over_{ref}"] = r["cpu_ms"] / by[ref]["cpu_ms"] if ref in by else None
    print(f"ampkit master step bitwise equal to the composed torch step: {matches}")
    out = {**header("lowp_step", cpu_clock=None if cuda else CLOCK, device=args.device, other_load=load),
           "ampkit": ampkit.__version__, "cuda_kernels": ampkit._C._testing.cuda_kernels_built(),
           "numel": args.numel, "tensors": args.tensors, "params": n, "repeats": args.repeats,
           "optimizer": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD},
           "master_matches_composed": matches, "results": results}
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
