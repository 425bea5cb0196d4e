"""ampkit.precision_report and ampkit.overflow_locator (C++: ampkit::PrecisionReport /
ampkit::OverflowLocator; tests/cpp/test_diagnostics.cpp has the same cases in C++).

The oracles: torch.autocast (what each op runs in), torch.amp.GradScaler (which steps a loss scale
makes overflow), and the same computation without the tools (they must not change any result)."""
import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import ampkit
from conftest import devices


def lnmodel(device="cpu"):
    """Linear -> LayerNorm -> GELU -> Linear, the issue's report model."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 8)).to(device)


def top(rows, op, phase="forward", **match):
    out = [r for r in rows if r["op"] == op and r["phase"] == phase and not r["nested"]
           and all(r[k] == v for k, v in match.items())]
    assert out, f"no {phase} row of {op} with {match}; rows: {[(r['op'], r['phase'], r['module']) for r in rows]}"
    return out


@pytest.mark.parametrize("device", devices())
def test_report_of_linear_layernorm_gelu_linear_under_bf16(device):
    if device == "cpu":  # torch's CPU list leaves layer_norm alone; its CUDA list (the default there) runs it in fp32
        ampkit.set_policy("aten::layer_norm", "cpu", "fp32")
    model = lnmodel(device)
    x = torch.randn(4, 16, device=device)
    with ampkit.precision_report(model) as rep:
        with ampkit.autocast(device, dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    rows = rep.rows
    bf16, fp32 = torch.bfloat16, torch.float32

    (lin0,) = top(rows, "aten::linear", module="0")
    assert lin0["policy"] == "lower_precision_fp"
    assert lin0["in_dtypes"] == (bf16, bf16, bf16) and lin0["arg_dtypes"] == (fp32, fp32, fp32)
    assert lin0["out_dtype"] == bf16
    # ampkit cast the input, the weight and the bias, each to bf16 (2 bytes an element)
    assert lin0["casts"] == 3 and lin0["cached_casts"] == 0
    assert lin0["cast_bytes"] == 2 * (x.numel() + model[0].weight.numel() + model[0].bias.numel())
    (addmm0,) = [r for r in rows if r["op"] == "aten::addmm" and r["module"] == "0" and r["phase"] == "forward"]
    assert addmm0["nested"] and addmm0["policy"] is None and addmm0["in_dtypes"] == (bf16, bf16, bf16)

    (ln,) = top(rows, "aten::layer_norm")
    assert ln["module"] == "1" and ln["policy"] == "fp32"
    assert ln["arg_dtypes"] == (bf16, fp32, fp32) and ln["in_dtypes"] == (fp32, fp32, fp32)
    assert ln["out_dtype"] == fp32 and ln["casts"] == 1 and ln["cast_bytes"] == 4 * 4 * 32

    (gelu,) = top(rows, "aten::gelu")
    assert gelu["module"] == "2" and gelu["policy"] is None and gelu["in_dtypes"] == (fp32,)
    assert gelu["out_dtype"] == fp32 and gelu["casts"] == 0

    (lin3,) = top(rows, "aten::linear", module="3")
    assert lin3["policy"] == "lower_precision_fp" and lin3["out_dtype"] == bf16 and lin3["casts"] == 3
    assert lin3["cast_bytes"] == 2 * (4 * 32 + model[3].weight.numel() + model[3].bias.numel())

    # backward: the weight gradients' mm in bf16, attributed to the module of their forward
    for module in ("0", "3"):
        mms = top(rows, "aten::mm", phase="backward", module=module)
        assert all(r["in_dtypes"] == (bf16, bf16) and r["policy"] is None for r in mms)
    assert top(rows, "aten::native_layer_norm_backward", phase="backward", module="1")
    assert top(rows, "aten::gelu_backward", phase="backward", module="2")

    # the dtypes are torch.autocast's: the same model under torch's region (same table) gives the same output
    table = "\n".join(line for line in rep.table().splitlines())
    assert "aten::linear" in table and "lower_precision_fp" in table and "aten::addmm" not in table
    assert "aten::addmm" in rep.table(nested=True)


def test_report_without_the_edit_matches_torch_cpu_lists():
    model, x = lnmodel(), torch.randn(4, 16)
    with ampkit.precision_report(model) as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        ln_out = model[1](h)
    (ln,) = top(rep.rows, "aten::layer_norm")
    assert ln["policy"] is None and ln["out_dtype"] == ln_out.dtype == torch.bfloat16
    (lin,) = top(rep.rows, "aten::linear", module="0")
    assert lin["out_dtype"] == h.dtype


def test_report_counts_cached_weight_casts_and_skips_ops_outside_regions():
    model, x = lnmodel(), torch.randn(4, 16)
    with ampkit.precision_report(model) as rep:
        torch.relu(x)  # no region open: not recorded
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            model(x)
            model(x)  # the weights' casts now come from the cache
    (lin0,) = top(rep.rows, "aten::linear", module="0")
    assert lin0["calls"] == 2 and lin0["casts"] == 6 and lin0["cached_casts"] == 2
    assert not [r for r in rep.rows if r["op"] == "aten::relu"]


def test_report_covers_unlisted_and_custom_ops_and_edits():
    x = torch.randn(8, 8)
    with ampkit.precision_report() as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            torch.exp(x)
            ampkit.set_policy("aten::exp", "cpu", "lower_precision_fp")
            torch.exp(x)
    rows = top(rep.rows, "aten::exp")
    assert [(r["policy"], r["out_dtype"], r["module"]) for r in rows] == [
        (None, torch.float32, None), ("lower_precision_fp", torch.bfloat16, None)]


def test_report_does_not_change_results():
    def run(report):
        model, x = lnmodel(), torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        if report:
            with ampkit.precision_report(model):
                with ampkit.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                out.float().sum().backward()
        else:
            with ampkit.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
        return [out] + [p.grad for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_report_json_and_module_scope(tmp_path):
    x = torch.randn(4, 4)
    with ampkit.precision_report() as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16), ampkit.module_scope("head"):
            torch.mm(x, x)
    rep.to_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    (mm,) = [r for r in data["rows"] if r["op"] == "aten::mm"]
    assert mm["module"] == "head" and mm["in_dtypes"] == ["torch.bfloat16"] * 2
    assert mm["arg_dtypes"] == ["torch.float32"] * 2 and mm["out_dtype"] == "torch.bfloat16"
    assert mm["policy"] == "lower_precision_fp" and mm["casts"] == 2 and mm["cast_bytes"] == 2 * 2 * 16


class Block(torch.nn.Module):
    """A submodule whose mm overflows in fp16: |x @ w| = 8 * 100 * 300 = 240000 > 65504."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.full((8, 8), 300.0))

    def forward(self, x):
        if self.how == "mm":
            return torch.mm(x, self.w)
        return x @ self.w


