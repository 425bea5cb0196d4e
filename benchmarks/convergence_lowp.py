"""Convergence of a small GPT language model with low-precision parameters: 300 AdamW steps in
fp32, torch-bf16, ampkit-bf16-master and ampkit-bf16-sr from the same initial weights on the same
data, and how far each mode's final loss lands from fp32's.

The model is benchmarks/fp32_vs_amp.py's GPT (token + position embeddings, pre-norm causal
blocks, final LayerNorm, LM head tied to the token embedding) at a small size, trained on next
tokens of synthetic text from a fixed random Markov chain (each token followed by one of 4
tokens), one fresh batch per step, the same batches in every mode. Modes:

* ``fp32``: float32 everything, ``torch.optim.AdamW(fused=True)``.
* ``torch-bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``.
* ``ampkit-bf16-master``: ``ampkit.cast_model(model, torch.bfloat16)`` (norm layers stay
  float32), ``ampkit.optim.AdamW(master_weights=True)``, ``ampkit.Trainer(dtype=torch.bfloat16)``.
* ``ampkit-bf16-sr``: the same with ``AdamW(stochastic_rounding=True, state_dtype=torch.bfloat16,
  seed=0)`` instead: no master, bf16 states.
* ``ampkit-bf16-nearest`` (a reference, not held to the goal): bf16 parameters and
  ``ampkit.optim.AdamW`` with neither, so every update is rounded to nearest bf16: what the two
  recipes are there to avoid; how far it lands from fp32 shows how much this run can tell them apart.

AdamW lr 1e-3 (linear warm-up over the first 20 steps), betas (0.9, 0.999), weight decay 0.01.
The final loss of a mode is the mean of its last 20 steps' losses; its difference from fp32 is
(final - final_fp32) / final_fp32 (the JSON has it signed, the README shows it signed too). The
entropy floor is the mean next-token entropy of the chain over the data's positions: the loss of a
model that knows the chain.

    python benchmarks/convergence_lowp.py [--steps 300] [--modes ...] [--tiny] [--json PATH] [--plot PATH]
"""
import argparse
import contextlib
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import ampkit
from _common import OtherLoad, header, write_json
from fp32_vs_amp import GPT, markov_tokens

MODES = ["fp32", "torch-bf16", "ampkit-bf16-master", "ampkit-bf16-sr", "ampkit-bf16-nearest"]
DEFAULT_MODES = MODES
REFERENCE_MODES = ["ampkit-bf16-nearest"]  # shown for comparison, not one of the recipes held to the goal
SIZE = dict(batch=16, seq=64, vocab=512, d_model=128, heads=4, d_ff=512, layers=2)
TINY = dict(batch=4, seq=16, vocab=64, d_model=32, heads=4, d_ff=64, layers=2)
LR, BETAS, WD, WARMUP = 1e-3, (0.9, 0.999), 0.01, 20
FINAL_WINDOW = 20


def lr_at(step):
    """Linear warm-up over WARMUP steps, then constant (step counts from 0)."""
    return LR * min(1.0, (step + 1) / WARMUP)


