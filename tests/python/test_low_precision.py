"""Low-precision parameters: ampkit.cast_model and the optimizers' master_weights /
stochastic_rounding, against references written with torch's own kernels and plain ops."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import ampkit
import ampkit.optim as ao
from test_optim import _fused_sgd_reference

LOW = [torch.bfloat16, torch.float16]
# Multiples of 16 elements: torch's fused Adam runs every element through its vectorized loop
# (16 float32 lanes with AVX-512, 8 with AVX2), whose arithmetic ampkit's kernel reproduces
# bitwise. The remainder of other sizes goes through torch's scalar loop, whose second moment the
# compiler rounds in an order that differs in the last bit; test_master_adam_ragged_tails.
VECTOR_SHAPES = [(16, 8), (48,), (4, 4, 2), (1024,)]


def _low_params(dtype, shapes=VECTOR_SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(params, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


ADAM_CASES = [
    (ao.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (ao.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    (ao.AdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.3, 0.9), eps=1e-6)),  # the lerp's other branch
]


def _master_adam_run(cls, torch_cls, kwargs, dtype, shapes, steps=6, inf_at=(2,)):
    """ampkit's master step against torch's fused step on float32 masters with the grads upcast,
    under a loss scale with skipped steps. Yields (params, masters, optimizer, reference) per step."""
    params = _low_params(dtype, shapes)
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    opt = cls(params, master_weights=True, **kwargs)
    ref = torch_cls(masters, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for it in range(steps):
        scale = torch.tensor(2.0 ** (10 - it))
        for p, m, g in zip(params, masters, _grads(params, gen)):
            p.grad = (g.float() * scale).to(dtype)  # what backward of a scaled loss gives, in dtype
            m.grad = p.grad.float()
        skip = it in inf_at
        found_inf = torch.tensor(float(skip))
        before = [p.detach().clone() for p in params]
        opt.step(grad_scale=scale, found_inf=found_inf)
        ref.grad_scale, ref.found_inf = scale, found_inf
        ref.step()
        del ref.grad_scale, ref.found_inf
        if skip:
            assert all(torch.equal(b, p) for b, p in zip(before, params)), "a skipped step changed a parameter"
        yield params, masters, opt, ref


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: f"{c[0].__name__}-{'-'.join(map(str, c[2].items()))}")
def test_master_adam_bitwise_vs_torch_fused_on_fp32_masters(case, dtype):
    cls, torch_cls, kwargs = case
    for it, (params, masters, opt, ref) in enumerate(_master_adam_run(cls, torch_cls, kwargs, dtype, VECTOR_SHAPES)):
        for p, m in zip(params, masters):
            state, rstate = opt.state[p], ref.state[m]
            assert state["master"].dtype == torch.float32
            assert torch.equal(state["master"], m.detach()), f"master differs at step {it}"
            assert torch.equal(p.detach(), m.detach().to(dtype)), "the parameter is not its master rounded"
            for key in ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kwargs.get("amsgrad") else ()):
                assert torch.equal(state[key], rstate[key]), (it, key)


@pytest.mark.parametrize("dtype", LOW)
def test_master_adam_leaves_the_grads_scaled(dtype):
    params = _low_params(dtype)
    opt = ao.AdamW(params, master_weights=True)
    for p in params:
        p.grad = torch.full_like(p, 512.0)
    grads = [p.grad.clone() for p in params]
    opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_master_adam_ragged_tails():
    """Sizes with a remainder: torch's scalar loop rounds the second moment differently in the last
    bit, so there the masters agree to a few float32 ulps (bitwise everywhere else)."""
    shapes = [(33, 7), (7,), (5, 3, 2)]
    for params, masters, opt, ref in _master_adam_run(ao.AdamW, torch.optim.AdamW, dict(lr=1e-2), torch.bfloat16,
                                                      shapes):
        for p, m in zip(params, masters):
            torch.testing.assert_close(opt.state[p]["master"], m.detach(), rtol=4e-7, atol=1e-9)
            n = p.numel() - p.numel() % 16
            assert torch.equal(opt.state[p]["master"].flatten()[:n], m.detach().flatten()[:n])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kwargs", [dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                    dict(momentum=0.9, dampening=0.3, maximize=True), dict(momentum=0.0)], ids=repr)
def test_master_sgd_bitwise_vs_float32_reference(dtype, kwargs):
    """Master SGD against torch's fused SGD arithmetic on the float32 master, op by op (plain
    torch ops in float32: the same operations in the same order, so bitwise)."""
    kw = {**dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False), **kwargs}
    params = _low_params(dtype, [(33, 7), (7,), (1000,)])
    masters = [p.detach().float().clone() for p in params]
    bufs = [torch.zeros_like(m) for m in masters]
    opt = ao.SGD(params, master_weights=True, **kw)
    gen = torch.Generator().manual_seed(3)
    ran = 0
    for it in range(5):
        grads = _grads(params, gen, 8.0)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        skip = it == 1
        opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(float(skip)))
        if skip:
            continue
        first = ran == 0 and kw["dampening"] != 0
        ran += 1
        for m, g, b in zip(masters, grads, bufs):
            _fused_sgd_reference(m, g.clone(), b, kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                                 kw["nesterov"], kw["maximize"], first, torch.tensor(8.0))
        for p, m, b, g in zip(params, masters, bufs, grads):
            assert torch.equal(opt.state[p]["master"], m), f"step {it}"
            assert torch.equal(p.detach(), m.to(dtype))
            assert torch.equal(p.grad, g), "master SGD must leave the grads as they were"
            if kw["momentum"]:
                assert opt.state[p]["momentum_buffer"].dtype == torch.float32
                assert torch.equal(opt.state[p]["momentum_buffer"], b)


@pytest.mark.parametrize("make", [lambda ps: ao.AdamW(ps, master_weights=True, amsgrad=True),
                                  lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9, master_weights=True),
                                  lambda ps: ao.AdamW(ps, stochastic_rounding=True, state_dtype=torch.bfloat16),
                                  lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9, stochastic_rounding=True)],
                         ids=["adamw-master", "sgd-master", "adamw-sr", "sgd-sr"])
def test_skipped_steps_leave_everything_untouched(make):
    params = _low_params(torch.bfloat16)
    opt = make(params)
    gen = torch.Generator().manual_seed(5)
    for p, g in zip(params, _grads(params, gen)):
        p.grad = g
    opt.step()
    snapshot = copy.deepcopy((params, opt.state_dict()))
    for p, g in zip(params, _grads(params, gen)):
        p.grad = g
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    old_params, old_state = snapshot
    assert all(torch.equal(a, b) for a, b in zip(old_params, params))
    new_state = opt.state_dict()["state"]
    for i, st in old_state["state"].items():
        for key, value in st.items():
            assert torch.equal(new_state[i][key], value), key


def test_stochastic_rounding_is_unbiased():
    """1 + x with x an eighth of bf16's spacing at 1: rounding to nearest never moves the parameter,
    stochastic rounding moves an eighth of the elements by one spacing, so the mean is 1 + x."""
    n = 200_000
    x = 2.0 ** -10  # bf16's spacing at 1.0 is 2**-7
    p_sr = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    p_rn = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    sr = ao.SGD([p_sr], lr=1.0, stochastic_rounding=True, seed=123)
    rn = ao.SGD([p_rn], lr=1.0)
    for _ in range(10):
        p_sr.grad = torch.full((n,), -x, dtype=torch.bfloat16)
        p_rn.grad = torch.full((n,), -x, dtype=torch.bfloat16)
        sr.step()
        rn.step()
    expected = 1.0 + 10 * x
    mean = p_sr.detach().double().mean().item()
    # Each element's rounding error has variance <= spacing**2 / 4: the mean's standard error over n
    # elements, per step, accumulates to under 10 * 2**-7 / 2 / sqrt(n); 5 of those.
    assert abs(mean - expected) < 5 * 10 * 2.0 ** -8 / n ** 0.5, (mean, expected)
    assert torch.equal(p_rn.detach(), torch.ones(n, dtype=torch.bfloat16)), "round to nearest loses every update"
    assert set(p_sr.detach().unique().tolist()) <= {1.0 + k * 2.0 ** -7 for k in range(11)}


def test_stochastic_rounding_adam_matches_float32_in_expectation():
    """SR Adam with float32 states: the bf16 parameter's expected value is the float32 one that
    the same update on a float32 copy gives (one step from identical states)."""
    n = 100_000
    base = torch.randn(n).to(torch.bfloat16)
    p = base.clone().requires_grad_()
    p32 = base.float().requires_grad_()
    g = torch.randn(n).to(torch.bfloat16)
    p.grad, p32.grad = g.clone(), g.float()
    ao.AdamW([p], lr=1e-3, stochastic_rounding=True).step()
    torch.optim.AdamW([p32], lr=1e-3, fused=True).step()
    err = p.detach().double() - p32.detach().double()
    # bf16's spacing around each float32 result (8 significant bits).
    spacing = (p32.detach().abs().clamp_min(1e-30).log2().floor() - 7).exp2().double()
    assert (err.abs() <= spacing * 1.0001).all(), "a rounding went beyond the neighbouring bf16 values"
    assert abs((err / spacing).mean().item()) < 5 * 0.5 / n ** 0.5


def _sr_run(seed, threads=None, steps=3):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        params = _low_params(torch.bfloat16, [(300, 257), (7,)])
        opt = ao.AdamW(params, lr=1e-2, stochastic_rounding=True, state_dtype=torch.bfloat16, seed=seed)
        gen = torch.Generator().manual_seed(9)
        for _ in range(steps):
            for p, g in zip(params, _grads(params, gen)):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in params]
    finally:
        torch.set_num_threads(old)


def test_stochastic_rounding_reproducible_with_a_seed():
    a, b, c = _sr_run(1), _sr_run(1, threads=1), _sr_run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "the same seed must give the same bits, any thread count"
    assert not all(torch.equal(x, y) for x, y in zip(a, c)), "another seed must draw other bits"


@pytest.mark.parametrize("make", [lambda ps: ao.AdamW(ps, lr=1e-2, master_weights=True),
                                  lambda ps: ao.Adam(ps, lr=1e-2, master_weights=True, amsgrad=True),
                                  lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, master_weights=True),
                                  lambda ps: ao.AdamW(ps, lr=1e-2, stochastic_rounding=True,
                                                      state_dtype=torch.bfloat16, seed=3),
                                  lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9, stochastic_rounding=True, seed=3)],
                         ids=["adamw-master", "adam-master", "sgd-master", "adamw-sr", "sgd-sr"])
@pytest.mark.parametrize("dtype", LOW)
def test_state_dict_resumes_bitwise(make, dtype, tmp_path):
    params = _low_params(dtype)
    try:
        opt = make(params)
    except ValueError as e:  # stochastic rounding is for bf16: refused when the optimizer is made
        assert dtype == torch.float16 and "fp16 needs master_weights" in str(e)
        return
    gen = torch.Generator().manual_seed(4)
    grads = [_grads(params, gen) for _ in range(6)]

    def steps(ps, o, gs):
        for g in gs:
            for p, gr in zip(ps, g):
                p.grad = gr.clone()
            o.step()

    steps(params, opt, grads[:3])
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    steps(params, opt, grads[3:])

    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = [t.clone().requires_grad_() for t in ckpt["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for p in resumed:
        st = opt2.state[p]
        if "master" in st:
            assert st["master"].dtype == torch.float32, "loading must not round the masters to the parameter dtype"
    steps(resumed, opt2, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    for a, b in zip(params, resumed):
        for key, value in opt.state[a].items():
            assert value.dtype == opt2.state[b][key].dtype and torch.equal(value, opt2.state[b][key]), key


def test_load_state_dict_with_a_bad_master_changes_nothing():
    params = _low_params(torch.bfloat16)
    opt = ao.AdamW(params, master_weights=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["master"] = torch.zeros(3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"state 'master' of parameter 0 to have its parameter's shape \(16, 8\), "
                                         r"got \(3,\)"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items())


def test_option_errors_name_the_option():
    p = _low_params(torch.bfloat16)
    with pytest.raises(ValueError, match="at most one of master_weights and stochastic_rounding"):
        ao.AdamW(p, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="expected state_dtype float32 or bfloat16, got Half"):
        ao.SGD(p, stochastic_rounding=True, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype bfloat16 only with stochastic_rounding"):
        ao.Adam(p, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected seed to be a 64-bit int, got 1.5"):
        ao.AdamW(p, stochastic_rounding=True, seed=1.5)
    with pytest.raises(ValueError, match="expected master_weights to be a bool, got 1"):
        ao.SGD(p, master_weights=1)
    with pytest.raises(ValueError, match="expected state_dtype to be a torch.dtype, got 'bf16'"):
        ao.AdamW(p, stochastic_rounding=True, state_dtype="bf16")


def test_the_operator_refuses_mixed_state_dtypes():
    """torch.ops.ampkit.fused_adam_ called directly: states of one tensor in two dtypes are refused
    (the one-pass kernel reads them as one), naming the list and index."""
    p = torch.zeros(16, dtype=torch.bfloat16)
    g = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"AdamW: expected the states of parameter 0 to share one dtype \(exp_avgs\[0\] "
                                         r"is Float\), got exp_avg_sqs\[0\] BFloat16"):
        torch.ops.ampkit.fused_adam_([p], [g], [torch.zeros(16)], [torch.zeros(16, dtype=torch.bfloat16)], [],
                                     [torch.zeros(())], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                                     amsgrad=False, maximize=False, decoupled_weight_decay=True,
                                     stochastic_rounding=True)
    assert torch.equal(p, torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"expected masters\[0\] to be a float32 copy of its parameter"):
        torch.ops.ampkit.fused_adam_([p], [g], [torch.zeros(16)], [torch.zeros(16)], [], [torch.zeros(())], lr=1e-3,
                                     beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                     maximize=False, decoupled_weight_decay=True, masters=[torch.zeros(3)])


def test_stochastic_rounding_refuses_fp16_parameters_before_changing_anything():
    p16 = _low_params(torch.float16)
    with pytest.raises(ValueError, match=r"SGD: expected bfloat16 or float32 parameters with stochastic_rounding"):
        ao.SGD(p16, stochastic_rounding=True)
    opt = ao.AdamW([torch.zeros(2, requires_grad=True)], stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"AdamW: expected bfloat16 or float32 parameters"):
        opt.add_param_group({"params": p16})
    assert len(opt.param_groups) == 1
    # A group switched to stochastic rounding after the fact is refused at the step, unchanged.
    opt = ao.AdamW(p16)
    opt.param_groups[0]["stochastic_rounding"] = True
    for p in p16:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in p16]
    with pytest.raises(ValueError, match=r"AdamW: expected bfloat16 or float32 parameters with stochastic_rounding "
                                         r"\(fp16 needs master_weights\), got CPUHalfType of shape \[16, 8\] on cpu "
                                         r"\(index 0\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, p16)) and not opt.state


def test_float32_parameters_of_a_master_group_step_as_usual():
    """cast_model keeps norms in float32: in a master group they take torch's fused step."""
    p32 = torch.randn(16, requires_grad=True)
    ref = p32.detach().clone().requires_grad_()
    opt = ao.AdamW([p32], master_weights=True)
    tref = torch.optim.AdamW([ref], fused=True)
    for _ in range(3):
        g = torch.randn(16)
        p32.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        tref.step()
    assert torch.equal(p32, ref) and "master" not in opt.state[p32]


