"""The benchmark scripts run end to end and write what they promise (tiny sizes; no timing asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import fp32_vs_amp  # noqa: E402

KEYS = {"model", "mode", "step_ms", "p10_ms", "p90_ms", "speedup_vs_fp32", "ratio_vs_torch", "peak_mem_mb",
        "final_loss", "loss_rel_diff", "skipped_steps"}


def test_fp32_vs_amp_every_cpu_mode(tmp_path):
    modes = "fp32,ampkit-bf16,ampkit-fp16,torch-bf16,torch-fp16"
    # The three original models (gpt and the low-precision modes: test_fp32_vs_amp_lowp_modes_gpt_and_bytes_per_param;
    # each model here adds a fresh process per mode for the peak-RSS probes).
    out = fp32_vs_amp.main(["--device", "cpu", "--tiny", "--models", "mlp,transformer,cnn", "--modes", modes,
                            "--steps", "3", "--warmup", "1", "--chunk", "2", "--json", str(tmp_path / "r.json"),
                            "--plot", str(tmp_path / "r.png")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["device"] == "cpu" and data["torch"] == out["torch"]
    rows = data["results"]
    assert {(r["model"], r["mode"]) for r in rows} == {(m, o) for m in ("mlp", "transformer", "cnn")
                                                       for o in modes.split(",")}
    for r in rows:
        assert KEYS <= set(r)
        assert r["p10_ms"] <= r["step_ms"] <= r["p90_ms"]
        assert math.isfinite(r["final_loss"])
        assert 0 <= r["skipped_steps"] <= 4
        if r["mode"] == "fp32":
            assert r["speedup_vs_fp32"] == 1.0 and r["loss_rel_diff"] == 0.0
        assert (r["ratio_vs_torch"] is not None) == r["mode"].startswith("ampkit-")
        # Same seed and data: AMP ends near fp32 (tiny models, few steps).
        assert r["loss_rel_diff"] < 0.05
    # fp16 with a scaler of 65536 on these tiny models: the first steps may be skipped, alike in both libraries.
    skipped = {(r["model"], r["mode"]): r["skipped_steps"] for r in rows}
    for m in ("mlp", "transformer", "cnn"):
        assert skipped[(m, "ampkit-fp16")] == skipped[(m, "torch-fp16")]
    assert (tmp_path / "r.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- low-precision parameters
LOWP_MODES = "fp32,ampkit-bf16,ampkit-bf16-master,ampkit-bf16-sr,torch-bf16,torch-bf16-control"


def test_fp32_vs_amp_lowp_modes_gpt_and_bytes_per_param(tmp_path):
    out = fp32_vs_amp.main(["--device", "cpu", "--tiny", "--models", "transformer,gpt", "--modes", LOWP_MODES,
                            "--steps", "3", "--warmup", "1", "--chunk", "2", "--no-memory", "--json",
                            str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["modes"] == LOWP_MODES.split(",") and data["results"] == json.loads(json.dumps(out["results"]))
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(m, o) for m in ("transformer", "gpt") for o in LOWP_MODES.split(",")}
    for model in ("transformer", "gpt"):
        for mode in ("ampkit-bf16-master", "ampkit-bf16-sr"):
            r = rows[(model, mode)]
            assert r["peer"] == "torch-bf16"
            assert r["ratio_vs_torch"] == pytest.approx(r["step_ms"] / rows[(model, "torch-bf16")]["step_ms"])
            assert math.isfinite(r["final_loss"]) and r["loss_rel_diff"] < 0.05
        mem = {mode: rows[(model, mode)]["param_memory"] for mode in LOWP_MODES.split(",")}
        for m in mem.values():
            parts = sum(m[k] for k in ("params", "grads", "optimizer_states", "step_counters", "masters",
                                       "cached_casts"))
            assert m["total"] == parts and m["bytes_per_param"] == pytest.approx(m["total"] / m["numel"])
        # torch-bf16: fp32 params, grads and AdamW states (16) + the bf16 weight casts; master: no cast, bf16
        # params and grads, fp32 masters and states (16); SR with bf16 states: 8 (+ the fp32 norm layers).
        assert mem["fp32"]["cached_casts"] == 0 and mem["fp32"]["bytes_per_param"] == pytest.approx(16, abs=0.1)
        assert mem["torch-bf16"]["cached_casts"] > 0 and mem["torch-bf16"]["masters"] == 0
        assert mem["ampkit-bf16"]["cached_casts"] == mem["torch-bf16"]["cached_casts"]
        assert mem["ampkit-bf16"]["casts_recorded"] == mem["ampkit-bf16"]["ampkit_cache_entries"] > 0
        assert mem["torch-bf16-control"] == mem["torch-bf16"]
        assert mem["ampkit-bf16-master"]["masters"] > 0 and mem["ampkit-bf16-master"]["cached_casts"] == 0
        assert mem["ampkit-bf16-sr"]["masters"] == 0 and mem["ampkit-bf16-sr"]["cached_casts"] == 0
        assert (mem["ampkit-bf16-sr"]["bytes_per_param"] < mem["ampkit-bf16-master"]["bytes_per_param"]
                < mem["torch-bf16"]["bytes_per_param"])
        assert mem["ampkit-bf16-master"]["bytes_per_param"] == pytest.approx(16, abs=0.1)
    assert (tmp_path / "r.png").stat().st_size > 1000


def expected_param_memory(run, cast_elements):
    """What param_memory should count, from the tensors' own sizes (no storage walking)."""
    params = list(dict.fromkeys(run.model.parameters()))
    states = masters = steps = 0
    for p in params:
        for k, v in run.opt.state[p].items():
            if isinstance(v, torch.Tensor):
                if k == "master":
                    masters += v.numel() * v.element_size()
                elif k == "step":
                    steps += v.numel() * v.element_size()
                else:
                    states += v.numel() * v.element_size()
    size = sum(p.numel() * p.element_size() for p in params)
    return {"params": size, "grads": size, "optimizer_states": states, "step_counters": steps, "masters": masters,
            "cached_casts": 2 * cast_elements, "numel": sum(p.numel() for p in params)}


