"""torch.ops.ampkit: the operators the Python GradScaler and optimizers call (csrc/ops.cpp),
checked with torch.library.opcheck (schema, autograd registration, FakeTensor, AOT dispatch)
and against torch's own fused kernels."""
import pytest
import torch

import ampkit  # noqa: F401  (loads the operators)

OPS = torch.ops.ampkit


def _params(n=3, requires_grad=True):
    torch.manual_seed(0)
    ps = [torch.randn(5, 4, requires_grad=requires_grad) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _adam_samples():
    for amsgrad in (False, True):
        for tensor_lr in (False, True):
            ps = _params()
            lists = (
                [p.detach() for p in ps], [p.grad for p in ps], [torch.zeros_like(p) for p in ps],
                [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps] if amsgrad else [],
                [torch.zeros((), dtype=torch.float32) for _ in ps],
            )
            lr = torch.tensor(1e-3) if tensor_lr else 1e-3
            kwargs = dict(lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=amsgrad,
                          maximize=False, decoupled_weight_decay=True, grad_scale=torch.tensor([4.0]),
                          found_inf=torch.tensor([0.0]))
            yield (OPS.fused_adam_.tensor_lr if tensor_lr else OPS.fused_adam_.default), lists, kwargs


def _sgd_samples():
    for tensor_lr in (False, True):
        ps = _params()
        lists = ([p.detach() for p in ps], [p.grad for p in ps], [torch.zeros_like(p) for p in ps])
        lr = torch.tensor(0.1) if tensor_lr else 0.1
        kwargs = dict(lr=lr, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False,
                      is_first_step=False, grad_scale=None, found_inf=torch.tensor([0.0]))
        yield (OPS.fused_sgd_.tensor_lr if tensor_lr else OPS.fused_sgd_.default), lists, kwargs


def _scaler_samples():
    grads = [torch.randn(4, 3) for _ in range(3)]
    grads[1][0, 0] = float("inf")
    yield OPS.unscale_grads_.default, (grads, [torch.zeros(())], torch.tensor([0.25]), False), {}
    yield OPS.unscale_grads_.default, ([torch.randn(3, requires_grad=True)], [torch.zeros(())], torch.tensor([0.5]),
                                       False), {}
    kwargs = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=3, min_scale=1.0, max_scale=2.0**24,
                  hysteresis=2)
    yield (OPS.update_scale_.default, (torch.tensor([1024.0]), torch.zeros((), dtype=torch.int32),
                                        torch.zeros((), dtype=torch.int32), [torch.tensor(1.0)]), kwargs)


SAMPLES = [*_adam_samples(), *_sgd_samples(), *_scaler_samples()]


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_opcheck(index):
    op, args, kwargs = SAMPLES[index]
    # test_autograd_registration needs an input that requires grad; the others run on every sample.
    needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad
                     for a in args for t in (a if isinstance(a, (list, tuple)) else [a]))
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if needs_grad:
        utils = utils + ("test_autograd_registration",)
    torch.library.opcheck(op, args, kwargs, test_utils=utils)


def test_fused_adam_op_equals_torchs_fused_adamw():
    # torch.optim.AdamW(fused=True)'s per-device sequence: steps += 1, the kernel, steps -= found_inf.
    for amsgrad in (False, True):
        ours, ref = _params(), _params()
        state = {k: [[torch.zeros_like(p) for p in ours] for _ in range(3)] for k in ("ours", "ref")}
        steps = {k: [torch.zeros((), dtype=torch.float32) for _ in ours] for k in ("ours", "ref")}
        for it in range(4):
            for p, q in zip(ours, ref):
                p.grad = q.grad = torch.randn_like(p) * 2
            found_inf = torch.tensor([1.0 if it == 1 else 0.0])
            args = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                        grad_scale=torch.tensor([2.0]), found_inf=found_inf)
            with torch.no_grad():
                OPS.fused_adam_(ours, [p.grad.clone() for p in ours], state["ours"][0], state["ours"][1],
                                state["ours"][2] if amsgrad else [], steps["ours"], decoupled_weight_decay=True,
                                **args)
                torch._foreach_add_(steps["ref"], 1)
                torch._fused_adamw_(ref, [p.grad.clone() for p in ref], state["ref"][0], state["ref"][1],
                                    state["ref"][2] if amsgrad else [], steps["ref"], **args)
                torch._foreach_sub_(steps["ref"], [found_inf.reshape(())] * len(ref))
        for a, b in zip(ours + [t for ts in state["ours"] for t in ts] + steps["ours"],
                        ref + [t for ts in state["ref"] for t in ts] + steps["ref"]):
            assert torch.equal(a, b)
        assert steps["ours"][0].item() == 3.0  # one of four steps was skipped