# ----------------------------------------------------------------------------- with the GradScaler


def _fp16_master_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    return ampkit.cast_model(model, torch.float16)


@pytest.mark.parametrize("scaler_kind", ["ampkit", "torch"])
def test_fp16_master_training_skips_and_backs_off_like_torch(scaler_kind):
    """fp16 parameters, master AdamW and dynamic loss scaling: torch's GradScaler refuses to unscale
    fp16 grads, here the fused step divides by the scale in float32. With an inf injected at chosen
    steps, both scalers (ampkit's and torch's, which hands the scale to the optimizer) skip exactly
    those steps and back off as torch's O1 loop does, and the parameters stay put on them."""
    model = _fp16_master_model()
    opt = ao.AdamW(model.parameters(), lr=1e-3, master_weights=True)
    scaler = (ampkit.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3) if scaler_kind == "ampkit"
              else torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3))
    oracle = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)  # the scale sequence of O1
    gen = torch.Generator().manual_seed(0)
    inf_at = {1, 4, 5}
    for it in range(9):
        x = torch.randn(8, 16, generator=gen).half()
        y = torch.randn(8, 4, generator=gen)
        with ampkit.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if it in inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        # The oracle: a float32 parameter with the same inf pattern under torch's O1 scaler.
        w = torch.zeros(1, requires_grad=True)
        oracle.scale(w.sum() * 0).backward()
        if it in inf_at:
            w.grad.fill_(float("inf"))
        o_opt = torch.optim.SGD([w], lr=0.0)
        oracle.step(o_opt)
        oracle.update()
        assert scaler.get_scale() == oracle.get_scale(), it
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved == (it not in inf_at), it
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torch_refuses_to_unscale_fp16_grads():
    """Why the unscale happens in the fused step: torch's GradScaler.unscale_ rejects fp16 grads."""
    model = _fp16_master_model()
    opt = ao.AdamW(model.parameters(), master_weights=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 16).half()).float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)