def train(mode, size, batches, seed):
    """Trains one mode over the batches; returns (losses, per-step wall seconds)."""
    torch.manual_seed(seed)
    model = GPT(size["vocab"], size["seq"], size["d_model"], size["heads"], size["d_ff"], size["layers"])
    params = model.parameters()
    trainer = None
    if mode.startswith("ampkit-"):
        ampkit.cast_model(model, torch.bfloat16)
        kwargs = {"ampkit-bf16-master": dict(master_weights=True),
                  "ampkit-bf16-sr": dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=0),
                  "ampkit-bf16-nearest": {}}[mode]
        opt = ampkit.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, **kwargs)
        trainer = ampkit.Trainer(model, opt, device_type="cpu", dtype=torch.bfloat16)
    else:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD, fused=True)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "torch-bf16" else contextlib.nullcontext
    losses, times = [], []
    for step, tokens in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = tokens[:, :-1], tokens[:, 1:].flatten()
        t0 = time.perf_counter()
        if trainer is not None:
            loss = trainer.step(lambda: F.cross_entropy(model(x), y)).loss
        else:
            with ctx():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    return losses, times


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    window = 10

    def smooth(v):
        return [statistics.mean(v[max(0, i - window + 1):i + 1]) for i in range(len(v))]

    fp32 = smooth(runs["fp32"]["losses"]) if "fp32" in runs else None
    for mode, r in runs.items():
        s = smooth(r["losses"])
        axes[0].plot(range(1, len(s) + 1), s, label=f"{mode} (final {r['final_loss']:.4f})", lw=1.2)
        if fp32 is not None and mode != "fp32":
            axes[1].plot(range(1, len(s) + 1), [100 * (a - b) / b for a, b in zip(s, fp32)], label=mode, lw=1.2)
    axes[0].axhline(data["entropy_floor"], color="gray", lw=0.8, ls="--", label="entropy floor")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title(f"training loss ({window}-step moving mean)")
    axes[0].legend(fontsize=8)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    for bound in (-2, 2):
        axes[1].axhline(bound, color="red", lw=0.6, ls=":")
    axes[1].set_xlabel("step")
    axes[1].set_title("loss difference from fp32, % (moving means)")
    axes[1].legend(fontsize=8)
    s = data["size"]
    fig.suptitle(f"GPT {s['layers']}x{s['d_model']}, vocab {s['vocab']}, seq {s['seq']}, batch {s['batch']}: "
                 f"{data['steps']} AdamW steps ({data['cpu']}, torch {data['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--tiny", action="store_true", help="a tiny model: a smoke test in seconds")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: expected names among {', '.join(MODES)}, got {m!r}")
    if len(set(modes)) != len(modes):
        p.error("--modes: a mode twice")
    if args.steps < 1:
        p.error("--steps: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = TINY if args.tiny else SIZE
    g = torch.Generator().manual_seed(4321)
    batches, chain = markov_tokens(size["vocab"], size["batch"], size["seq"], args.steps, g, return_chain=True)
    # The loss of a model that knows the chain: the mean next-token entropy over the data's positions.
    row_entropy = -(chain * chain.clamp_min(1e-30).log()).sum(1)
    floor = float(torch.stack([row_entropy[b[:, :-1]].mean() for b in batches]).mean())
    runs = {}
    with OtherLoad() as load:
        for mode in modes:
            t0 = time.time()
            losses, times = train(mode, size, batches, args.seed)
            k = min(FINAL_WINDOW, len(losses))
            runs[mode] = {"final_loss": statistics.mean(losses[-k:]), "step_ms": statistics.median(times) * 1e3,
                          "seconds": time.time() - t0, "losses": [round(v, 6) for v in losses]}
            print(f"{mode:22s} final loss {runs[mode]['final_loss']:.4f}  median step "
                  f"{runs[mode]['step_ms']:.1f} ms  ({runs[mode]['seconds']:.0f} s)", file=sys.stderr)
    base = runs.get("fp32", {}).get("final_loss")
    for r in runs.values():
        r["rel_diff_vs_fp32"] = (r["final_loss"] - base) / base if base else None
    params = sum(p.numel() for p in dict.fromkeys(
        GPT(size["vocab"], size["seq"], size["d_model"], size["heads"], size["d_ff"], size["layers"]).parameters()))
    data = {**header("convergence_lowp", other_load=load), "ampkit": ampkit.__version__, "tiny": args.tiny,
            "steps": args.steps, "seed": args.seed, "size": size, "params": params,
            "optimizer": {"name": "AdamW", "lr": LR, "warmup_steps": WARMUP, "betas": list(BETAS),
                          "weight_decay": WD},
            "final_window": min(FINAL_WINDOW, args.steps), "initial_loss_uniform": math.log(size["vocab"]),
            "entropy_floor": floor, "goal_rel_diff": 0.02, "modes": modes,
            "reference_modes": [m for m in modes if m in REFERENCE_MODES], "runs": runs}
    print(f"\n{params:,} parameters, {args.steps} steps; entropy floor {floor:.4f}, uniform guess "
          f"{math.log(size['vocab']):.4f}")
    for mode, r in runs.items():
        diff = "-" if r["rel_diff_vs_fp32"] is None else f"{r['rel_diff_vs_fp32']:+.2%}"
        print(f"{mode:22s} final loss (mean of last {data['final_window']}) {r['final_loss']:.4f}  vs fp32 {diff}")
    if args.json:
        write_json(args.json, data)
        print(f"wrote {args.json}")
    if args.plot:
        plot(data, args.plot)
        print(f"wrote {args.plot}")
    return data


if __name__ == "__main__":
    main()
