"""What ampkit.precision_report and ampkit.overflow_locator cost on a training step.

Runs the FP32-vs-AMP benchmark's transformer step (benchmarks/fp32_vs_amp.py: an encoder block,
ampkit.Trainer with ampkit.optim.AdamW under ampkit.autocast) in four modes, interleaved in rounds
so that the machine's noise hits them alike:

* ``plain``: the step alone;
* ``plain-control``: the same again; its ratio to ``plain`` is the noise band of the ratios;
* ``report``: the step inside ``ampkit.precision_report(model)``;
* ``locator``: the step inside ``ampkit.overflow_locator(model)`` (every output read once).

Each step opens and closes its own report or locator (what a user does around the step they
inspect), so the numbers include that too. Time: median per-step wall time and process CPU time
(all threads: the step's ops run on torch's intra-op workers), and each mode's ratio to ``plain``.
The tools cost nothing when none is open: nothing of theirs runs (see the note in README).

    python benchmarks/bench_diagnostics.py [--model transformer] [--dtype bf16] [--rounds 8] [--steps 3]
        [--tiny] [--json PATH]
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

import ampkit
from _common import CPU_CLOCKS, OtherLoad, header, summary, write_json
from fp32_vs_amp import Run

MODES = ["plain", "plain-control", "report", "locator"]
CPU_CLOCK = "process"


def tool(mode, model):
    if mode == "report":
        return ampkit.precision_report(model)
    if mode == "locator":
        return ampkit.overflow_locator(model)
    return contextlib.nullcontext()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="transformer", choices=["mlp", "transformer", "cnn"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the first round")
    p.add_argument("--tiny", action="store_true", help="the smoke-test model size")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name, value in (("--rounds", args.rounds), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{name}: expected a positive number, got {value}")

    cpu_clock = CPU_CLOCKS[CPU_CLOCK][0]
    runs = {m: Run(args.model, f"ampkit-{args.dtype}", "cpu", seed=0, tiny=args.tiny) for m in MODES}
    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    rows_seen = {}
    for m in MODES:
        for _ in range(args.warmup):
            with tool(m, runs[m].model):
                runs[m].step()
    with OtherLoad() as load:
        for _ in range(args.rounds):
            for m in MODES:
                run = runs[m]
                for _ in range(args.steps):
                    c0, t0 = cpu_clock(), time.perf_counter()
                    with tool(m, run.model) as t:
                        run.step()
                    t1, c1 = time.perf_counter(), cpu_clock()
                    wall[m].append((t1 - t0) * 1e3)
                    cpu[m].append((c1 - c0) * 1e3)
                    if m == "report":
                        rows_seen[m] = len(t.rows)
                    if m == "locator" and t.first is not None:
                        sys.exit(f"the locator found an overflow in the benchmark step: {t.first}")

    base_wall, base_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    results = []
    print(f"{args.model} step, ampkit-{args.dtype}, CPU ({torch.get_num_threads()} threads); "
          f"other load {load.cores} cores")
    print(f"{'mode':<15}{'wall ms':>10}{'cpu ms':>10}{'wall ratio':>12}{'cpu ratio':>11}")
    for m in MODES:
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        row = {"mode": m, **summary(wall[m]), **{f"cpu_{k}": v for k, v in summary(cpu[m]).items()},
               "wall_ratio": w / base_wall, "cpu_ratio": c / base_cpu, "samples": len(wall[m])}
        results.append(row)
        print(f"{m:<15}{w:>10.2f}{c:>10.2f}{w / base_wall:>12.3f}{c / base_cpu:>11.3f}")
    if "report" in rows_seen:
        print(f"(the report of one step has {rows_seen['report']} rows)")
    if args.json:
        out = header("diagnostics", cpu_clock=CPU_CLOCK, other_load=load)
        out.update(model=args.model, dtype=args.dtype, tiny=args.tiny, rounds=args.rounds,
                   steps_per_round=args.steps, report_rows=rows_seen.get("report"), results=results)
        write_json(args.json, out)
    return results


if __name__ == "__main__":
    main()