@pytest.mark.parametrize("dtype", LOW)
def test_trainer_with_master_weights_and_clipping(dtype):
    """The Trainer over a cast model: fp16 with the GradScaler clips the still-scaled grads (norm
    computed in float32 and divided by the scale), bf16 without a scaler clips as usual; both report
    the norm of the unscaled grads, equal to the float32 norm of the same grads."""
    model = _fp16_master_model() if dtype == torch.float16 else ampkit.cast_model(
        nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4)), dtype)
    opt = ao.AdamW(model.parameters(), lr=1e-3, master_weights=True)
    trainer = ampkit.Trainer(model, opt, device_type="cpu", dtype=dtype, max_grad_norm=0.1)
    assert (trainer.scaler is not None) == (dtype == torch.float16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 16, generator=gen).to(dtype)
        y = torch.randn(8, 4, generator=gen)
        stats = trainer.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y))
        assert stats.grad_norm is not None and torch.isfinite(stats.grad_norm)
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in model.parameters() if p.dtype == dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_trainer_accumulates_into_low_precision_grads_and_steps_once(dtype):
    """Accumulation over a cast model: the optimizer (and its masters) steps once per window, the
    micro-steps only add into the bf16/fp16 grads."""
    model = _fp16_master_model() if dtype == torch.float16 else ampkit.cast_model(
        nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4)), dtype)
    opt = ao.AdamW(model.parameters(), lr=1e-3, master_weights=True)
    trainer = ampkit.Trainer(model, opt, device_type="cpu", dtype=dtype, accumulation_steps=3)
    gen = torch.Generator().manual_seed(0)
    stepped = []
    for _ in range(6):
        x = torch.randn(8, 16, generator=gen).to(dtype)
        y = torch.randn(8, 4, generator=gen)
        before = model[0].weight.detach().clone()
        stats = trainer.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y))
        stepped.append(stats.stepped)
        assert torch.equal(before, model[0].weight) != stats.stepped
    assert stepped == [False, False, True, False, False, True]
    assert opt.state[model[0].weight]["step"].item() == 2


