"""FP32 vs AMP: speed, memory and accuracy of real small training workloads.

Trains an MLP, a Transformer encoder block (attention + MLP + LayerNorm), a small CNN and a small
GPT-like language model (token and position embeddings, pre-norm causal blocks, final LayerNorm, LM
head tied to the token embedding, next-token cross-entropy on synthetic Markov-chain text) with the
same seed and data in every mode, interleaving the modes in chunks so that the machine's noise
hits them alike, and reports per model and mode: median step time (p10/p90), throughput,
speedup over fp32, ratio to torch's own AMP, peak memory, final loss and its relative
difference from fp32, skipped steps and parameter-related memory in bytes per parameter.

Time: every step's wall time and the process's CPU time (time.process_time, all threads: torch's
CPU ops run on its intra-op worker threads, so the calling thread's CPU time would miss their
share). Other processes on a shared machine lengthen the wall time of a step more than its CPU
time. On CUDA the wall time comes from CUDA events and the CPU time is the host's (enqueueing).

Optimizer time (CPU): the median wall time per step spent inside ``optimizer.step`` (whoever calls
it: the loop, torch's GradScaler or ampkit.Trainer), to see how much of a step is the update.

Peak memory: on CUDA torch.cuda.max_memory_allocated during the mode's steps; on the CPU the peak RSS
growth of the mode run alone in a fresh process (model, data, optimizer state and activations).

Parameter-related memory (``param_memory``), counted from tensor storages after the timed steps,
in one extra forward and backward of the mode (no optimizer step; the grads are dropped after):
the parameters, their grads, every tensor in the optimizer's state (moments; per-tensor step
counters and ampkit's float32 masters, reported apart) and the autocast weight cache: the lower-precision
copies that the region makes of floating-point parameters. Those copies live in a C++ cache
(torch.autocast's or ampkit's) whose tensors Python cannot reach (ampkit.autocast_cache_size() gives
only ampkit's count, recorded beside as a check), so a TorchDispatchMode open during the forward
records every ``aten._to_copy`` whose input is a parameter's storage and whose output has
another dtype: with the cache on, each parameter is cast once per region (a second use takes the
cache), and each copy stays alive for the step (the cache holds it until the region exits and
autograd saves it for backward). Storages are deduplicated by ``untyped_storage().data_ptr()``
(a tied weight counts once) and the total is divided by the number of parameter elements. Not
counted: activations, buffers, the allocator's slack.

Modes: fp32 (strict on CUDA: TF32 off), tf32 (CUDA only), ampkit-bf16, ampkit-fp16 (with
ampkit.GradScaler), torch-bf16, torch-fp16 (torch.autocast + torch.amp.GradScaler). ampkit's modes
run ampkit.Trainer with ampkit.optim.AdamW (fused, sync-free); the others torch.optim.AdamW(fused=True).
ampkit-bf16-master and ampkit-bf16-sr keep the parameters themselves in bf16
(``ampkit.cast_model``; the norm layers stay float32) under the same trainer and autocast, with
``AdamW(master_weights=True)`` (float32 masters and states in the optimizer) or
``AdamW(stochastic_rounding=True, state_dtype=torch.bfloat16)`` (no master, bf16 states, the update
rounded stochastically); their peer is torch-bf16. Any mode with "-control" appended (default on the
CPU: torch-bf16-control) is a second, identical copy of it, interleaved like the others: its ratio
to the original is the noise band of the ratios.

    python benchmarks/fp32_vs_amp.py [--device cpu|cuda] [--models mlp,transformer,cnn,gpt]
        [--modes ...] [--steps N] [--warmup N] [--json PATH] [--plot PATH]
"""
import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ampkit
from _common import CPU_CLOCKS, OtherLoad, cpu_name, header, percentile, write_json

ALL_MODES = ["fp32", "tf32", "ampkit-bf16", "ampkit-fp16", "ampkit-bf16-master", "ampkit-bf16-sr", "torch-bf16",
             "torch-fp16"]
