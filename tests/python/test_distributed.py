"""Data-parallel training across processes, on gloo over 127.0.0.1 (CPU only, each case bounded).

C++: build/tests/cpp/ampkit_ddp_worker (tests/cpp/ddp_worker.cpp) trains with ampkit::Trainer and
TrainerOptions::process_group; two ranks are compared with the single-process run on the
concatenated batch (the oracle), with an inf injected on one rank's rows at chosen steps.
Python: tests/python/distributed_worker.py runs torch's DDP and FSDP2 (fully_shard) with
ampkit.GradScaler and with torch's scaler in the same setup.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("AMPKIT_BUILD_DIR", ROOT / "build"))
WORKER = BUILD / "tests" / "cpp" / "ampkit_ddp_worker"
PY_WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 60  # seconds per launch; a rank that loses its peer fails after the worker's own 60 s

# fp32 (autocast off, loss scaling on): the two runs differ only in the order of fp32 sums (the
# mean over 8 rows against the mean of two 4-row means, each halved before the all-reduce's sum),
# about one ulp (6e-8 relative) per gradient element and step; observed <= 6e-7 relative after 6
# SGD-momentum steps. fp16 autocast: each rank's weight gradients leave an fp16 matmul over 4 rows
# instead of 8, rounded to fp16 (2**-11 = 4.9e-4 relative) before the average; observed <= 2e-5
# absolute on parameters of magnitude ~0.2 after 6 steps at lr 0.05.
TOLERANCE = {"float": dict(rtol=1e-5, atol=1e-6), "half": dict(rtol=1e-3, atol=1e-4)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command, world_size, tmp_path, tag):
    """Runs command (a list; '{out}' is replaced) as world_size ranks, or alone when world_size is
    None; returns each rank's JSON output."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    ranks = [None] if world_size is None else list(range(world_size))
    port = _free_port()
    procs, outs, logs = [], [], []
    for rank in ranks:
        out = tmp_path / f"{tag}_rank{rank}.json"
        # Files, not pipes: a rank blocked on a full pipe would hang its peer in a collective.
        log = open(tmp_path / f"{tag}_rank{rank}.log", "w+")
        logs.append(log)
        rank_env = dict(env)
        if rank is not None:
            rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                            WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        cmd = [str(c).replace("{out}", str(out)) for c in command]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(out)
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if command[0] == WORKER and all(p.returncode == 77 for p in procs):
        pytest.skip("ampkit was built without gloo's headers (libgloo-dev): no C++ gloo rendezvous")
    for p, log in zip(procs, logs):
        log.seek(0)
        text = log.read()
        log.close()
        assert p.returncode == 0, f"{tag}: a rank exited with {p.returncode}:\n{text[-4000:]}"
    return [json.loads(o.read_text()) for o in outs]


def _cpp(world_size, tmp_path, tag, **options):
    assert WORKER.exists(), f"expected the test worker at {WORKER} (built with the Catch2 tests)"
    args = [WORKER, "--out", "{out}"]
    for k, v in options.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return _launch(args, world_size, tmp_path, tag)


def _state(run):
    return {k: torch.tensor(v) for k, v in run["state"].items()}


def _assert_states(a, b, **tolerance):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **tolerance, msg=lambda m, k=k: f"{k}: {m}")


INF_STEPS = [2, 4]


@pytest.mark.parametrize("dtype", ["float", "half"])
def test_cpp_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path, dtype):
    common = dict(steps=6, dtype=dtype, inf_steps=",".join(map(str, INF_STEPS)), inf_rank=1)
    (ref,) = _cpp(None, tmp_path, "ref", **common)
    r0, r1 = _cpp(2, tmp_path, "ddp", **common)
    expected = [int(s in INF_STEPS) for s in range(6)]
    # The inf is only in rank 1's rows; both ranks (and the reference) skip exactly those steps.
    assert ref["skipped"] == expected and r0["skipped"] == expected and r1["skipped"] == expected
    assert r0["scales"] == r1["scales"] == ref["scales"]
    assert r0["final_scale"] == r1["final_scale"] == ref["final_scale"]
    # Replicas stay bitwise identical (rank 1 started from other weights and another buffer: the
    # broadcast from rank 0 replaced them).
    _assert_states(r0, r1, rtol=0, atol=0)
    assert r1["state"]["marker"] == [0.0, 0.0]
    _assert_states(r0, ref, **TOLERANCE[dtype])