def test_clip_of_scaled_fp16_grads_matches_the_float32_norm():
    grads = [torch.randn(100) * 3, torch.randn(7)]
    params = [torch.zeros(g.shape, dtype=torch.float16, requires_grad=True) for g in grads]
    scale = torch.tensor(1024.0)
    for p, g in zip(params, grads):
        p.grad = (g * scale).half()
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((p.grad.float())) for p in params]))
    total = ampkit._C._clip_grad_norm_(params, 1.0, grad_scale=scale)
    torch.testing.assert_close(total, expected / scale, rtol=1e-6, atol=0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in params])) / scale
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=2e-3, atol=0)  # fp16 rounding of the clipped grads


# ----------------------------------------------------------------------------- C++ and Python agree


@pytest.mark.parametrize("kind,make", [
    ("adamw_master", lambda ps: ao.AdamW(ps, lr=1e-2, master_weights=True)),
    ("adamw_sr", lambda ps: ao.AdamW(ps, lr=1e-2, stochastic_rounding=True, state_dtype=torch.bfloat16, seed=7)),
    ("sgd_master", lambda ps: ao.SGD(ps, lr=1e-2, momentum=0.9, master_weights=True)),
    ("sgd_sr", lambda ps: ao.SGD(ps, lr=1e-2, momentum=0.9, stochastic_rounding=True, seed=7)),
])
def test_cpp_and_python_optimizers_agree_bitwise(kind, make):
    """ampkit::optim (C++, through ampkit._C._testing) and ampkit.optim (Python) under ampkit's C++
    and Python GradScaler, with an inf at step 2: the same parameters after every step."""
    a = _low_params(torch.bfloat16, [(33, 7), (1000,)])
    b = [p.detach().clone().requires_grad_() for p in a]
    cpp = ampkit._C._testing.CppScaler(a, kind, 1e-2, 256.0, 2.0, 0.5, 2000, True)
    py_opt = make(b)
    py_scaler = ampkit.GradScaler("cpu", init_scale=256.0)
    gen = torch.Generator().manual_seed(2)
    for it in range(5):
        gs = _grads(a, gen)
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = (g.float() * 256).to(p.dtype), (g.float() * 256).to(p.dtype)
        if it == 2:
            a[0].grad[0, 0] = b[0].grad[0, 0] = float("inf")
        cpp.scale(torch.ones(()))  # the scalers make their scale at the first scale()
        py_scaler.scale(torch.ones(()))
        cpp.step()
        cpp.update(None)
        py_scaler.step(py_opt)
        py_scaler.update()
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{kind}: step {it}"