MODELS = ["mlp", "transformer", "cnn", "gpt"]
CONTROL = "-control"
CPU_CLOCK = "process"
SR_SEED = 0
# The optimizer options of the low-precision-parameter modes (ampkit-<dtype>-<variant>).
LOWP_VARIANTS = {
    "master": dict(master_weights=True),
    "sr": dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=SR_SEED),
}


def base_mode(mode):
    """The mode that a control mode copies ("torch-bf16-control" -> "torch-bf16"), else mode itself."""
    return mode[: -len(CONTROL)] if mode.endswith(CONTROL) else mode


def mode_parts(mode):
    """(family, precision, variant) of a mode: "ampkit-bf16-master" -> ("ampkit", "bf16", "master"),
    "torch-bf16-control" -> ("torch", "bf16", ""), "fp32" -> ("fp32", "", "")."""
    family, _, rest = base_mode(mode).partition("-")
    precision, _, variant = rest.partition("-")
    return family, precision, variant


def peer_mode(mode):
    """The mode whose time this one is divided by in ratio_vs_torch: torch's AMP of the same dtype
    for ampkit's (torch-bf16 for ampkit-bf16, ampkit-bf16-master and ampkit-bf16-sr), the original
    for a control copy, None for the rest."""
    if mode.endswith(CONTROL):
        return base_mode(mode)
    family, precision, _ = mode_parts(mode)
    return f"torch-{precision}" if family == "ampkit" else None