@pytest.mark.parametrize("model_name", ["transformer", "gpt"])
def test_param_memory_counts_each_storage(model_name):
    def norm_or_pos(name):
        return "norm" in name or name == "pos.weight"  # not consumed by a bf16 op (layer_norm is fp32 on the CPU)

    for mode in ("torch-bf16", "ampkit-bf16", "ampkit-bf16-master", "ampkit-bf16-sr"):
        run = fp32_vs_amp.Run(model_name, mode, "cpu", 0, tiny=True)
        run.step()
        run.step()
        named = dict(run.model.named_parameters())  # a tied weight once, under its first name
        cast = sum(p.numel() for n, p in named.items() if not norm_or_pos(n)) if mode.count("-") == 1 else 0
        got = fp32_vs_amp.param_memory(run)
        want = expected_param_memory(run, cast)
        assert {k: got[k] for k in want} == want, mode
        assert all(p.grad is None for p in run.model.parameters())  # the measurement leaves no grads behind
        if mode == "ampkit-bf16-master":
            lowp = sum(p.numel() for p in named.values() if p.dtype == torch.bfloat16)
            assert got["masters"] == 4 * lowp > 0
        if mode == "ampkit-bf16-sr":
            assert all(v.dtype == torch.bfloat16 for p in named.values() if p.dtype == torch.bfloat16
                       for k, v in run.opt.state[p].items() if k.startswith("exp_avg"))
        run.step()  # training goes on after the measurement


