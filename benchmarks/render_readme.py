"""Renders README.md's benchmark tables from the JSON in benchmarks/results/.

Each table, with the sentence that says what ran where (the CPU model, torch version and thread
count come from the JSON), sits in README.md between two markers:

    <!-- results:NAME -->
    ... rendered, do not edit by hand ...
    <!-- /results -->

NAME is a key of BLOCKS, which names the JSON files each block is rendered from. Everything outside
the markers is hand-written. ``--check`` renders into memory and exits 1 (printing a diff) when the
README differs from the rendering, when a block is missing, unknown or twice, or when a JSON file in
benchmarks/results/ is rendered by no block (tests/python/test_benchmarks.py runs it).

    python benchmarks/render_readme.py [--check] [--readme README.md] [--results benchmarks/results]

The callgrind block shows an "ampkit, boxed kernels (before)" column only when its JSON's rows
hold ``ampkit_boxed_instr``.
"""
import argparse
import difflib
import json
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

CLOCK_WORDS = {
    "process": "process CPU time (`CLOCK_PROCESS_CPUTIME_ID`, all threads: the work runs on torch's intra-op "
               "threads too)",
    "thread": "the calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`; the work is single-threaded)",
}


# ----------------------------------------------------------------------------- formatting
def ms(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def us(v):
    return f"{v:.2f} us"


def ratio(v, digits=3, suffix=""):
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def pair(a, b, fmt):
    """"a / b", or "-" when both are missing."""
    if a is None and b is None:
        return "-"
    return f"{fmt(a)} / {fmt(b)}"


def spread(med, lo, hi):
    return f"{ms(med)} ({ms(lo)}-{ms(hi)})"


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def machine(d, flags=True, load=True):
    """"AMD EPYC (2 cores; avx2, ...), torch 2.13.0+cpu, 2 threads, load average ..." from a results header."""
    cores = f"{d['cpu_count']} cores" if d.get("cpu_count") else None
    ext = ", ".join(d["cpu_flags"]) if flags and d.get("cpu_flags") else None
    inner = "; ".join(x for x in (cores, ext) if x)
    out = d.get("cpu", "an unrecorded CPU") + (f" ({inner})" if inner else "")
    out += f", torch {d['torch']}"
    if d.get("threads") is not None:
        out += f", {plural(d['threads'], 'thread')}"
    if load and "other_load_cores" in d:
        out += f", {other_load(d)}"
    return out


def other_load(d):
    v = d.get("other_load_cores")
    if v is None:
        return "other processes' load not recorded"
    return f"other processes busy {v:.2f} cores on average during the run"


def clock(d):
    c = d.get("cpu_clock")
    return CLOCK_WORDS.get(c, f"CPU time ({c})") if c else "no CPU time (this file predates it)"


def rel(path):
    """Where the file lives in the repository (the README names that, wherever --results points)."""
    return "benchmarks/results/" + os.path.basename(path)


def paragraph(text):
    """One rendered sentence block, wrapped like the README's hand-written prose."""
    return textwrap.fill(text, width=110, break_long_words=False, break_on_hyphens=False)


# ----------------------------------------------------------------------------- blocks
def render_fp32_vs_amp(paths):
    (path,) = paths
    d = load(path)
    png = os.path.splitext(path)[0] + ".png"
    chart = f", chart `{rel(png)}`" if os.path.exists(png) else ""
    size = "tiny sizes" if d.get("tiny") else "default sizes"
    samples = sorted({r.get("samples", d["steps"]) for r in d["results"]})
    intro = (
        f"The main job, `python benchmarks/fp32_vs_amp.py` (what `scripts/run_main.sh` runs), on {machine(d)}, "
        f"{size}, {d['steps']} timed steps per mode after {plural(d['warmup'], 'warm-up step')}, modes interleaved in "
        f"chunks of {d.get('chunk', '?')} ({'/'.join(map(str, samples))} samples per mode; `{rel(path)}`{chart}). "
        f"Times are medians (p10-p90) per step of wall time and of {clock(d)}. ÷ peer: the mode's time over its "
        f"peer's (torch's AMP of the same dtype for ampkit's modes, the original for a control copy)"
    )
    per_param = any("param_bytes_per_param" in r for r in d["results"])
    opt_time = any(r.get("optimizer_ms") is not None for r in d["results"])
    if opt_time:
        intro += ". opt. ms: the median wall time per step spent inside `optimizer.step`"
    if per_param:
        intro += (". Param B: parameter-related bytes per parameter, counted from tensor storages (parameters, "
                  "grads, optimizer states and float32 masters, autocast's cached weight casts; see the script's "
                  "docstring)")
    rows = []
    for r in d["results"]:
        peer = "-" if not r.get("peer") else (
            f"{r['peer']}: {ratio(r['ratio_vs_torch'])} / {ratio(r.get('ratio_vs_torch_cpu'))}")
        mem = r.get("peak_mem_mb")
        row = [
            r["model"], r["mode"], spread(r["step_ms"], r["p10_ms"], r["p90_ms"]),
            spread(r["cpu_ms"], r["cpu_p10_ms"], r["cpu_p90_ms"]) if "cpu_ms" in r else "-",
        ] + ([ms(r.get("optimizer_ms"))] if opt_time else []) + [
            pair(r["speedup_vs_fp32"], r.get("speedup_vs_fp32_cpu"), lambda v: ratio(v, 2, "x")), peer,
            "-" if mem is None or mem != mem else f"{mem:.0f}",
        ]
        if per_param:
            b = r.get("param_bytes_per_param")
            row.append("-" if b is None else f"{b:.2f}")
        rows.append(row + [f"{r['loss_rel_diff']:.2%}"])
    head = (["model", "mode", "wall ms (p10-p90)", "CPU ms (p10-p90)"] + (["opt. ms"] if opt_time else [])
            + ["speedup vs fp32, wall / CPU", "÷ peer, wall / CPU", "peak MB"] + (["param B"] if per_param else [])
            + ["loss diff vs fp32"])
    return paragraph(intro + ":") + "\n\n" + table(head, rows) + lowp_goals(d["results"])


# The goals for the low-precision-parameter modes against torch-bf16 in the same run.
LOWP_GOALS = {"ampkit-bf16-master": 16.0, "ampkit-bf16-sr": 8.0}  # bytes per parameter, at most
LOWP_TIME_GOAL, LOWP_LOSS_GOAL = 0.95, 0.01


def lowp_goals(results):
    """One line per model and low-precision-parameter mode: its numbers beside the goals, with the
    control's noise band ("" when the results have no such mode)."""
    by_key = {(r["model"], r["mode"]): r for r in results}
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        control = by_key.get((model, "torch-bf16-control"))
        band = "" if control is None or control.get("ratio_vs_torch") is None else (
            f" (torch-bf16-control: {pair(control['ratio_vs_torch'], control.get('ratio_vs_torch_cpu'), ratio)})")
        torch_b = by_key.get((model, "torch-bf16"), {}).get("param_bytes_per_param")
        for mode, goal in LOWP_GOALS.items():
            r = by_key.get((model, mode))
            if r is None or r.get("ratio_vs_torch") is None or r.get("param_bytes_per_param") is None:
                continue
            met = lambda ok: "met" if ok else "not met"  # noqa: E731
            t, b, loss = r["ratio_vs_torch"], r["param_bytes_per_param"], r["loss_rel_diff"]
            mem = r.get("param_memory", {})
            counters = mem.get("step_counters_per_param")
            fp32 = mem.get("float32_numel", 0) / mem["numel"] if mem.get("numel") else 0
            why = ([f"{counters:.2g} of it the per-tensor step counters"] if counters else []) + (
                [f"{fp32:.2%} of the parameters float32 (the norm layers cast_model keeps)"] if fp32 else [])
            text = (f"- {model}, {mode}: time over torch-bf16 {pair(t, r.get('ratio_vs_torch_cpu'), ratio)} "
                    f"(wall / CPU; goal <= {LOWP_TIME_GOAL}: {met(t <= LOWP_TIME_GOAL)}){band}; "
                    f"{b:.5f} bytes per parameter" + "".join(f", {w}" for w in why)
                    + f" (goal <= {goal:g}: {met(b <= goal)}"
                    + (f"; torch-bf16 {torch_b:.2f}" if torch_b is not None else "") + "); "
                    f"loss {loss:.2%} from fp32 (goal <= {LOWP_LOSS_GOAL:.0%}: {met(loss <= LOWP_LOSS_GOAL)}).")
            lines.append(textwrap.fill(text, width=110, subsequent_indent="  ", break_long_words=False,
                                       break_on_hyphens=False))
    return "\n\n" + "\n".join(lines) if lines else ""


def render_fp32_vs_amp_cpp(paths):
    (path,) = paths
    d = load(path)
    size = "tiny sizes" if d.get("tiny") else "default sizes"
    intro = (
        f"`build/benchmarks/fp32_vs_amp_cpp` on {machine(d)}, {size}, {d['samples']} samples per mode, each the mean "
        f"of a chunk of {plural(d['chunk'], 'step')}, modes interleaved chunk by chunk after "
        f"{plural(d['warmup'], 'warm-up step')} "
        f"(`{rel(path)}`). Times are medians (p10-p90) per step of wall time and of {clock(d)}; every ratio is given "
        f"for both (wall / CPU). Gain over the stock loop: fp32's time over the mode's. AMP gain: the same loop's "
        f"fp32 time (fp32 for torch-bf16, ampkit-fp32 for ampkit's) over the mode's. ÷ peer: the mode's time over "
        f"its peer's (the torch loop of the same precision for ampkit's modes, the original for a control copy)"
    )
    rows = []
    by_key = {}
    for r in d["results"]:
        by_key[(r["model"], r["mode"])] = r
        x2 = lambda v: ratio(v, 2, "x")  # noqa: E731
        peer = "-" if not r.get("peer") else f"{r['peer']}: {pair(r['ratio_vs_peer'], r['ratio_vs_peer_cpu'], ratio)}"
        rows.append([
            r["model"], r["mode"], spread(r["step_ms"], r["p10_ms"], r["p90_ms"]),
            spread(r["cpu_ms"], r["cpu_p10_ms"], r["cpu_p90_ms"]),
            pair(r["speedup_vs_fp32"], r["speedup_vs_fp32_cpu"], x2),
            pair(r["amp_gain"], r["amp_gain_cpu"], x2), peer, f"{r['loss_rel_diff']:.2%}",
        ])
    head = ["model", "mode", "wall ms (p10-p90)", "CPU ms (p10-p90)", "gain over stock fp32 loop", "AMP gain",
            "÷ peer", "loss diff vs fp32"]
    out = paragraph(intro + ":") + "\n\n" + table(head, rows)
    # The three numbers the benchmark exists for, per model, with the control's noise band beside.
    lines = []
    for model in dict.fromkeys(r["model"] for r in d["results"]):
        bf16 = by_key.get((model, "ampkit-bf16"))
        if bf16 is None:
            continue
        parts = [f"AMP gain {pair(bf16['amp_gain'], bf16['amp_gain_cpu'], lambda v: ratio(v, 2, 'x'))}",
                 f"gain over the stock fp32 loop "
                 f"{pair(bf16['speedup_vs_fp32'], bf16['speedup_vs_fp32_cpu'], lambda v: ratio(v, 2, 'x'))}"]
        if bf16.get("peer") == "torch-bf16":
            parts.append(f"time over torch-bf16's {pair(bf16['ratio_vs_peer'], bf16['ratio_vs_peer_cpu'], ratio)}")
        for lowp in ("ampkit-bf16-master", "ampkit-bf16-sr"):
            r = by_key.get((model, lowp))
            if r is not None and r.get("peer") == "torch-bf16":
                parts.append(f"{lowp} over torch-bf16 {pair(r['ratio_vs_peer'], r['ratio_vs_peer_cpu'], ratio)}")
        controls = [r for (m, _), r in by_key.items() if m == model and r["mode"].endswith("-control")]
        for c in controls:
            parts.append(f"{c['mode']} over {c['peer']} {pair(c['ratio_vs_peer'], c['ratio_vs_peer_cpu'], ratio)} "
                         f"(the noise band)")
        lines.append(textwrap.fill(f"- {model}, ampkit-bf16 (wall / CPU): " + "; ".join(parts) + ".", width=110,
                                   subsequent_indent="  ", break_long_words=False, break_on_hyphens=False))
    if lines:
        out += "\n\n" + "\n".join(lines)
    return out


def render_autocast_overhead(paths):
    (path,) = paths
    d = load(path)
    modes = d.get("modes", ["none", "torch", "torch-control", "ampkit"])
    intro = (
        f"Per-call cost of the dispatcher kernel (`python benchmarks/bench_autocast_overhead.py`, {machine(d)}, "
        f"device {d['device']}, dtype {d['dtype'].replace('torch.', '')}, median of {d['rounds']} interleaved rounds of "
        f"{d['calls']} calls; wall time and {clock(d)}; `{rel(path)}`). torch-control is a second, identical "
        f"torch.autocast region: its ratio to torch.autocast is the noise band"
    )
    names = {"none": "no autocast", "torch": "torch.autocast", "torch-control": "torch-control",
             "ampkit": "ampkit.autocast"}
    rows = []
    for r in d["results"]:
        for kind, key, label in (("wall", "median_us", "wall"), ("cpu", "median_cpu_us", "thread CPU")):
            rows.append([r["op"], label] + [us(r[m][key]) for m in modes] + [
                ratio(r[f"ampkit_over_torch_{kind}"], 3, "x"), ratio(r[f"control_over_torch_{kind}"], 3, "x"),
                ratio(r[f"ampkit_over_none_{kind}"], 3, "x")])
    head = ["op", "clock"] + [names.get(m, m) for m in modes] + ["ampkit / torch", "control / torch",
                                                                  "ampkit / none"]
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


def render_autocast_instructions(paths):
    (path,) = paths
    d = load(path)
    rows_in = d["results"]
    split = all("torch_instr_no_malloc" in r for r in rows_in)  # results since the allocator was split out
    armed = all("ampkit_cuda_armed_instr" in r for r in rows_in)
    boxed = all("ampkit_boxed_instr" in r for r in rows_in)  # a before/after comparison of the boxed kernels
    intro = (
        f"The same in instructions per call, which do not vary with the machine's load (`python "
        f"benchmarks/bench_autocast_instructions.py`, callgrind, {d['calls']} calls each, {machine(d, flags=False)}; "
        f"`{rel(path)}`; each total is everything `at::_ops::<op>::call` runs"
        + ("; each cell is all instructions / those outside glibc's allocator, whose work per call depends on "
           "what the process allocated before (two modes running the same torch code differ there alone)"
           if split else "")
        + ")"
    )

    def cell(r, mode):
        if split and mode + "_instr_no_malloc" in r:
            return f"{r[mode + '_instr']:,.0f} / {r[mode + '_instr_no_malloc']:,.0f}"
        return f"{r[mode + '_instr']:,.0f}"

    modes = ["none", "torch"] + (["ampkit_boxed"] if boxed else []) + ["ampkit"]
    modes += ["ampkit_cuda_armed"] if armed else []
    names = {"none": "no autocast", "torch": "torch.autocast", "ampkit_boxed": "ampkit, boxed kernels (before)",
             "ampkit": "ampkit.autocast", "ampkit_cuda_armed": "ampkit.autocast, CUDA table registered"}
    head = ["op"] + [names[m] for m in modes] + ["ampkit / torch"]
    rows = []
    for r in rows_in:
        key = "_instr_no_malloc" if split else "_instr"
        rows.append([r["op"]] + [cell(r, m) for m in modes] + [ratio(r["ampkit" + key] / r["torch" + key])])
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


def render_grad_scaler(paths):
    data = [(p, load(p)) for p in paths]
    machines = {machine(d, load=False) for _, d in data}
    where = (f"on {machines.pop()}" if len(machines) == 1 else
             "on " + " and ".join(f"{machine(d, load=False)} (`{os.path.basename(p)}`)" for p, d in data))
    where += " (" + ", ".join(f"{d.get('preset', os.path.basename(p))}: {other_load(d)}" for p, d in data) + ")"
    clocks = {clock(d) for _, d in data}
    files = ", ".join(f"`{rel(p)}`" for p, _ in data)
    intro = (
        f"GradScaler `unscale_` + `step` + `update` on fp32 grads with SGD foreach (`python "
        f"benchmarks/bench_grad_scaler.py --preset large|small`) {where}; medians of "
        f"{'/'.join(sorted({str(d['repeats']) for _, d in data}))} interleaved repeats, wall time and "
        f"{' / '.join(sorted(clocks))}; {files}. torch-control is a second, identical torch.amp.GradScaler: its "
        f"ratio to torch is the noise band"
    )
    rows = []
    for _, d in data:
        res = d["results"]
        rows.append([
            d.get("preset", "-"), f"{d['elements']:,} in {d['tensors']:,} tensors",
            *(pair(res[n]["median_ms"], res[n]["median_cpu_ms"], ms) for n in ("torch", "torch-control", "ampkit")),
            f"**{ratio(d['ratio_of_medians'])}** / {ratio(d['ratio_of_cpu_medians'])}",
            pair(d["control_ratio_of_medians"], d["control_ratio_of_cpu_medians"], ratio),
        ])
    head = ["preset", "grad elements", "torch ms, wall / CPU", "torch-control ms", "ampkit ms", "ampkit / torch",
            "control / torch"]
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


def render_sgd_lowp(paths):
    (path,) = paths
    d = load(path)
    intro = (
        f"SGD with momentum on bf16/fp16 parameters on the CPU (`python benchmarks/bench_sgd_lowp.py`, "
        f"{machine(d)}, {d['tensors']} tensors of {d['numel']:,} elements, nesterov and weight decay, median of "
        f"{d['repeats']} interleaved steps, wall time and {clock(d)}; `{rel(path)}`)"
    )
    rows = []
    for r in d["results"]:
        m = r["median"]
        rows.append([r["dtype"], *(pair(m[n]["wall_ms"], m[n]["cpu_ms"], ms)
                                   for n in ("torch-foreach", "torch-control", "ampkit")),
                     f"**{ratio(r['ampkit_over_torch_foreach_wall'])}** / "
                     f"{ratio(r.get('ampkit_over_torch_foreach_cpu'))}",
                     pair(r["control_over_torch_foreach_wall"], r.get("control_over_torch_foreach_cpu"), ratio)])
    head = ["dtype", "torch foreach ms, wall / CPU", "torch control ms", "ampkit ms", "ampkit / torch",
            "control / torch"]
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


def render_diagnostics(paths):
    (path,) = paths
    d = load(path)
    size = "the smoke-test size" if d.get("tiny") else "the benchmark's size"
    intro = (
        f"What the diagnostics cost on the FP32-vs-AMP benchmark's {d['model']} step ({size}, ampkit-{d['dtype']}, "
        f"ampkit.Trainer; `python benchmarks/bench_diagnostics.py`, {machine(d)}, medians of "
        f"{d['rounds'] * d['steps_per_round']} steps per mode in {d['rounds']} interleaved rounds, each step "
        f"opening and closing its own report or locator, wall time and {clock(d)}; `{rel(path)}`; the report of "
        f"one step has {d['report_rows']} rows). plain-control is a second, identical plain run: its ratio is the "
        f"noise band"
    )
    names = {"plain": "the step alone", "plain-control": "the step alone (control)",
             "report": "inside `precision_report(model)`", "locator": "inside `overflow_locator(model)`"}
    rows = [[names.get(r["mode"], r["mode"]), pair(r["median_ms"], r["cpu_median_ms"], ms),
             f"**{ratio(r['wall_ratio'])}** / {ratio(r['cpu_ratio'])}"] for r in d["results"]]
    return paragraph(intro + ":") + "\n\n" + table(["mode", "step ms, wall / CPU", "ratio to the step alone"], rows)


def render_lowp_step(paths):
    (path,) = paths
    d = load(path)
    intro = (
        f"One AdamW step over {d['tensors']} tensors of {d['numel']:,} elements ({d['params']:,} parameters) on "
        f"the CPU (`python benchmarks/bench_lowp_step.py`, {machine(d)}, median of {d['repeats']} interleaved "
        f"steps, wall time and {clock(d)}; `{rel(path)}`). Bytes per parameter are the algorithm's minimum for "
        f"the variant (every tensor it touches read once, written once; step counters left out), GB/s those "
        f"bytes over the median time. The composed torch recipe upcasts the bf16 grads, runs "
        f"`torch._fused_adamw_` on float32 masters and copies the masters into the bf16 parameters; "
        f"torch-fused-fp32 is the optimizer step of torch-bf16 training (float32 parameters and grads). "
        f"ampkit's master step is "
        f"{'bitwise equal' if d.get('master_matches_composed') else 'NOT bitwise equal'} to the composed one"
    )
    names = {"ampkit-master": "ampkit, master_weights", "ampkit-sr-bf16": "ampkit, stochastic rounding, bf16 states",
             "ampkit-sr-fp32": "ampkit, stochastic rounding, fp32 states",
             "torch-composed-master": "torch composed: upcast + fused AdamW on masters + copy",
             "torch-fused-fp32": "torch fused AdamW, fp32 params (torch-bf16's step)"}
    rows = []
    for r in d["results"]:
        rows.append([
            names.get(r["variant"], r["variant"]),
            f"{r['bytes_per_param']} ({r['bytes_read_per_param']} + {r['bytes_written_per_param']})",
            pair(r["wall_ms"], r["cpu_ms"], ms),
            f"**{r['gb_per_s_wall']:.1f}** / {r['gb_per_s_cpu']:.1f}",
            pair(r.get("wall_over_torch-composed-master"), r.get("cpu_over_torch-composed-master"), ratio),
            pair(r.get("wall_over_torch-fused-fp32"), r.get("cpu_over_torch-fused-fp32"), ratio),
        ])
    head = ["variant", "bytes/param (read + write)", "ms, wall / CPU", "GB/s, wall / CPU", "÷ composed, wall / CPU",
            "÷ torch fused fp32"]
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


def render_convergence_lowp(paths):
    (path,) = paths
    d = load(path)
    png = os.path.splitext(path)[0] + ".png"
    chart = f", curves `{rel(png)}`" if os.path.exists(png) else ""
    s = d["size"]
    o = d["optimizer"]
    intro = (
        f"Convergence (`python benchmarks/convergence_lowp.py`, {machine(d)}; `{rel(path)}`{chart}): a GPT "
        f"({d['params']:,} parameters: {s['layers']} pre-norm causal blocks of width {s['d_model']}, {s['heads']} "
        f"heads, vocabulary {s['vocab']}, tied LM head) trained for {d['steps']} AdamW steps (lr {o['lr']:g}, "
        f"{o['warmup_steps']} warm-up steps, weight decay {o['weight_decay']:g}) on batches of {s['batch']} x "
        f"{s['seq']} tokens of a random Markov chain, the same initial weights and batches in every mode. Final "
        f"loss: the mean of the last {d['final_window']} steps (a blind guess scores "
        f"{d['initial_loss_uniform']:.3f}, a model that knows the chain {d['entropy_floor']:.3f}); the goal is within "
        f"{d.get('goal_rel_diff', 0.02):.0%} of fp32"
    )
    reference = d.get("reference_modes", [])
    if reference:
        intro += (f". {', '.join(reference)}: bf16 parameters whose AdamW updates are rounded to nearest (no master, "
                  f"no stochastic rounding), a reference for what the recipes avoid, not held to the goal")
    base = d["runs"].get("fp32", {}).get("final_loss")
    rows = []
    for mode, r in d["runs"].items():
        diff = r.get("rel_diff_vs_fp32")
        if base is None or mode == "fp32":
            verdict = "-"
        elif mode in reference:
            verdict = "(reference)"
        else:
            verdict = "met" if abs(diff) <= d.get("goal_rel_diff", 0.02) else "not met"
        rows.append([mode, f"{r['final_loss']:.4f}", "-" if diff is None else f"**{diff:+.2%}**", verdict,
                     ms(r["step_ms"])])
    head = ["mode", "final loss", "vs fp32", "within goal", "median step ms"]
    return paragraph(intro + ":") + "\n\n" + table(head, rows)


# name -> (renderer, the JSON files under the results directory it reads)
BLOCKS = {
    "fp32_vs_amp_cpu": (render_fp32_vs_amp, ["fp32_vs_amp_cpu.json"]),
    "fp32_vs_amp_cpp_cpu": (render_fp32_vs_amp_cpp, ["fp32_vs_amp_cpp_cpu.json"]),
    "autocast_overhead_cpu": (render_autocast_overhead, ["autocast_overhead_cpu.json"]),
    "autocast_instructions_cpu": (render_autocast_instructions, ["autocast_instructions_cpu.json"]),
    "grad_scaler_cpu": (render_grad_scaler, ["grad_scaler_cpu.json", "grad_scaler_small_cpu.json"]),
    "sgd_lowp_cpu": (render_sgd_lowp, ["sgd_lowp_cpu.json"]),
    "lowp_step_cpu": (render_lowp_step, ["lowp_step_cpu.json"]),
    "convergence_lowp_cpu": (render_convergence_lowp, ["convergence_lowp_cpu.json"]),
    "diagnostics_cpu": (render_diagnostics, ["diagnostics_cpu.json"]),
}


def load(path):
    with open(path) as f:
        return json.load(f)


class RenderError(Exception):
    pass


def render(readme, results_dir):
    """The README with every block re-rendered from results_dir. Raises RenderError for a missing,
    unknown or repeated block, or a JSON file that no block renders."""
    found = [m.group("name") for m in MARKER.finditer(readme)]
    problems = []
    for name in found:
        if name not in BLOCKS:
            problems.append(f"README block {name!r} has no renderer (known: {', '.join(BLOCKS)})")
        elif found.count(name) > 1:
            problems.append(f"README block {name!r} appears {found.count(name)} times")
    for name in BLOCKS:
        if name not in found:
            problems.append(f"README has no block <!-- results:{name} --> ... <!-- /results -->")
    used = {f for _, files in BLOCKS.values() for f in files}
    present = {f for f in os.listdir(results_dir) if f.endswith(".json")}
    for f in sorted(present - used):
        problems.append(f"{f} in {results_dir} is rendered by no README block (add one to BLOCKS)")
    for f in sorted(used - present):
        problems.append(f"{f} is missing from {results_dir}")
    if problems:
        raise RenderError("\n".join(sorted(set(problems))))

    def block(m):
        fn, files = BLOCKS[m.group("name")]
        body = fn([os.path.join(results_dir, f) for f in files])
        return f"{m.group(1)}\n{body}\n\n{m.group(4)}"

    return MARKER.sub(block, readme)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendering")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        old = f.read()
    try:
        new = render(old, args.results)
    except RenderError as e:
        print(e, file=sys.stderr)
        return 1
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), args.readme,
                                                       "rendered from " + args.results))
            print(f"\n{args.readme} differs from the results: run python benchmarks/render_readme.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"rewrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