# ----------------------------------------------------------------------------- workloads
class MLP(nn.Module):
    def __init__(self, d_in, hidden, classes):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block with a classification head."""

    def __init__(self, d_model, heads, d_ff, classes):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.norm(self.block(x)).mean(1))


class SmallCNN(nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class GPT(nn.Module):
    """A small GPT: token + learned position embeddings, pre-norm causal Transformer blocks (GELU
    MLP), a final LayerNorm and an LM head tied to the token embedding. forward(idx) takes
    (batch, seq) token ids and returns the next-token logits flattened to (batch * seq, vocab)."""

    def __init__(self, vocab, seq, d_model, heads, d_ff, layers):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2's initialization (N(0, 1) would make huge logits)
        # A bool mask (True: not attended); with is_causal=True the attention takes SDPA's causal path.
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x, src_mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x)).flatten(0, 1)


def markov_tokens(vocab, batch, seq, batches, g, branching=4, return_chain=False):
    """batches of (batch, seq + 1) token ids from a fixed random Markov chain in which every token
    is followed by one of `branching` tokens (random probabilities): text with learnable structure,
    whose next-token entropy is at most log(branching) nats against log(vocab) for a blind guess.
    With return_chain, also the (vocab, vocab) transition matrix."""
    succ = torch.randint(0, vocab, (vocab, branching), generator=g)
    probs = torch.softmax(torch.randn(vocab, branching, generator=g), 1)
    out = []
    for _ in range(batches):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        rows = [tok]
        for _ in range(seq):
            k = torch.multinomial(probs[tok], 1, generator=g).squeeze(1)
            tok = succ[tok, k]
            rows.append(tok)
        out.append(torch.stack(rows, 1))
    if return_chain:
        return out, torch.zeros(vocab, vocab).scatter_add_(1, succ, probs)
    return out


# Sizes: on the CPU the defaults finish in about two minutes on 2 cores; on CUDA they fill a GPU.
SIZES = {
    "cpu": {"mlp": dict(batch=256, d_in=1024, hidden=2048), "transformer": dict(batch=8, seq=128, d_model=512,
            heads=8, d_ff=2048), "cnn": dict(batch=32, width=32, image=32),
            "gpt": dict(batch=8, seq=128, vocab=4096, d_model=256, heads=4, d_ff=1024, layers=4)},
    "cuda": {"mlp": dict(batch=8192, d_in=4096, hidden=8192), "transformer": dict(batch=64, seq=1024,
             d_model=2048, heads=16, d_ff=8192), "cnn": dict(batch=512, width=128, image=64),
             "gpt": dict(batch=16, seq=1024, vocab=32768, d_model=1024, heads=16, d_ff=4096, layers=12)},
}
# --tiny: a smoke-test size that runs every mode in seconds anywhere.
TINY = {"mlp": dict(batch=32, d_in=64, hidden=64), "transformer": dict(batch=4, seq=16, d_model=32, heads=4, d_ff=64),
        "cnn": dict(batch=4, width=4, image=8),
        "gpt": dict(batch=4, seq=16, vocab=64, d_model=32, heads=4, d_ff=64, layers=2)}
CLASSES = 16


def make_workload(name, device, tiny=False, batches=8):
    """(model builder, list of (x, y) batches): the data is fixed by the seed, labels come from a
    fixed random teacher so that the task is learnable."""
    s = TINY[name] if tiny else SIZES[device][name]
    g = torch.Generator().manual_seed(1234)
    if name == "mlp":
        xs = [torch.randn(s["batch"], s["d_in"], generator=g) for _ in range(batches)]
        teacher = torch.randn(s["d_in"], CLASSES, generator=g)
        ys = [(x @ teacher).argmax(1) for x in xs]
        build = lambda: MLP(s["d_in"], s["hidden"], CLASSES)  # noqa: E731
    elif name == "transformer":
        xs = [torch.randn(s["batch"], s["seq"], s["d_model"], generator=g) for _ in range(batches)]
        teacher = torch.randn(s["d_model"], CLASSES, generator=g)
        ys = [(x.mean(1) @ teacher).argmax(1) for x in xs]
        build = lambda: EncoderBlock(s["d_model"], s["heads"], s["d_ff"], CLASSES)  # noqa: E731
    elif name == "cnn":
        xs = [torch.randn(s["batch"], 3, s["image"], s["image"], generator=g) for _ in range(batches)]
        teacher = torch.randn(3, CLASSES, generator=g)
        ys = [(x.mean((2, 3)) @ teacher).argmax(1) for x in xs]
        build = lambda: SmallCNN(s["width"], CLASSES)  # noqa: E731
    elif name == "gpt":
        seqs = markov_tokens(s["vocab"], s["batch"], s["seq"], batches, g)
        xs = [t[:, :-1].contiguous() for t in seqs]
        ys = [t[:, 1:].flatten() for t in seqs]  # next tokens, flattened as the logits are
        build = lambda: GPT(s["vocab"], s["seq"], s["d_model"], s["heads"], s["d_ff"], s["layers"])  # noqa: E731
    else:
        raise ValueError(f"--models: expected names among {', '.join(MODELS)}, got {name!r}")
    data = [(x.to(device), y.to(device)) for x, y in zip(xs, ys)]
    return build, data, s["batch"]


# ----------------------------------------------------------------------------- one mode
class Run:
    """One model trained in one mode; step() advances it by one optimizer step."""

    def __init__(self, model_name, mode, device, seed, tiny=False):
        self.model_name, self.mode, self.device = model_name, mode, device
        build, self.data, self.batch = make_workload(model_name, device, tiny)
        torch.manual_seed(seed)
        self.model = build().to(device)
        family, precision, variant = mode_parts(mode)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.dtype = dtype
        self.trainer = None
        if family == "ampkit":
            # ampkit's whole recipe: the trainer (autocast, scaled backward, step, update) with
            # ampkit's fused, sync-free AdamW and, under fp16, ampkit.GradScaler. The -master and
            # -sr variants first cast the parameters to the dtype (norm layers stay float32).
            if variant:
                ampkit.cast_model(self.model, dtype)
            self.opt = ampkit.optim.AdamW(self.model.parameters(), lr=2e-4, **LOWP_VARIANTS.get(variant, {}))
            self.trainer = ampkit.Trainer(self.model, self.opt, device_type=device, dtype=dtype)
            self.ctx, self.scaler = contextlib.nullcontext, None
        else:
            # torch's best: fused AdamW; torch.autocast + torch.amp.GradScaler for its AMP modes.
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-4, fused=True)
            if family == "torch":
                self.ctx = lambda: torch.autocast(device, dtype=dtype)
                self.scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
            else:
                self.ctx, self.scaler = contextlib.nullcontext, None
        self.tf32 = base_mode(mode) == "tf32"
        # The wall time spent inside optimizer.step (the trainer's call included), to see what a
        # step's time is made of; an instance attribute, so the trainer and the scalers call it too.
        self.opt_s = 0.0
        self.opt_ms = []
        step = self.opt.step

        def timed_step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.opt_s += time.perf_counter() - t0

        self.opt.step = timed_step
        self.steps = 0
        self.times_ms = []
        self.cpu_ms = []
        self.losses = []
        self.peak_mem_mb = 0.0
        self.param_memory = None

    def forward_context(self):
        """The autocast region that the mode's forward runs in (the trainer's for ampkit's modes)."""
        if self.trainer is not None and self.dtype is not None:
            return ampkit.autocast(self.device, dtype=self.dtype)
        return self.ctx()

    def step(self):
        x, y = self.data[self.steps % len(self.data)]
        if self.trainer is not None:
            stats = self.trainer.step(lambda: F.cross_entropy(self.model(x), y))
            self.steps += 1
            return stats.loss
        with self.ctx():
            loss = F.cross_entropy(self.model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return loss.detach()

    def skipped_steps(self):
        # Fused AdamW leaves its step counter alone on a skipped step (torch's and ampkit's scalers alike).
        state = self.opt.state[next(iter(self.model.parameters()))]
        return self.steps - int(state["step"]) if "step" in state else self.steps


# ----------------------------------------------------------------------------- measurement
def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_chunk(run, n, warmup, device):
    """n steps of one mode; times (after warm-up) and losses are recorded."""
    cpu_clock = CPU_CLOCKS[CPU_CLOCK][0]
    if device == "cuda":
        set_tf32(run.tf32)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0 = cpu_clock()
            start.record()
            loss = run.step()
            end.record()
            events.append((start, end, loss, (cpu_clock() - c0) * 1e3))
        torch.cuda.synchronize()
        for start, end, loss, cpu_ms in events:
            if len(run.losses) >= warmup:
                run.times_ms.append(start.elapsed_time(end))
                run.cpu_ms.append(cpu_ms)
            run.losses.append(float(loss))
        run.peak_mem_mb = max(run.peak_mem_mb, (torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        for _ in range(n):
            o0 = run.opt_s
            c0, t0 = cpu_clock(), time.perf_counter()
            loss = run.step()
            t1, c1 = time.perf_counter(), cpu_clock()
            if len(run.losses) >= warmup:
                run.times_ms.append((t1 - t0) * 1e3)
                run.cpu_ms.append((c1 - c0) * 1e3)
                run.opt_ms.append((run.opt_s - o0) * 1e3)
            run.losses.append(float(loss))


class _CastRecorder(TorchDispatchMode):
    """Records the casts of the parameters made while open: every aten._to_copy whose input shares a
    parameter's storage and whose output has another dtype. It holds the casts until they are
    counted: each one lives through the forward and (saved by autograd) into the backward anyway, and
    holding it keeps a grad allocated after its release from taking its address and being mistaken
    for it by the deduplication."""

    def __init__(self, param_ptrs):
        super().__init__()
        self.param_ptrs = param_ptrs
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) and \
                args[0].untyped_storage().data_ptr() in self.param_ptrs and out.dtype != args[0].dtype:
            self.casts.append(out)
        return out


def param_memory(run):
    """Parameter-related memory of a run, in bytes, counted from tensor storages: parameters,
    grads, optimizer state (float32 masters and the per-tensor "step" counters apart from the
    moments), and the autocast weight cache of one
    forward (see the module docstring). Runs one forward and backward in the mode's region, without
    an optimizer step, and drops the grads after. Each storage counts once (by data_ptr), in the
    first of those categories that holds it."""
    params = list(dict.fromkeys(run.model.parameters()))  # a tied weight once
    numel = sum(p.numel() for p in params)
    x, y = run.data[0]
    run.opt.zero_grad(set_to_none=True)
    recorder = _CastRecorder({p.untyped_storage().data_ptr() for p in params})
    with run.forward_context():
        with recorder:
            loss = F.cross_entropy(run.model(x), y)
        cache_entries = ampkit.autocast_cache_size() if run.trainer is not None else None
    loss.backward()
    seen = set()
    out = {"params": 0, "grads": 0, "optimizer_states": 0, "step_counters": 0, "masters": 0, "cached_casts": 0}

    def count(category, ptr, nbytes):
        if ptr not in seen and nbytes:
            seen.add(ptr)
            out[category] += nbytes

    def count_tensor(category, t):
        storage = t.untyped_storage()
        count(category, storage.data_ptr(), storage.nbytes())

    for p in params:
        count_tensor("params", p)
    for p in params:
        if p.grad is not None:
            count_tensor("grads", p.grad)
    for state in run.opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                category = {"master": "masters", "step": "step_counters"}.get(key, "optimizer_states")
                count_tensor(category, value)
    for t in recorder.casts:
        count_tensor("cached_casts", t)
    run.opt.zero_grad(set_to_none=True)
    out["total"] = sum(out.values())
    out["numel"] = numel
    # Under cast_model: the norm layers it keeps in float32.
    out["float32_numel"] = sum(p.numel() for p in params if p.dtype == torch.float32)
    out["casts_recorded"] = len({t.untyped_storage().data_ptr() for t in recorder.casts})
    recorder.casts.clear()
    out["ampkit_cache_entries"] = cache_entries
    out["bytes_per_param"] = out["total"] / numel
    for key in ("params", "grads", "optimizer_states", "step_counters", "masters", "cached_casts"):
        out[key + "_per_param"] = out[key] / numel
    return out


def memory_probe(model_name, mode, seed, tiny, steps):
    """Peak RSS growth (MB) of one CPU run in a fresh process: in one process the allocator's reuse
    of memory that other modes freed makes per-mode peaks meaningless. VmHWM, unlike ru_maxrss,
    starts afresh at exec instead of inheriting the forking parent's peak."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, {bench!r}); import fp32_vs_amp as B\n"
        "base = B.rss_mb('VmRSS')\n"
        "r = B.Run({model!r}, {mode!r}, 'cpu', {seed}, {tiny})\n"
        "for _ in range({steps}): r.step()\n"
        "print(B.rss_mb('VmHWM') - base)\n"
    ).format(bench=os.path.dirname(os.path.abspath(__file__)), model=model_name, mode=mode, seed=seed, tiny=tiny,
             steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {model_name}/{mode} failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


class Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label, self.t0 = total, 0, label, time.time()

    def advance(self, what):
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        eta = (time.time() - self.t0) / self.done * (self.total - self.done)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{what:<28s} eta {eta:4.0f}s")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def benchmark(device, models, modes, steps, warmup, chunk, seed, tiny=False, memory=True):
    results = []
    for model_name in models:
        runs = [Run(model_name, mode, device, seed, tiny) for mode in modes]
        total = steps + warmup
        chunks = math.ceil(total / chunk)
        progress = Progress(chunks * len(runs), f"{model_name:12s}")
        for c in range(chunks):
            n = min(chunk, total - c * chunk)
            order = runs[c % len(runs):] + runs[: c % len(runs)]  # rotate who goes first
            for run in order:
                run_chunk(run, n, warmup, device)
                progress.advance(run.mode)
        for r in runs:
            r.param_memory = param_memory(r)
        if device == "cpu":
            for r in runs:
                r.peak_mem_mb = memory_probe(model_name, r.mode, seed, tiny, warmup + 2) if memory else float("nan")
        base = next((r for r in runs if r.mode == "fp32"), None)
        final = {r.mode: statistics.mean(r.losses[-max(1, min(5, len(r.losses))):]) for r in runs}
        medians = {r.mode: statistics.median(r.times_ms) for r in runs}
        cpu_medians = {r.mode: statistics.median(r.cpu_ms) for r in runs}
        for r in runs:
            med, cpu_med = medians[r.mode], cpu_medians[r.mode]
            peer = peer_mode(r.mode)
            if peer not in medians:
                peer = None
            results.append({
                "model": model_name,
                "mode": r.mode,
                "samples": len(r.times_ms),
                "step_ms": med,
                "p10_ms": percentile(r.times_ms, 0.1),
                "p90_ms": percentile(r.times_ms, 0.9),
                "cpu_ms": cpu_med,
                "cpu_p10_ms": percentile(r.cpu_ms, 0.1),
                "cpu_p90_ms": percentile(r.cpu_ms, 0.9),
                # CPU only: on CUDA optimizer.step returns once its kernels are queued.
                "optimizer_ms": statistics.median(r.opt_ms) if r.opt_ms else None,
                "throughput_per_s": r.batch / med * 1e3,
                "speedup_vs_fp32": medians["fp32"] / med if base else None,
                "speedup_vs_fp32_cpu": cpu_medians["fp32"] / cpu_med if base else None,
                "peer": peer,
                "ratio_vs_torch": med / medians[peer] if peer else None,
                "ratio_vs_torch_cpu": cpu_med / cpu_medians[peer] if peer else None,
                "peak_mem_mb": r.peak_mem_mb,
                "param_bytes_per_param": r.param_memory["bytes_per_param"],
                "param_memory": r.param_memory,
                "final_loss": final[r.mode],
                "loss_rel_diff": abs(final[r.mode] - final["fp32"]) / abs(final["fp32"]) if base else None,
                "skipped_steps": r.skipped_steps(),
            })
    return results


def print_table(results, device):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\nFP32 vs AMP on {device} (torch {torch.__version__}); step time is the median after warm-up, "
          f"wall and process CPU time; 'vs peer' is the time over the peer's (torch's AMP, or the original of a "
          f"control copy)")
    head = (f"{'model':12s} {'mode':18s} {'step ms':>9s} {'p10':>8s} {'p90':>8s} {'cpu ms':>8s} {'opt ms':>7s} "
            f"{'samples/s':>10s} "
            f"{'vs fp32':>8s} {'vs peer':>8s} {'cpu':>7s} {'peak MB':>8s} {'B/param':>8s} {'loss':>8s} {'dloss':>7s} "
            f"{'skip':>5s}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:12s} {r['mode']:18s} {r['step_ms']:9.2f} {r['p10_ms']:8.2f} {r['p90_ms']:8.2f} "
              f"{r['cpu_ms']:8.2f} {fmt(r['optimizer_ms'], '7.2f'):>7s} {r['throughput_per_s']:10.1f} "
              f"{fmt(r['speedup_vs_fp32'], '7.2f')}x {fmt(r['ratio_vs_torch'], '7.3f'):>8s} "
              f"{fmt(r['ratio_vs_torch_cpu'], '7.3f'):>7s} {r['peak_mem_mb']:8.1f} {r['param_bytes_per_param']:8.2f} "
              f"{r['final_loss']:8.4f} {fmt(r['loss_rel_diff'], '7.2%')} {r['skipped_steps']:5d}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        rows = {r["model"]: r for r in results if r["mode"] == mode}
        xs = [m + i * width for m in range(len(models))]
        axes[0].bar(xs, [rows[m]["speedup_vs_fp32"] or 0 for m in models], width, label=mode)
        axes[1].bar(xs, [rows[m]["peak_mem_mb"] for m in models], width, label=mode)
        axes[2].bar(xs, [rows[m]["param_bytes_per_param"] for m in models], width, label=mode)
    for ax, title in zip(axes, ["speedup over fp32 (higher is better)", "peak memory, MB (lower is better)",
                                "parameter-related bytes per parameter"]):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
        ax.set_title(title)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ampkit FP32 vs AMP ({results and 'torch ' + torch.__version__})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=None,
                   help="comma list; default: all on cuda but ampkit-bf16-sr (a CPU kernel), fp32,ampkit-bf16,"
                        "ampkit-bf16-master,ampkit-bf16-sr,torch-bf16 on cpu (CPU fp16 GEMMs are slow), and "
                        "torch-bf16-control")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: cpu 20, cuda 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default: cpu 3, cuda 10)")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved chunk (default: cpu 4, cuda 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke test of every mode in seconds")
    p.add_argument("--no-memory", action="store_true",
                   help="CPU: skip the per-mode peak-RSS probes (each runs the mode in a fresh process)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG chart here")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SIZES[args.device]:
            p.error(f"--models: expected names among {', '.join(MODELS)}, got {m!r}")
    # On the CPU fp16 matrix products have no fast kernel unless the processor has AVX512-FP16 / AMX-FP16
    # (measured here: ~100x slower than fp32), so the default CPU run leaves the fp16 modes out.
    # Stochastic rounding is a CPU kernel (ampkit refuses it on CUDA).
    default_modes = ([m for m in ALL_MODES if not m.endswith("-sr")] if args.device == "cuda" else
                     ["fp32", "ampkit-bf16", "ampkit-bf16-master", "ampkit-bf16-sr", "torch-bf16"])
    default_modes = default_modes + ["torch-bf16-control"]
    modes = args.modes.split(",") if args.modes else default_modes
    for m in modes:
        if base_mode(m) not in ALL_MODES:
            p.error(f"--modes: expected names among {', '.join(ALL_MODES)}, each optionally with {CONTROL!r} "
                    f"appended, got {m!r}")
        if base_mode(m) == "tf32" and args.device != "cuda":
            p.error("--modes: tf32 needs --device cuda")
        if mode_parts(m)[2] == "sr" and args.device != "cpu":
            p.error(f"--modes: {m} needs --device cpu (ampkit's stochastic rounding is a CPU kernel)")
    for m in modes:
        if modes.count(m) > 1:
            p.error(f"--modes: {m!r} twice (a second copy of a mode is {m + CONTROL!r})")
    if "fp32" not in modes:
        modes = ["fp32"] + modes  # the baseline every ratio is taken against
    on_cuda = args.device == "cuda"
    steps = args.steps if args.steps is not None else (100 if on_cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 3)
    chunk = args.chunk if args.chunk is not None else (20 if on_cuda else 4)
    if steps < 1 or warmup < 0 or chunk < 1:
        p.error(f"expected --steps >= 1, --warmup >= 0, --chunk >= 1, got {steps}, {warmup}, {chunk}")
    if args.threads:
        torch.set_num_threads(args.threads)

    with OtherLoad() as load:
        results = benchmark(args.device, models, modes, steps, warmup, chunk, args.seed, args.tiny,
                            not args.no_memory)
    print_table(results, args.device)
    meta = {**header("fp32_vs_amp", cpu_clock=CPU_CLOCK, device=args.device, other_load=load),
            "ampkit": ampkit.__version__,
            "device_name": torch.cuda.get_device_name() if on_cuda else cpu_name(), "tiny": args.tiny,
            "steps": steps, "warmup": warmup, "chunk": chunk, "modes": modes, "memory": not args.no_memory,
            "results": results}
    if args.json:
        write_json(args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return meta


if __name__ == "__main__":
    main()