def test_gpt_workload_is_a_language_model():
    build, data, batch = fp32_vs_amp.make_workload("gpt", "cpu", tiny=True)
    s = fp32_vs_amp.TINY["gpt"]
    model = build()
    assert model.head.weight is model.tok.weight  # tied
    x, y = data[0]
    assert x.shape == (s["batch"], s["seq"]) and y.shape == (s["batch"] * s["seq"],) and batch == s["batch"]
    # Next tokens: y is x shifted by one.
    assert torch.equal(x[:, 1:].flatten(), y.view(s["batch"], s["seq"])[:, :-1].flatten())
    logits = model(x)
    assert logits.shape == (s["batch"] * s["seq"], s["vocab"])
    # Small initial logits (GPT-2 init): the first loss is about log(vocab).
    assert F.cross_entropy(logits, y).item() == pytest.approx(math.log(s["vocab"]), rel=0.05)
    # Causal: the logits at position t do not depend on later tokens.
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % s["vocab"]
    same = model(x2).view(s["batch"], s["seq"], -1)[:, :-1]
    assert torch.allclose(same, logits.view(s["batch"], s["seq"], -1)[:, :-1], atol=1e-5)
    # The Markov chain's transitions: each row a distribution over at most 4 successors.
    g = torch.Generator().manual_seed(0)
    _, chain = fp32_vs_amp.markov_tokens(32, 2, 8, 1, g, return_chain=True)
    assert torch.allclose(chain.sum(1), torch.ones(32)) and int((chain > 0).sum(1).max()) <= 4


def test_lowp_mode_names_and_peers():
    assert fp32_vs_amp.mode_parts("ampkit-bf16-master") == ("ampkit", "bf16", "master")
    assert fp32_vs_amp.mode_parts("ampkit-bf16-sr-control") == ("ampkit", "bf16", "sr")
    assert fp32_vs_amp.mode_parts("fp32") == ("fp32", "", "")
    assert fp32_vs_amp.peer_mode("ampkit-bf16-master") == "torch-bf16" == fp32_vs_amp.peer_mode("ampkit-bf16-sr")
    assert fp32_vs_amp.peer_mode("ampkit-bf16-sr-control") == "ampkit-bf16-sr"
    with pytest.raises(SystemExit):
        fp32_vs_amp.main(["--device", "cpu", "--tiny", "--modes", "ampkit-bf16-foo"])


def test_lowp_step_bytes_and_bandwidth(tmp_path):
    out = tmp_path / "l.json"
    run_script("bench_lowp_step.py", "--numel", "4096", "--tensors", "2", "--repeats", "3", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "lowp_step" and data["cpu_clock"] == "process" and data["cpu"]
    assert "other_load_cores" in data and data["params"] == 8192
    rows = {r["variant"]: r for r in data["results"]}
    assert {v: r["bytes_per_param"] for v, r in rows.items()} == {
        "ampkit-master": 28, "ampkit-sr-bf16": 14, "ampkit-sr-fp32": 22, "torch-composed-master": 40,
        "torch-fused-fp32": 28}
    for r in rows.values():
        assert r["bytes_per_param"] == r["bytes_read_per_param"] + r["bytes_written_per_param"]
        assert r["gb_per_s_wall"] == pytest.approx(r["bytes_per_param"] * 8192 / (r["wall_ms"] * 1e-3) / 1e9)
        assert r["p10_ms"] <= r["wall_ms"] <= r["p90_ms"] and r["cpu_p10_ms"] <= r["cpu_ms"] <= r["cpu_p90_ms"]
        assert r["wall_over_torch-fused-fp32"] == pytest.approx(r["wall_ms"] / rows["torch-fused-fp32"]["wall_ms"])
    # ampkit's master step is torch's fused step on the float32 master with the grad upcast, bitwise.
    assert data["master_matches_composed"] is True


def test_convergence_lowp_smoke(tmp_path):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    modes = "fp32,torch-bf16,ampkit-bf16-master,ampkit-bf16-sr,ampkit-bf16-nearest"
    run_script("convergence_lowp.py", "--tiny", "--steps", "5", "--modes", modes, "--json", str(out), "--plot",
               str(png))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "convergence_lowp" and data["cpu"] and data["steps"] == 5 and data["tiny"]
    assert list(data["runs"]) == modes.split(",") and data["final_window"] == 5
    assert data["reference_modes"] == ["ampkit-bf16-nearest"]
    assert data["entropy_floor"] < data["initial_loss_uniform"] == pytest.approx(math.log(64))
    fp32 = data["runs"]["fp32"]
    assert fp32["rel_diff_vs_fp32"] == 0.0
    for r in data["runs"].values():
        assert len(r["losses"]) == 5 and all(math.isfinite(v) for v in r["losses"])
        assert r["final_loss"] == pytest.approx(sum(r["losses"]) / 5, abs=1e-5)
        assert r["rel_diff_vs_fp32"] == pytest.approx((r["final_loss"] - fp32["final_loss"]) / fp32["final_loss"])
        assert abs(r["rel_diff_vs_fp32"]) < 0.05
        assert r["losses"][0] == pytest.approx(math.log(64), rel=0.05)  # same initial weights: the same start
    assert png.stat().st_size > 1000
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "convergence_lowp.py"), "--modes", "fp16"],
                         capture_output=True, timeout=300)
    assert bad.returncode != 0