def test_cpp_unused_parameters_on_one_rank(tmp_path):
    # Rank 1 alone uses an extra branch (find_unused_parameters): its grads reach rank 0 through the
    # reducer (zeros stand in for rank 0's), the replicas stay bitwise equal, and both ranks skip
    # the steps where rank 1's rows are inf.
    r0, r1 = _cpp(2, tmp_path, "unused", steps=6, dtype="float", inf_steps="1,4", unused=1)
    assert r0["skipped"] == r1["skipped"] == [0, 1, 0, 0, 1, 0]
    assert r0["scales"] == r1["scales"]
    _assert_states(r0, r1, rtol=0, atol=0)
    assert r0["state"]["aux.weight"] != _cpp(2, tmp_path, "unused_untrained", steps=0, unused=1)[0]["state"]["aux.weight"]


def test_cpp_scaler_all_reduces_a_rank_local_inf(tmp_path):
    # GradScaler::set_process_group: rank 1's grad is inf, rank 0's finite; alone rank 0 sees no
    # inf, with the group both do.
    r0, r1 = _cpp(2, tmp_path, "local", steps=0)
    assert (r0["found_inf_local"], r1["found_inf_local"]) == (0, 1)
    assert (r0["found_inf_collective"], r1["found_inf_collective"]) == (1, 1)


def test_cpp_accumulation_communicates_only_on_the_last_micro_step(tmp_path):
    common = dict(steps=4, accum=3, dtype="float", inf_steps="2")
    r0, r1 = _cpp(2, tmp_path, "accum", count=1, **common)
    (ref,) = _cpp(None, tmp_path, "accum_ref", **common)
    for run in (r0, r1):
        counts = run["collectives"]
        assert len(counts) == 12
        assert [c for i, c in enumerate(counts) if i % 3 != 2] == [0] * 8, counts
        # The last micro-step: the buffer broadcast, the gradient bucket(s), the found_inf
        # all-reduce (and, once, the broadcast of the rebuilt bucket order).
        assert all(c >= 3 for i, c in enumerate(counts) if i % 3 == 2), counts
    assert r0["collectives"] == r1["collectives"]
    assert r0["skipped"] == r1["skipped"] == ref["skipped"] == [0, 0, 1, 0]
    _assert_states(r0, r1, rtol=0, atol=0)
    _assert_states(r0, ref, **TOLERANCE["float"])


def test_cpp_checkpoint_at_world_size_two_resumes_at_one_and_two(tmp_path):
    ckpt = tmp_path / "trainer.pt"
    common = dict(steps=6, dtype="float", inf_steps="4")
    full0, full1 = _cpp(2, tmp_path, "full", save_at=3, checkpoint=ckpt, **common)
    assert ckpt.exists()
    # World size 2 again: the same computation, bitwise (a sum of two terms has one order).
    res0, res1 = _cpp(2, tmp_path, "resume2", start=3, resume=ckpt, **common)
    _assert_states(res0, full0, rtol=0, atol=0)
    _assert_states(res1, full0, rtol=0, atol=0)
    assert res0["skipped"] == res1["skipped"] == full0["skipped"][3:] == [0, 1, 0]
    assert res0["final_scale"] == full0["final_scale"]
    # World size 1 on the concatenated batch: the single-process tolerance.
    (single,) = _cpp(None, tmp_path, "resume1", start=3, resume=ckpt, **common)
    assert single["skipped"] == full0["skipped"][3:]
    assert single["final_scale"] == full0["final_scale"]
    _assert_states(single, full0, **TOLERANCE["float"])


def _py(world_size, tmp_path, tag, **options):
    args = [sys.executable, PY_WORKER, "--out", "{out}"]
    for k, v in options.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return _launch(args, world_size, tmp_path, tag)