def overflow_model(how="mm"):
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sequential(Block(how)))
    return model, torch.full((4, 8), 100.0)


@pytest.mark.parametrize("how, policy_op", [("mm", "aten::mm"), ("matmul", "aten::matmul")])
def test_locator_names_the_forward_mm_and_its_fix(how, policy_op):
    model, x = overflow_model(how)
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            out = model(x)
    assert not torch.isfinite(out).all()
    first = loc.first
    assert first is not None and loc.first_nonfinite_input is None
    assert (first.op, first.phase, first.module) == ("aten::mm", "forward", "1.0")
    assert first.in_dtypes == (torch.float16, torch.float16) and first.out_dtype == torch.float16
    assert first.input_absmax == (100.0, 300.0)
    assert first.policy_op == policy_op and first.policy == "lower_precision_fp"
    assert first.cause == "precision" and first.grad_fn is None
    assert first.suggested_edit == (policy_op, "cpu", "fp32")
    assert first.suggestion == f'ampkit.set_policy("{policy_op}", "cpu", "fp32")'
    assert "aten::mm" in str(first) and first.suggestion in str(first)

    first.apply_suggestion()
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            out = model(x)
    assert torch.isfinite(out).all() and out.dtype == torch.float32 and loc.first is None
    torch.testing.assert_close(out, x @ model[1][0].w, rtol=0, atol=0)


