"""The benchmark scripts run end to end and write what they promise (tiny sizes; no timing asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import fp32_vs_amp  # noqa: E402

KEYS = {"model", "mode", "step_ms", "p10_ms", "p90_ms", "speedup_vs_fp32", "ratio_vs_torch", "peak_mem_mb",
        "final_loss", "loss_rel_diff", "skipped_steps"}


def test_fp32_vs_amp_every_cpu_mode(tmp_path):
    modes = "fp32,ampkit-bf16,ampkit-fp16,torch-bf16,torch-fp16"
    out = fp32_vs_amp.main(["--device", "cpu", "--tiny", "--modes", modes, "--steps", "3", "--warmup", "1",
                            "--chunk", "2", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
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
