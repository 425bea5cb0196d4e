"""One rank of the Python cases of test_distributed.py (started as a subprocess, gloo on 127.0.0.1).

--wrap ddp|fsdp2: torch's DistributedDataParallel or FSDP2's fully_shard around a small MLP.
--loop scaler: a hand-written AMP loop with the scaler named by --scaler; at the steps in
  --inf-steps rank --inf-rank writes an inf into its own (local, after the reduction) gradient, so
  only a collective skip decision keeps the ranks in step.
--loop trainer: ampkit.Trainer (accumulation 2) against the same loop by hand with torch's
  autocast, scaler and DDP's no_sync; the inf is in rank --inf-rank's loss.
Writes the skipped steps, the scales and the full parameters (gathered from the shards) as JSON.
"""
import argparse
import contextlib
import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import ampkit

ROWS = 8


def make_scaler(kind):
    options = dict(init_scale=1024.0, growth_interval=2)
    if kind == "ampkit":
        return ampkit.GradScaler("cpu", **options)
    if kind == "ampkit_group":
        return ampkit.GradScaler("cpu", process_group=dist.group.WORLD, **options)
    if kind == "torch":
        return torch.amp.GradScaler("cpu", **options)
    if kind == "sharded":
        return ShardedGradScaler("cpu", process_group=dist.group.WORLD, **options)
    raise ValueError(kind)


def batch(step, micro, rank, world):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(ROWS, 16, generator=gen), torch.randn(ROWS, 8, generator=gen)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    return x[rows], y[rows]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrap", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--loop", choices=["scaler", "trainer", "by_hand"], default="scaler")
    parser.add_argument("--scaler", default="ampkit")
    parser.add_argument("--optim", choices=["torch", "ampkit"], default="torch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--inf-steps", default="")
    parser.add_argument("--inf-rank", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # A rank that hangs (a lost peer) prints where and exits before the test's own timeout.
    faulthandler.dump_traceback_later(45, exit=True)
    inf_steps = {int(s) for s in args.inf_steps.split(",") if s}

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    if args.wrap == "ddp":
        model = DistributedDataParallel(model)
    else:
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    if args.optim == "ampkit":
        opt = ampkit.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scaler = make_scaler(args.scaler)
    skipped, scales = [], []

    if args.loop == "scaler":
        for step in range(args.steps):
            x, y = batch(step, 0, rank, world)
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            loss = (out.float() - y).pow(2).mean()
            scaler.scale(loss).backward()
            if step in inf_steps and rank == args.inf_rank:
                grad = next(iter(model.parameters())).grad
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                local.view(-1)[0] = float("inf")  # this rank's own gradient (shard) only
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(int(scaler.get_scale() < before))
            scales.append(scaler.get_scale())
            opt.zero_grad()
    else:
        accumulation = 2
        trainer = ampkit.Trainer(model, opt, device_type="cpu", dtype=torch.float16, scaler=scaler,
                                 accumulation_steps=accumulation) if args.loop == "trainer" else None
        for step in range(args.steps):
            for micro in range(accumulation):
                x, y = batch(step, micro, rank, world)
                weight = float("inf") if (step in inf_steps and micro == 0 and rank == args.inf_rank) else 1.0

                def closure():
                    return (model(x).float() - y).pow(2).mean() * weight

                if trainer is not None:
                    stats = trainer.step(closure)
                    if stats.stepped:
                        skipped.append(int(stats.skipped))
                        scales.append(float(stats.scale))
                    continue
                last = micro == accumulation - 1
                sync = contextlib.nullcontext() if last else model.no_sync()
                with sync:
                    with torch.autocast("cpu", dtype=torch.float16):
                        loss = closure()
                    scaler.scale(loss / accumulation).backward()
                if last:
                    scales.append(scaler.get_scale())
                    scaler.step(opt)
                    scaler.update()
                    skipped.append(int(scaler.get_scale() < scales[-1]))
                    opt.zero_grad()

    state = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        state[name] = full.detach().reshape(-1).tolist()
    with open(args.out, "w") as f:
        json.dump({"rank": rank, "skipped": skipped, "scales": scales, "state": state}, f)
    dist.barrier()
    # Skips the interpreter's teardown: destroying the gloo group's objects at exit now and then
    # hung or aborted ("terminate called without an active exception") in torch 2.13 on CPU after
    # everything here had finished; the results are written and every rank is past the barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