def test_render_lowp_goal_lines(tmp_path):
    def row(mode, t, b, loss, peer="torch-bf16"):
        return {"model": "gpt", "mode": mode, "step_ms": 10.0, "p10_ms": 9.0, "p90_ms": 11.0, "cpu_ms": 20.0,
                "cpu_p10_ms": 19.0, "cpu_p90_ms": 21.0, "speedup_vs_fp32": 2.0, "speedup_vs_fp32_cpu": 2.0,
                "peer": peer, "ratio_vs_torch": t, "ratio_vs_torch_cpu": t, "peak_mem_mb": 1.0,
                "param_bytes_per_param": b, "loss_rel_diff": loss}
    rows = [row("fp32", None, 16.0, 0.0, None), row("torch-bf16", None, 17.98, 0.001, None),
            row("torch-bf16-control", 1.01, 17.98, 0.001), row("ampkit-bf16-master", 0.9, 16.0, 0.002),
            row("ampkit-bf16-sr", 1.2, 8.01, 0.02)]
    path = tmp_path / "fp32_vs_amp_cpu.json"
    path.write_text(json.dumps({"cpu": "Test CPU", "torch": "9.9", "steps": 3, "warmup": 1, "chunk": 1,
                                "results": rows}))
    text = render_readme.render_fp32_vs_amp([str(path)])
    assert "| param B |" in text and "| 16.00 |" in text
    master = text[text.index("- gpt, ampkit-bf16-master"):]
    assert "goal <= 0.95: met" in master
    assert "16.00000 bytes per parameter (goal <= 16: met; torch-bf16 17.98)" in master
    assert "torch-bf16-control: 1.010 / 1.010" in master
    sr = text[text.index("- gpt, ampkit-bf16-sr"):]
    assert "goal <= 0.95: not met" in sr and "8.01000 bytes per parameter (goal <= 8: not met" in sr
    assert "(goal <= 1%: not met)" in sr


def test_fp32_vs_amp_rejects_bad_flags():
    with pytest.raises(SystemExit):
        fp32_vs_amp.main(["--device", "cpu", "--models", "resnet"])
    with pytest.raises(SystemExit):
        fp32_vs_amp.main(["--device", "cpu", "--modes", "tf32"])


def test_autocast_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "o.json"
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_autocast_overhead.py"), "--rounds", "3",
                    "--calls", "50", "--json", str(out)], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["results"]
    assert [r["op"] for r in rows] == ["mm 16x16 (listed)", "relu (unlisted)"]
    assert all(r["ampkit_us"] > 0 for r in rows)


def test_grad_scaler_benchmark_runs(tmp_path):
    out = tmp_path / "g.json"
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_grad_scaler.py"), "--elements", "100000",
                    "--tensors", "10", "--repeats", "3", "--warmup", "1", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["elements"] == 100000 and data["ratio_of_medians"] > 0


def test_sgd_lowp_benchmark_runs(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_sgd_lowp.py"), "--numel", "1000", "--tensors", "2",
                    "--repeats", "3", "--json", str(out)], check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["cpu"] and isinstance(data["cpu_flags"], list)
    assert [r["dtype"] for r in data["results"]] == ["bfloat16", "float16"]
    for r in data["results"]:
        assert set(r["median"]) == {"torch-foreach", "torch-control", "ampkit"}
        assert r["ampkit_over_torch_foreach_wall"] > 0 and r["control_over_torch_foreach_wall"] > 0


# ----------------------------------------------------------------------------- shared helpers
import _common  # noqa: E402
import render_readme  # noqa: E402