PY_INF_STEPS = "1,3"
PY_EXPECTED = [0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("wrap, ours, oracle", [
    # Plain grads that differ per rank (the inf is written after DDP's all-reduce): ampkit's
    # process_group= against torch's ShardedGradScaler, which all-reduces found_inf.
    ("ddp", "ampkit_group", "sharded"),
    # FSDP2's DTensor grads: the inf is in rank 1's shard only; torch's scaler reduces found_inf
    # through DTensor's rule for the unscale op, ampkit's over the mesh itself.
    ("fsdp2", "ampkit", "torch"),
])
def test_python_scaler_skips_a_rank_local_inf_on_every_rank(tmp_path, wrap, ours, oracle):
    a0, a1 = _py(2, tmp_path, "ours", wrap=wrap, scaler=ours, inf_steps=PY_INF_STEPS)
    t0, t1 = _py(2, tmp_path, "oracle", wrap=wrap, scaler=oracle, inf_steps=PY_INF_STEPS)
    assert a0["skipped"] == a1["skipped"] == t0["skipped"] == t1["skipped"] == PY_EXPECTED
    assert a0["scales"] == a1["scales"] == t0["scales"]
    _assert_states(a0, a1, rtol=0, atol=0)
    _assert_states(a0, t0, rtol=0, atol=0)


def test_python_scaler_without_a_group_decides_per_rank_under_ddp(tmp_path):
    # The control of the case above: without process_group (and without DTensor grads) the
    # decision is local, as torch.amp.GradScaler's: rank 0 does not see rank 1's inf.
    r0, r1 = _py(2, tmp_path, "local", wrap="ddp", scaler="ampkit", inf_steps=PY_INF_STEPS)
    assert r1["skipped"] == PY_EXPECTED and r0["skipped"] == [0] * 6


def test_python_trainer_under_ddp_equals_the_loop_by_hand(tmp_path):
    # ampkit.Trainer (no_sync on the first micro-batch of each window) against torch's autocast,
    # torch's scaler and DDP's no_sync written out; rank 1's loss is inf at step 2.
    r0, r1 = _py(2, tmp_path, "trainer", wrap="ddp", loop="trainer", scaler="ampkit", inf_steps="2")
    h0, _ = _py(2, tmp_path, "by_hand", wrap="ddp", loop="by_hand", scaler="torch", inf_steps="2")
    assert r0["skipped"] == r1["skipped"] == h0["skipped"] == [0, 0, 1, 0, 0, 0]
    assert r0["scales"] == h0["scales"]
    _assert_states(r0, r1, rtol=0, atol=0)
    _assert_states(r0, h0, rtol=0, atol=0)


def test_python_trainer_under_fsdp2(tmp_path):
    r0, r1 = _py(2, tmp_path, "fsdp2_trainer", wrap="fsdp2", loop="trainer", scaler="ampkit", inf_steps="2")
    assert r0["skipped"] == r1["skipped"] == [0, 0, 1, 0, 0, 0]
    assert r0["scales"] == r1["scales"]
    _assert_states(r0, r1, rtol=0, atol=0)


def test_python_ampkit_optim_under_fsdp2(tmp_path):
    """ampkit.optim.SGD on FSDP2's sharded parameters (each rank steps its DTensor shards' local
    tensors) under ampkit's scaler, against torch.optim.SGD in the same setup: the same skips, and
    the same parameters up to the rounding of torch's unfused update (add with alpha vs the fused
    kernel's multiply-add order)."""
    r0, r1 = _py(2, tmp_path, "fsdp2_optim", wrap="fsdp2", scaler="ampkit", optim="ampkit", inf_steps=PY_INF_STEPS)
    t0, _ = _py(2, tmp_path, "fsdp2_torch_optim", wrap="fsdp2", scaler="ampkit", optim="torch",
                inf_steps=PY_INF_STEPS)
    assert r0["skipped"] == r1["skipped"] == t0["skipped"] == PY_EXPECTED
    _assert_states(r0, r1, rtol=0, atol=0)
    _assert_states(r0, t0, rtol=1e-5, atol=1e-6)


def test_overlap_benchmark_runs(tmp_path):
    out = subprocess.run([sys.executable, ROOT / "benchmarks" / "bench_ddp_overlap.py", "--tiny", "--steps", "2",
                          "--caps", "25"], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| 25 MB |" in out.stdout and "hidden" in out.stdout


def test_python_scaler_process_group_argument():
    import ampkit

    with pytest.raises(ValueError, match="expected process_group to be a torch.distributed.ProcessGroup or None, "
                                         "got 'world'"):
        ampkit.GradScaler("cpu", process_group="world")
    assert ampkit.GradScaler("cpu", process_group=None)._process_group is None


def test_example_train_ddp_runs_as_two_processes(tmp_path):
    # The README's launcher line: two processes of build/examples/train_ddp on 127.0.0.1.
    example = BUILD / "examples" / "train_ddp"
    assert example.exists(), f"expected the example at {example}"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([str(example)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        # The example prints a few lines only: no pipe fills up while the other rank waits.
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world size 2: final loss" in outs[0]