def test_unscale_grads_op_matches_torchs_kernel_and_leaves_input_on_error():
    grads = [torch.randn(6) * 1000, torch.randn(3, 2).to(torch.bfloat16)]
    grads[0][2] = float("nan")
    ref = [g.clone() for g in grads]
    found_ref = torch.zeros(())
    for g in ref:
        torch._amp_foreach_non_finite_check_and_unscale_([g], found_ref, torch.tensor([0.125]))
    found = [torch.zeros(())]
    OPS.unscale_grads_(grads, found, torch.tensor([0.125]), False)
    assert found[0].item() == 1.0 == found_ref.item()
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # Bad input: a clear error, nothing changed.
    g, found = [torch.ones(2, dtype=torch.float16), torch.ones(2)], [torch.zeros(())]
    with pytest.raises(ValueError, match="FP16"):
        OPS.unscale_grads_(g, found, torch.tensor([0.5]), False)
    with pytest.raises(ValueError, match="inv_scale to be a 1-element float32 tensor"):
        OPS.unscale_grads_(g[1:], found, torch.tensor([0.5, 0.5]), False)
    with pytest.raises(ValueError, match=r"found_infs\[0\] to be a 1-element float32 tensor, got .*Double"):
        OPS.unscale_grads_(g[1:], [torch.zeros((), dtype=torch.float64)], torch.tensor([0.5]), False)
    with pytest.raises(ValueError, match="one found_inf per device, got cpu at indices 0 and 1"):
        OPS.unscale_grads_(g[1:], found * 2, torch.tensor([0.5]), False)
    with pytest.raises(ValueError, match=r"expected a found_inf on cpu \(the device of grads\[0\]\), got none"):
        OPS.unscale_grads_(g[1:], [], torch.tensor([0.5]), False)
    assert g[0].eq(1).all() and g[1].eq(1).all() and found[0].item() == 0.0
    OPS.unscale_grads_([], [], torch.tensor([0.5]), False)


def test_update_scale_op_equals_torchs_with_hysteresis_one():
    for found in (0.0, 1.0):
        for tracker in (0, 2):
            ours = (torch.tensor([256.0]), torch.tensor(tracker, dtype=torch.int32))
            ref = (torch.tensor([256.0]), torch.tensor(tracker, dtype=torch.int32))
            streak = torch.zeros((), dtype=torch.int32)
            OPS.update_scale_(ours[0], ours[1], streak, [torch.tensor(found)], growth_factor=2.0, backoff_factor=0.5,
                              growth_interval=3, min_scale=2.0**-126, max_scale=float("inf"), hysteresis=1)
            torch._amp_update_scale_(ref[0], ref[1], torch.tensor(found), 2.0, 0.5, 3)
            assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]), (found, tracker)


def test_ops_trace_under_torch_compile():
    # The fake kernels let a compiled function call the operators (no graph break: fullgraph).
    def step(params, grads, bufs):
        OPS.fused_sgd_(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                       maximize=False, is_first_step=False)

    params, grads = [torch.ones(4)], [torch.full((4,), 2.0)]
    bufs = [torch.zeros(4)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, bufs)
    eager = ([torch.ones(4)], [torch.full((4,), 2.0)], [torch.zeros(4)])
    step(*eager)
    assert torch.equal(params[0], eager[0][0]) and torch.equal(bufs[0], eager[2][0])