def test_locator_does_not_change_results():
    model, x = overflow_model("matmul")
    with ampkit.autocast("cpu", dtype=torch.float16):
        plain = model(x)
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            watched = model(x)
    assert loc.first is not None and torch.equal(plain, watched)


class Head(torch.nn.Module):
    """Finite in fp16 forward; fc2's input gradient is 64 x the loss scale (fc2's weight is all ones)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 64)
        self.fc2 = torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.fc2.weight.fill_(1.0)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("scaler_kind", ["ampkit", "torch"])
def test_locator_puts_a_backward_overflow_down_to_the_loss_scale(scaler_kind):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    skipped = {}
    for scale in (1.0, 2.0**14):
        model = Head()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = (ampkit.GradScaler if scaler_kind == "ampkit" else torch.amp.GradScaler)("cpu", init_scale=scale)
        # both scalers tell an open locator their scale (scaler= only matters for a scale() made before)
        with ampkit.overflow_locator(model) as loc:
            with ampkit.autocast("cpu", dtype=torch.float16):
                loss = model(x).float().sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        skipped[scale] = scaler.get_scale() < scale
        if scale == 1.0:
            assert loc.first is None  # no overflow without the scale
            continue
        first = loc.first
        assert (first.op, first.phase, first.module, first.grad_fn) == ("aten::mm", "backward", "fc2", "AddmmBackward0")
        assert first.cause == "loss_scale" and first.loss_scale == scale and first.suggestion is None
        assert first.policy_op == "aten::linear" and "loss scale" in first.explanation
    assert skipped == {1.0: False, 2.0**14: True}  # the scaler agrees: only the scaled step overflowed
    assert ampkit.GradScaler.scale is torch.amp.GradScaler.scale  # torch's scale() is back, unwrapped
    assert not hasattr(torch.amp.GradScaler.scale, "__wrapped__")


def test_locator_suggests_the_forward_op_for_a_gradient_too_large_for_fp16():
    model = Head()
    with torch.no_grad():  # forward: |fc2 out| <= 64 * 1e-4 * |x| * 1e4, finite; fc2's input gradient 8 * 1e4
        model.fc1.weight.mul_(1e-4)
        model.fc1.bias.zero_()
        model.fc2.weight.fill_(1e4)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            out = model(x)
        out.float().sum().backward()  # no loss scale
    assert torch.isfinite(out).all()
    first = loc.first
    assert (first.op, first.phase, first.module, first.grad_fn) == ("aten::mm", "backward", "fc2", "AddmmBackward0")
    assert first.cause == "precision" and first.loss_scale is None
    assert first.suggested_edit == ("aten::linear", "cpu", "fp32")
    first.apply_suggestion()  # fc2 (all linears) in fp32: its gradients are fp32 too
    model.zero_grad()
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            out = model(x)
        out.float().sum().backward()
    assert loc.first is None and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_locator_reports_non_finite_state_it_did_not_produce():
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with ampkit.overflow_locator(model) as loc:
        model(torch.randn(2, 4)).sum().backward()
    assert loc.first is None
    entry = loc.first_nonfinite_input
    assert entry.op == "aten::addmm" and entry.cause == "input" and entry.module == "Linear"
    assert torch.isnan(torch.tensor(entry.input_absmax)).any()
    loc.reset()
    assert loc.first_nonfinite_input is None


def test_locator_restores_the_random_generator_when_it_recomputes():
    xx = torch.full((1000,), 60000.0, dtype=torch.float16)
    torch.manual_seed(1)
    with ampkit.overflow_locator() as loc:
        dropped = torch.nn.functional.dropout(xx, 0.5)  # x2 on kept elements: 120000 > 65504
        after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(dropped, torch.nn.functional.dropout(xx, 0.5)) and torch.equal(after, torch.rand(3))
    first = loc.first
    assert first.cause == "precision" and first.policy_op == "aten::dropout" and first.suggestion is None
    assert "outside any ampkit region" in first.explanation


def test_locator_finds_nothing_in_a_finite_run_and_in_place_overflows():
    model = lnmodel()
    with ampkit.overflow_locator(model) as loc:
        with ampkit.autocast("cpu", dtype=torch.float16):
            model(torch.randn(4, 16)).float().sum().backward()
    assert loc.first is None and loc.first_nonfinite_input is None
    y = torch.full((4,), 1000.0, dtype=torch.float16)
    with ampkit.overflow_locator() as loc:
        y.mul_(100.0)  # in place: the input it read was finite
    first = loc.first
    assert first.op == "aten::mul_.Tensor" and first.cause == "precision" and first.input_absmax == (1000.0, 100.0)
    assert torch.isinf(y).all()  # the recomputation wrote into copies


def test_tools_nest_and_run_on_other_threads():
    model, x = overflow_model()
    found = {}

    def worker():
        with ampkit.overflow_locator(model) as loc:
            with ampkit.autocast("cpu", dtype=torch.float16):
                model(x)
        found["thread"] = loc.first.op

    with ampkit.precision_report(model) as rep, ampkit.overflow_locator(model) as loc:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        with ampkit.autocast("cpu", dtype=torch.float16):
            model(x)
    assert found["thread"] == "aten::mm" and loc.first.op == "aten::mm"
    # the report saw this thread's ops only: one call
    assert top(rep.rows, "aten::mm", module="1.0")[0]["calls"] == 1
    assert not ampkit._C._diagnostics_live()


def test_bad_arguments_and_misuse_are_refused():
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module or None, got int"):
        ampkit.precision_report(3)
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module or None, got str"):
        ampkit.overflow_locator("model")
    with pytest.raises(TypeError, match="expected scaler to be a torch.amp.GradScaler .* got float"):
        ampkit.overflow_locator(None, scaler=1.0)
    with pytest.raises(TypeError, match="expected name to be a str, got int"):
        ampkit.module_scope(1)
    rep = ampkit.precision_report()
    with pytest.raises(RuntimeError, match="got one never entered"):
        rep.rows
    with rep:
        pass
    with pytest.raises(RuntimeError, match="got one entered before"):
        with rep:
            pass
    loc = ampkit.overflow_locator()
    with pytest.raises(RuntimeError, match="got one never entered"):
        loc.first
    with loc:
        pass
    assert loc.first is None
    with pytest.raises(RuntimeError, match="got one entered before"):
        loc.__enter__()
    model, x = overflow_model()
    with ampkit.overflow_locator() as loc:
        torch.full((2,), 60000.0, dtype=torch.float16) * 2
    with pytest.raises(RuntimeError, match="expected an event with a suggestion, got one whose cause is 'precision'"):
        loc.first.apply_suggestion()
    assert ampkit.list_policies("cpu") == ampkit.default_policies("cpu")  # nothing was edited


def test_at_most_eight_tools_at_once():
    tools = [ampkit.precision_report() for _ in range(8)]
    for t in tools:
        t.__enter__()
    try:
        with pytest.raises(RuntimeError, match="expected at most 8 PrecisionReport / OverflowLocator objects alive"):
            ampkit.overflow_locator().__enter__()
    finally:
        for t in tools:
            t.__exit__(None, None, None)
    with ampkit.overflow_locator() as loc:  # the slots are free again
        pass
    assert loc.first is None


def test_the_nan_hunt_example_finds_and_fixes_the_overflow():
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "nan_hunt.py")
    done = subprocess.run([sys.executable, example, "--steps", "10"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "first non-finite output: aten::bmm (forward) in module 'attn'" in done.stdout
    assert 'fix: ampkit.set_policy("aten::matmul", "cpu", "fp32")' in done.stdout


def test_locator_ignores_deliberate_infinities_and_still_finds_the_overflow_after_them():
    model, x = overflow_model()
    with ampkit.overflow_locator(model) as loc:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(4)  # -inf above the diagonal
        scores = torch.randn(4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf")) + mask
        torch.softmax(scores, -1)
    assert loc.first is None and loc.first_nonfinite_input is None
    with ampkit.overflow_locator(model) as loc:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(4)
        torch.softmax(torch.randn(4, 4) + mask, -1)
        with ampkit.autocast("cpu", dtype=torch.float16):
            model(x)
    assert loc.first.op == "aten::mm" and loc.first.cause == "precision" and loc.first_nonfinite_input is None


@pytest.mark.parametrize("how", ["self", "views", "out"])
def test_locator_sees_in_place_overflows_through_aliases(how):
    y = torch.full((2, 4), 40000.0, dtype=torch.float16)
    with ampkit.overflow_locator() as loc:
        if how == "self":
            y.add_(y)
        elif how == "views":
            y[0].mul_(y[1])
        else:
            torch.mul(y[0], y[1], out=y[0])
    assert torch.isinf(y[0]).all()
    first = loc.first
    assert first is not None and first.cause == "precision" and first.input_absmax[0] == 40000.0
    assert loc.first_nonfinite_input is None


def test_locator_recomputation_leaves_module_state_alone():
    def run(watch):
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm1d(2)
        with torch.no_grad():
            bn.weight.fill_(1e5)  # the normalized output times 1e5 overflows fp16
        x = torch.randn(8, 2).half()
        ctx = ampkit.overflow_locator() if watch else contextlib.nullcontext()
        with ctx as loc, ampkit.autocast("cpu", dtype=torch.float16):
            out = bn(x)
        return out, bn.running_mean.clone(), bn.running_var.clone(), loc

    plain, watched = run(False), run(True)
    for a, b in zip(plain[:3], watched[:3]):
        assert torch.equal(a, b)
    assert watched[3].first is not None


def test_backward_of_custom_functions_and_reentrant_checkpoints_is_attributed():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return Square.apply(self.lin(x))

    class Ck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)

    model = torch.nn.Sequential(Blk(), Ck())
    x = torch.randn(2, 4, requires_grad=True)
    with ampkit.precision_report(model) as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    backward = [r for r in rep.rows if r["phase"] == "backward" and not r["nested"]]
    # Square's backward (mul ops) belongs to module 0; the checkpoint's recomputed linear to 1.inner
    assert {r["module"] for r in backward if r["op"] == "aten::mul.Tensor"} == {"0"}
    assert [r["module"] for r in backward if r["op"] == "aten::linear"] == ["1.inner"]


def test_failed_calls_and_bad_loss_scales():
    with ampkit.precision_report() as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError):
                torch.mm(torch.randn(2, 3), torch.randn(2, 3))
            torch.mm(torch.randn(2, 3), torch.randn(3, 2))
    (mm,) = [r for r in rep.rows if r["op"] == "aten::mm"]
    assert mm["calls"] == 1  # the failed call computed nothing and is not a row
    with ampkit.overflow_locator() as loc:
        with pytest.raises(ValueError, match="expected scale to be a one-element floating-point tensor, got "
                                             "Float tensor of 2 elements"):
            loc.set_loss_scale(torch.ones(2))
        with pytest.raises(TypeError, match="expected scale to be a torch.Tensor, got float"):
            loc.set_loss_scale(2.0)
        loc.set_loss_scale(torch.tensor(1024.0))


def test_locator_does_not_mistake_large_finite_values_for_an_overflow():
    big = torch.full((8,), 3e38, dtype=torch.bfloat16)  # finite, but their float32 sum is not
    with ampkit.overflow_locator() as loc:
        out = big * 1.0
    assert torch.isfinite(out).all() and loc.first is None and loc.first_nonfinite_input is None


def test_a_keyboard_interrupt_in_forward_leaves_no_module_scope_open():
    class Interrupting(torch.nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Interrupting())
    depth = ampkit._C._module_scope_depth()
    with pytest.raises(KeyboardInterrupt):
        with ampkit.precision_report(model):
            model(torch.randn(1, 2))
    assert ampkit._C._module_scope_depth() == depth


def test_overwriting_ops_do_not_judge_what_they_overwrite():
    t = torch.full((4,), float("nan"))  # what fill_, copy_ and out= write over does not matter
    with ampkit.overflow_locator() as loc:
        t.fill_(1.0)
        t.fill_(float("nan"))
        t.copy_(torch.ones(4))
        t.fill_(float("nan"))
        torch.mul(torch.ones(4), 2.0, out=t)
        t.fill_(float("inf"))  # deliberate
    assert loc.first is None and loc.first_nonfinite_input is None