# ----------------------------------------------------------------------------- cast_model


def test_cast_model_keeps_norms_and_identity():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ids = [id(p) for p in model.parameters()]
    opt = ao.AdamW(model.parameters(), master_weights=True)
    assert ampkit.cast_model(model) is model
    assert [id(p) for p in model.parameters()] == ids and opt.param_groups[0]["params"][0] is model[0].weight
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["0.weight"] == dtypes["3.bias"] == torch.bfloat16
    assert dtypes["1.weight"] == dtypes["2.bias"] == torch.float32
    assert model[2].running_mean.dtype == torch.float32 and model[2].num_batches_tracked.dtype == torch.int64


def test_cast_model_with_a_predicate_and_shared_parameters():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head, "out": nn.Linear(4, 4)})
    ampkit.cast_model(model, torch.float16, keep_fp32=lambda name, m: name == "emb")
    assert emb.weight.dtype == torch.float32, "a parameter shared with a kept module stays float32"
    assert model["out"].weight.dtype == torch.float16
    ampkit.cast_model(model, torch.bfloat16, keep_fp32=())
    assert emb.weight.dtype == torch.bfloat16


def test_cast_model_errors_change_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"expected dtype torch.bfloat16 or torch.float16, got torch.float64"):
        ampkit.cast_model(model, torch.float64)
    with pytest.raises(ValueError, match="expected keep_fp32 to be module types or a predicate"):
        ampkit.cast_model(model, keep_fp32=3)
    with pytest.raises(ValueError, match="expected keep_fp32 to hold torch.nn.Module types"):
        ampkit.cast_model(model, keep_fp32=(int,))

    def boom(name, module):
        if name == "1":
            raise RuntimeError("predicate failed")
        return False

    with pytest.raises(RuntimeError, match="predicate failed"):
        ampkit.cast_model(model, keep_fp32=boom)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- every instruction set


def check_master_adam_bitwise():
    for case in ADAM_CASES:
        for dtype in LOW:
            test_master_adam_bitwise_vs_torch_fused_on_fp32_masters(case, dtype)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_master_adam_bitwise_under_every_capability(capability):
    """ATEN_CPU_CAPABILITY lowers torch's kernels and ampkit's together; in each, the master step
    still equals torch's fused step on the masters bitwise (without FMA in the baseline build)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_low_precision as t; t.check_master_adam_bitwise()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