def test_common_percentile_matches_torch_quantile():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 16, 31):
        values = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
            assert _common.percentile(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert _common.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    with pytest.raises(ValueError):
        _common.percentile([], 0.5)
    assert _common.summary([1.0, 2.0, 3.0], "ms", 1e3) == {"median_ms": 2000.0, "p10_ms": 1200.0, "p90_ms": 2800.0}


def test_common_header_describes_the_machine():
    torch = pytest.importorskip("torch")
    h = _common.header("x", cpu_clock="process", threads=3)
    assert h["benchmark"] == "x" and h["torch"] == torch.__version__ and h["threads"] == 3
    assert h["cpu"] == _common.cpu_model() and h["cpu"]
    assert set(h["cpu_flags"]) <= set(_common.VECTOR_FLAGS)
    assert h["cpu_clock"] == "process" and "CLOCK_PROCESS_CPUTIME_ID" in h["cpu_clock_doc"]
    assert _common.header("x")["threads"] == torch.get_num_threads() and "cpu_clock" not in _common.header("x")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        assert names and h["cpu"] == names[0]


def test_common_other_load_arithmetic(monkeypatch):
    # Machine busy 3 s, this process 1 s of it, over 2 s of wall time: other processes held 1 core.
    busy, own, wall = iter([100.0, 103.0]), iter([10.0, 11.0]), iter([50.0, 52.0])
    monkeypatch.setattr(_common, "_machine_busy_s", lambda: next(busy))
    monkeypatch.setattr(_common, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(_common.time, "perf_counter", lambda: next(wall))
    with _common.OtherLoad() as load:
        pass
    assert load.cores == 1.0
    assert _common.header("x", other_load=load)["other_load_cores"] == 1.0
    # Tick rounding can make the difference negative: clamped to 0. Without /proc/stat: None.
    busy, own, wall = iter([100.0, 100.0]), iter([10.0, 10.02]), iter([0.0, 1.0])
    assert _common.OtherLoad().start().stop().cores == 0.0
    monkeypatch.setattr(_common, "_machine_busy_s", lambda: None)
    wall = iter([0.0, 1.0])
    own = iter([1.0, 2.0])
    assert _common.OtherLoad().start().stop().cores is None


def test_common_timer_clocks():
    # A sleep takes wall time and almost no CPU time on either clock (no timing asserted beyond order).
    for clock in ("thread", "process"):
        with _common.Timer(clock) as t:
            import time

            time.sleep(0.05)
        assert t.wall_s >= 0.05 and 0 <= t.cpu_s < t.wall_s
    with pytest.raises(KeyError):
        _common.Timer("wall")


# ----------------------------------------------------------------------------- fp32_vs_amp.py: control, CPU time
def test_fp32_vs_amp_control_row_and_cpu_time(tmp_path):
    modes = "fp32,ampkit-bf16,torch-bf16,torch-bf16-control"
    fp32_vs_amp.main(["--device", "cpu", "--tiny", "--models", "mlp,cnn", "--modes", modes, "--steps", "4",
                      "--warmup", "1", "--chunk", "2", "--no-memory", "--json", str(tmp_path / "r.json")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["benchmark"] == "fp32_vs_amp" and data["cpu_clock"] == "process" and data["cpu"]
    assert data["threads"] >= 1 and isinstance(data["cpu_flags"], list) and data["modes"] == modes.split(",")
    assert data["other_load_cores"] is None or data["other_load_cores"] >= 0
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    for (model, mode), r in rows.items():
        assert r["samples"] == 4
        assert r["cpu_p10_ms"] <= r["cpu_ms"] <= r["cpu_p90_ms"] and r["cpu_ms"] > 0
        fp32 = rows[(model, "fp32")]
        assert r["speedup_vs_fp32"] == pytest.approx(fp32["step_ms"] / r["step_ms"])
        assert r["speedup_vs_fp32_cpu"] == pytest.approx(fp32["cpu_ms"] / r["cpu_ms"])
        peer = {"ampkit-bf16": "torch-bf16", "torch-bf16-control": "torch-bf16"}.get(mode)
        assert r["peer"] == peer
        if peer:
            assert r["ratio_vs_torch"] == pytest.approx(r["step_ms"] / rows[(model, peer)]["step_ms"])
            assert r["ratio_vs_torch_cpu"] == pytest.approx(r["cpu_ms"] / rows[(model, peer)]["cpu_ms"])
        else:
            assert r["ratio_vs_torch"] is None and r["ratio_vs_torch_cpu"] is None
        # The control is an identical copy: same seed, data and ops, so the same losses.
        assert rows[(model, "torch-bf16-control")]["final_loss"] == rows[(model, "torch-bf16")]["final_loss"]


def test_fp32_vs_amp_rejects_bad_control_modes():
    for modes in ("torch-bf16,torch-bf16", "resnet-control", "tf32-control"):
        with pytest.raises(SystemExit):
            fp32_vs_amp.main(["--device", "cpu", "--tiny", "--modes", modes])
    assert fp32_vs_amp.base_mode("torch-bf16-control") == "torch-bf16"
    assert fp32_vs_amp.peer_mode("ampkit-fp16") == "torch-fp16" and fp32_vs_amp.peer_mode("fp32") is None


# ----------------------------------------------------------------------------- the other Python scripts
def run_script(name, *args):
    return subprocess.run([sys.executable, os.path.join(BENCH, name), *args], check=True, capture_output=True,
                          text=True, timeout=300)


def test_autocast_overhead_control_and_thread_cpu_time(tmp_path):
    out = tmp_path / "o.json"
    run_script("bench_autocast_overhead.py", "--rounds", "3", "--calls", "20", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "autocast_overhead" and data["cpu_clock"] == "thread" and data["threads"] == 1
    assert "other_load_cores" in data
    assert data["modes"] == ["none", "torch", "torch-control", "ampkit"]
    for r in data["results"]:
        for m in data["modes"]:
            assert r[m]["p10_us"] <= r[m]["median_us"] <= r[m]["p90_us"]
            assert r[m]["p10_cpu_us"] <= r[m]["median_cpu_us"] <= r[m]["p90_cpu_us"]
        for kind, key in (("wall", "median_us"), ("cpu", "median_cpu_us")):
            assert r[f"control_over_torch_{kind}"] == pytest.approx(r["torch-control"][key] / r["torch"][key])
            assert r[f"ampkit_over_torch_{kind}"] == pytest.approx(r["ampkit"][key] / r["torch"][key])
        assert r["ampkit_us"] == r["ampkit"]["median_us"]


def test_grad_scaler_small_preset_and_control(tmp_path):
    out = tmp_path / "g.json"
    # The small preset's 2000 tensors, with fewer elements and repeats than the committed run.
    run_script("bench_grad_scaler.py", "--preset", "small", "--elements", "20000", "--repeats", "3", "--warmup", "1",
               "--json", str(out))
    data = json.loads(out.read_text())
    assert data["preset"] == "small" and data["tensors"] == 2000 and data["elements"] == 20000
    assert data["benchmark"] == "grad_scaler" and data["cpu_clock"] == "process" and data["cpu"]
    assert "other_load_cores" in data
    res = data["results"]
    assert set(res) == {"torch", "torch-control", "ampkit"} == set(data["scalers"])
    for r in res.values():
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["p10_cpu_ms"] <= r["median_cpu_ms"] <= r["p90_cpu_ms"]
    assert data["ratio_of_medians"] == pytest.approx(res["ampkit"]["median_ms"] / res["torch"]["median_ms"])
    assert data["control_ratio_of_cpu_medians"] == pytest.approx(
        res["torch-control"]["median_cpu_ms"] / res["torch"]["median_cpu_ms"])
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "bench_grad_scaler.py"), "--tensors", "0"],
                         capture_output=True, timeout=300)
    assert bad.returncode != 0


def test_sgd_lowp_records_clock_and_cpu_ratios(tmp_path):
    out = tmp_path / "s.json"
    run_script("bench_sgd_lowp.py", "--numel", "1000", "--tensors", "2", "--repeats", "3", "--dtype", "bfloat16",
               "--json", str(out))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "sgd_lowp" and data["cpu_clock"] == "process" and "other_load_cores" in data
    (r,) = data["results"]
    m = r["median"]
    assert r["ampkit_over_torch_foreach_cpu"] == pytest.approx(m["ampkit"]["cpu_ms"] / m["torch-foreach"]["cpu_ms"])
    for name in m:
        assert r["p10"][name]["wall_ms"] <= m[name]["wall_ms"] <= r["p90"][name]["wall_ms"]


# ----------------------------------------------------------------------------- the C++ benchmark
CPP_BENCH = os.path.join(os.environ.get("AMPKIT_BUILD_DIR", os.path.join(ROOT, "build")), "benchmarks",
                         "fp32_vs_amp_cpp")


@pytest.mark.skipif(not os.path.exists(CPP_BENCH), reason=f"{CPP_BENCH} is not built")
def test_fp32_vs_amp_cpp_modes_ratios_and_json(tmp_path):
    out = tmp_path / "c.json"
    subprocess.run([CPP_BENCH, "--device", "cpu", "--tiny", "--steps", "3", "--chunk", "1", "--warmup", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fp32_vs_amp_cpp" and data["cpu_clock"] == "process" and data["samples"] == 3
    assert data["cpu"] == _common.cpu_model() and data["cpu_flags"] == _common.cpu_flags()
    assert data["other_load_cores"] is None or data["other_load_cores"] >= 0
    modes = ["fp32", "torch-bf16", "torch-bf16-control", "ampkit-fp32", "ampkit-bf16", "ampkit-bf16-master",
             "ampkit-bf16-sr"]
    assert data["modes"] == modes
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(m, o) for m in ("mlp", "transformer", "cnn") for o in modes}
    expected = {  # mode: (peer, AMP baseline)
        "fp32": (None, None), "torch-bf16": (None, "fp32"), "torch-bf16-control": ("torch-bf16", "fp32"),
        "ampkit-fp32": ("fp32", None), "ampkit-bf16": ("torch-bf16", "ampkit-fp32"),
        "ampkit-bf16-master": ("torch-bf16", "ampkit-fp32"), "ampkit-bf16-sr": ("torch-bf16", "ampkit-fp32")}
    for (model, mode), r in rows.items():
        assert r["samples"] == 3 and r["p10_ms"] <= r["step_ms"] <= r["p90_ms"]
        assert r["cpu_p10_ms"] <= r["cpu_ms"] <= r["cpu_p90_ms"]
        peer, base = expected[mode]
        assert (r["peer"], r["amp_baseline"]) == (peer, base)
        fp32 = rows[(model, "fp32")]
        assert r["speedup_vs_fp32"] == pytest.approx(fp32["step_ms"] / r["step_ms"], rel=1e-6)
        assert r["speedup_vs_fp32_cpu"] == pytest.approx(fp32["cpu_ms"] / r["cpu_ms"], rel=1e-6)
        for key, of, inverse in (("ratio_vs_peer", peer, False), ("amp_gain", base, True)):
            if of is None:
                assert r[key] is None and r[key + "_cpu"] is None
                continue
            o = rows[(model, of)]
            wall, cpu = (o["step_ms"] / r["step_ms"], o["cpu_ms"] / r["cpu_ms"])
            if not inverse:
                wall, cpu = 1 / wall, 1 / cpu
            assert r[key] == pytest.approx(wall, rel=1e-6) and r[key + "_cpu"] == pytest.approx(cpu, rel=1e-6)
        assert math.isfinite(r["final_loss"]) and r["loss_rel_diff"] < 0.05
        # The control is an identical copy of torch-bf16: the same losses.
        assert rows[(model, "torch-bf16-control")]["final_loss"] == rows[(model, "torch-bf16")]["final_loss"]
    bad = subprocess.run([CPP_BENCH, "--tiny", "--modes", "torch-bf16,torch-bf16"], capture_output=True, timeout=300)
    assert bad.returncode == 2 and b"twice" in bad.stderr


# ----------------------------------------------------------------------------- README tables
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(BENCH, "results")


def test_readme_tables_match_committed_results(capsys):
    assert render_readme.main(["--check"]) == 0, capsys.readouterr()


def benchmarks_section(text):
    start = text.index("\n## Benchmarks\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_benchmark_table_is_rendered():
    section = benchmarks_section(open(README, encoding="utf-8").read())
    outside = render_readme.MARKER.sub("", section)
    assert [line for line in outside.splitlines() if line.startswith("|")] == []
    assert set(m.group("name") for m in render_readme.MARKER.finditer(section)) == set(render_readme.BLOCKS)


def copy_results(tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    readme = tmp_path / "README.md"
    shutil.copy(README, readme)
    return readme, results


def test_render_check_fails_on_drift_and_rendering_fixes_it(tmp_path):
    readme, results = copy_results(tmp_path)
    args = ["--readme", str(readme), "--results", str(results)]
    assert render_readme.main(args + ["--check"]) == 0
    data = json.loads((results / "sgd_lowp_cpu.json").read_text())
    data["cpu"] = "Test CPU 9000"
    data["results"][0]["ampkit_over_torch_foreach_wall"] = 0.123456
    (results / "sgd_lowp_cpu.json").write_text(json.dumps(data))
    assert render_readme.main(args + ["--check"]) == 1
    assert render_readme.main(args) == 0
    text = readme.read_text()
    block = text[text.index("<!-- results:sgd_lowp_cpu -->"):]
    block = block[:block.index("<!-- /results -->")]
    assert "Test CPU 9000" in block and "**0.123**" in block
    assert render_readme.main(args + ["--check"]) == 0
    # Text outside the blocks is left alone.
    assert render_readme.MARKER.sub("", text) == render_readme.MARKER.sub("", open(README, encoding="utf-8").read())


def test_render_rejects_unrendered_results_and_missing_blocks(tmp_path):
    readme, results = copy_results(tmp_path)
    args = ["--readme", str(readme), "--results", str(results)]
    (results / "new_benchmark_cpu.json").write_text("{}")
    with pytest.raises(render_readme.RenderError, match="new_benchmark_cpu.json"):
        render_readme.render(readme.read_text(), str(results))
    assert render_readme.main(args + ["--check"]) == 1
    os.remove(results / "new_benchmark_cpu.json")
    text = readme.read_text()
    start = text.index("<!-- results:grad_scaler_cpu -->")
    end = text.index("<!-- /results -->", start) + len("<!-- /results -->")
    with pytest.raises(render_readme.RenderError, match="grad_scaler_cpu"):
        render_readme.render(text[:start] + text[end:], str(results))
    with pytest.raises(render_readme.RenderError, match="twice|2 times"):
        render_readme.render(text + text[start:end], str(results))


def test_instructions_table_has_the_before_column_only_when_the_json_does(tmp_path):
    row = {"op": "mm", "none_instr": 7000.4, "torch_instr": 70000.0, "ampkit_instr": 70700.0,
           "ampkit_kernel_instr": 0.0}
    path = tmp_path / "i.json"

    def rendered(rows):
        path.write_text(json.dumps({"cpu": "Test CPU", "torch": "9.9", "calls": 10, "results": rows}))
        return render_readme.render_autocast_instructions([str(path)])

    text = rendered([row])
    assert "boxed kernels (before)" not in text and "Test CPU" in text
    assert "| mm | 7,000 | 70,000 | 70,700 | 1.010 |" in text
    text = rendered([{**row, "ampkit_boxed_instr": 71234.0}])
    assert "| no autocast | torch.autocast | ampkit, boxed kernels (before) | ampkit.autocast |" in text
    assert "| mm | 7,000 | 70,000 | 71,234 | 70,700 | 1.010 |" in text
    # Counts without glibc's allocator beside the totals: "all / outside malloc", the ratio from the latter.
    split = {**row, "none_instr_no_malloc": 6000.0, "torch_instr_no_malloc": 60000.0,
             "ampkit_instr_no_malloc": 60300.0}
    text = rendered([split])
    assert "| mm | 7,000 / 6,000 | 70,000 / 60,000 | 70,700 / 60,300 | 1.005 |" in text
    assert "| 71,234 |" in rendered([{**split, "ampkit_boxed_instr": 71234.0}])
