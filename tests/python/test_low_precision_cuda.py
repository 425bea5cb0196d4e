"""ampkit's CUDA kernels for low-precision parameters (csrc/optim_lowp_cuda.h).

Without a GPU the kernels' block bodies run on the host (``_C._testing.set_emulate_cuda_kernels``):
CPU parameters then take the CUDA path (launch tables, pointers, step counting, the inf flag, the
random bits' keys), checked bitwise against ampkit's CPU kernel where the arithmetic is the same
(SGD) and against a float32 reference of torch's CUDA Adam formula (Adam). The tests at the end run
on a CUDA device against torch's fused CUDA kernels and skip without one."""
import contextlib
import ctypes
import ctypes.util

import numpy as np
import pytest
import torch

import ampkit
import ampkit.optim as ao

_testing = ampkit._C._testing
# The C library's powf, which the host emulation calls (std::pow(float, float)) as the kernel calls
# the device's: numpy's float32 power rounds some results differently (0.9f ** 4).
_libm = ctypes.CDLL(ctypes.util.find_library("m"))
_libm.powf.restype = ctypes.c_float
_libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
CHUNK = 65536  # elements per block (optim_lowp_cuda.h: kChunk)


@contextlib.contextmanager
def emulated():
    previous = _testing.set_emulate_cuda_kernels(True)
    try:
        yield
    finally:
        _testing.set_emulate_cuda_kernels(previous)


# Sizes across the launch tables' limits: 45 tensors (36 per table), chunk boundaries, empty ones.
SHAPES = [(33, 7), (CHUNK + 3,), (0,), (7,)] + [(5, 3)] * 40 + [(2 * CHUNK - 1,)]


def _params(dtype, shapes=SHAPES, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _grads(params, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype) for p in params]


def _run(make, dtype, emulate, steps=5, inf_at=(2,), shapes=SHAPES, device="cpu"):
    """Steps under a loss scale, one step skipped; returns the params and the optimizer."""
    params = _params(dtype, shapes, device=device)
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    with emulated() if emulate else contextlib.nullcontext():
        for it in range(steps):
            scale = torch.tensor(2.0 ** (8 - it), device=device)
            for p, g in zip(params, _grads(params, gen, float(scale))):
                p.grad = g
            opt.step(grad_scale=scale, found_inf=torch.tensor(float(it in inf_at), device=device))
    return params, opt


def _assert_same(a, b):
    pa, oa = a
    pb, ob = b
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach(), y.detach())
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


SGD_CASES = [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, dampening=0.5, maximize=True),
    dict(lr=torch.tensor(0.05), momentum=0.0, weight_decay=0.1),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=["nesterov-wd", "dampening-maximize", "tensor-lr-no-momentum"])
@pytest.mark.parametrize("layout", ["master-bf16", "master-fp16", "sr-fp32-states", "sr-bf16-states"])
def test_emulated_cuda_sgd_equals_the_cpu_kernel_bitwise(kwargs, layout):
    """SGD's arithmetic is the same on both paths (torch's fused order, no multiply-add on the
    host), and stochastic rounding draws the same bits (same keys from the same step counters)."""
    dtype = torch.float16 if layout == "master-fp16" else torch.bfloat16
    lowp = dict(master_weights=True) if layout.startswith("master") else dict(stochastic_rounding=True, seed=7)
    if layout == "sr-bf16-states":
        lowp["state_dtype"] = torch.bfloat16

    def make(ps):
        kw = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        return ao.SGD(ps, **kw, **lowp)

    _assert_same(_run(make, dtype, emulate=True), _run(make, dtype, emulate=False))


def _adam_reference(params, grads, masters, m, v, vmax, step, lr, beta1, beta2, eps, wd, adamw, maximize, scale):
    """torch's CUDA adam_math (fused_adam_utils.cuh, torch 2.13) in numpy float32, operation by
    operation; fma through float64 (a product of two float32 is exact there)."""
    f32 = np.float32

    def fma(a, b, c):
        return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(f32)

    lr, beta1, beta2, eps, wd = f32(lr), f32(beta1), f32(beta2), f32(eps), f32(wd)
    bc1 = f32(1) - f32(_libm.powf(beta1, step))
    bc2_sqrt = np.sqrt(f32(1) - f32(_libm.powf(beta2, step)))
    for i, g16 in enumerate(grads):
        p, g = masters[i], g16.float().numpy() / f32(scale)
        if maximize:
            g = -g
        if wd != 0:
            if adamw:
                p = p - lr * wd * p
            else:
                g = g + p * wd
        m[i] = fma(np.full_like(g, beta1), m[i], fma(np.full_like(g, -beta1), g, g))
        gg = g * g
        v[i] = fma(np.full_like(g, beta2), v[i], fma(np.full_like(g, -beta2), gg, gg))
        second = v[i]
        if vmax is not None:
            vmax[i] = np.where(vmax[i] < v[i], v[i], vmax[i])
            second = vmax[i]
        denom = np.sqrt(second) / bc2_sqrt + eps
        masters[i] = p - (lr / bc1) * m[i] / denom


ADAM_CASES = [
    (ao.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (ao.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    (ao.AdamW, dict(lr=3e-3, betas=(0.3, 0.9), eps=1e-6)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ADAM_CASES, ids=["adamw-wd", "adam-amsgrad-maximize", "adamw-betas"])
def test_emulated_cuda_master_adam_equals_torch_cuda_formula(case, dtype):
    cls, kwargs = case
    shapes = [(33, 7), (CHUNK + 3,), (7,)] + [(3, 5)] * 40
    params = _params(dtype, shapes)
    opt = cls(params, master_weights=True, **kwargs)
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    amsgrad = kwargs.get("amsgrad", False)
    masters = [p.detach().float().numpy().copy() for p in params]
    m = [np.zeros_like(x) for x in masters]
    v = [np.zeros_like(x) for x in masters]
    vmax = [np.zeros_like(x) for x in masters] if amsgrad else None
    gen = torch.Generator().manual_seed(2)
    step = 0
    with emulated():
        for it in range(5):
            scale = 2.0 ** (8 - it)
            grads = _grads(params, gen, scale)
            for p, g in zip(params, grads):
                p.grad = g
            skip = it == 2
            opt.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(float(skip)))
            if skip:
                continue
            step += 1
            _adam_reference(params, grads, masters, m, v, vmax, step, kwargs["lr"], beta1, beta2,
                            kwargs.get("eps", 1e-8), kwargs.get("weight_decay", 0.01 if cls is ao.AdamW else 0.0),
                            cls is ao.AdamW,
                            kwargs.get("maximize", False), scale)
            for i, p in enumerate(params):
                st = opt.state[p]
                assert st["step"].item() == step
                assert np.array_equal(st["master"].numpy(), masters[i]), (it, i)
                assert np.array_equal(st["exp_avg"].numpy(), m[i])
                assert np.array_equal(st["exp_avg_sq"].numpy(), v[i])
                if amsgrad:
                    assert np.array_equal(st["max_exp_avg_sq"].numpy(), vmax[i])
                assert torch.equal(p.detach(), st["master"].to(dtype)), "the parameter is not its master rounded"


def test_emulated_cuda_master_adam_is_close_to_torch_fused_on_masters():
    """torch's CPU and CUDA fused Adam differ in the last bits (lerp vs. multiply-adds); the CUDA
    path stays within a few float32 ulps of the CPU one."""
    params = _params(torch.bfloat16, [(64, 33), (CHUNK + 3,)])
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    opt = ao.AdamW(params, lr=1e-2, weight_decay=0.1, master_weights=True)
    ref = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(3)
    with emulated():
        for _ in range(4):
            for p, m, g in zip(params, masters, _grads(params, gen)):
                p.grad, m.grad = g, g.float()
            opt.step()
            ref.step()
    for p, m in zip(params, masters):
        # Two float32 ulps at magnitude 1 (the masters' scale), 2e-6 relative.
        torch.testing.assert_close(opt.state[p]["master"], m.detach(), rtol=2e-6, atol=2.5e-7)


def test_emulated_cuda_stochastic_rounding_adam_brackets_the_float32_update():
    """SR Adam on the CUDA path: float32 states as the reference formula, each bf16 parameter one of
    the two bf16 neighbours of its float32 update, rounded up about as often as the fractions say;
    a seed reproduces the bits and another seed draws others."""
    def run(seed):
        params = _params(torch.bfloat16, [(256, 257), (7,)], seed=4)
        opt = ao.AdamW(params, lr=1e-2, stochastic_rounding=True, seed=seed)
        before = [p.detach().float().numpy().copy() for p in params]
        g = _grads(params, torch.Generator().manual_seed(5))
        for p, gi in zip(params, g):
            p.grad = gi
        with emulated():
            opt.step()
        return params, opt, before, g

    params, opt, before, grads = run(1)
    values = [b.copy() for b in before]
    m = [np.zeros_like(x) for x in values]
    v = [np.zeros_like(x) for x in values]
    _adam_reference(params, grads, values, m, v, None, 1, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False, 1.0)
    ups = total = 0
    expected_ups = 0.0
    for p, x, mi, vi in zip(params, values, m, v):
        assert np.array_equal(opt.state[p]["exp_avg"].numpy(), mi)
        assert np.array_equal(opt.state[p]["exp_avg_sq"].numpy(), vi)
        down = torch.from_numpy(x).to(torch.bfloat16)  # nearest; then the neighbour on each side
        low = torch.where(down.float() > torch.from_numpy(x), torch.nextafter(down, torch.tensor(-np.inf, dtype=torch.bfloat16)), down)
        high = torch.where(low.float() < torch.from_numpy(x), torch.nextafter(low, torch.tensor(np.inf, dtype=torch.bfloat16)), low)
        got = p.detach()
        assert ((got == low) | (got == high)).all(), "a rounding left the two neighbours"
        frac = ((torch.from_numpy(x).double() - low.double()) / (high.double() - low.double()).clamp_min(1e-300))
        frac = torch.where(high == low, torch.zeros_like(frac), frac)
        ups += int(((got == high) & (high != low)).sum())
        expected_ups += float(frac.sum())
        total += x.size
    assert abs(ups - expected_ups) < 5 * (total / 4) ** 0.5, (ups, expected_ups)
    again, _, _, _ = run(1)
    other, _, _, _ = run(2)
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    assert not all(torch.equal(a, b) for a, b in zip(params, other))


def test_emulated_cuda_path_leaves_grads_and_skips_untouched():
    params = _params(torch.bfloat16, [(CHUNK + 3,), (9,)])
    opt = ao.AdamW(params, master_weights=True, amsgrad=True)
    for p in params:
        p.grad = torch.full_like(p, 512.0)
    grads = [p.grad.clone() for p in params]
    with emulated():
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "the grads must stay scaled"
        state = {k: v.clone() for k, v in opt.state[params[0]].items()}
        before = params[0].detach().clone()
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    assert torch.equal(before, params[0].detach())
    for key, value in state.items():
        assert torch.equal(opt.state[params[0]][key], value), key


def test_emulated_cuda_path_writes_non_contiguous_tensors_back():
    base = torch.randn(64, 48).to(torch.bfloat16)
    a = base.clone().t().requires_grad_()  # a non-contiguous leaf
    b = base.clone().t().contiguous().requires_grad_()
    g = torch.randn(48, 64).to(torch.bfloat16)
    oa = ao.SGD([a], lr=0.1, momentum=0.9, master_weights=True)
    ob = ao.SGD([b], lr=0.1, momentum=0.9, master_weights=True)
    a.grad, b.grad = g.clone(), g.clone()
    with emulated():
        oa.step()
    ob.step()
    assert torch.equal(a.detach(), b.detach())
    assert torch.equal(oa.state[a]["master"], ob.state[b]["master"])


@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_emulated_cuda_path_takes_mixed_state_dtypes_one_launch_each(op):
    """The operators take stochastic-rounding states of float32 for one tensor and bf16 for another
    (a kernel reads one state type, so one launch each). SGD: as the CPU kernel, bitwise. Adam: each
    tensor's states as when it steps alone (its parameter draws other random bits alone: its index
    in the lists keys them), the parameter within one bf16 spacing."""
    def run(indices, emulate=True):
        gen = torch.Generator().manual_seed(8)
        ps = [torch.randn(CHUNK + 5, generator=gen).to(torch.bfloat16) for _ in range(2)]
        gs = [torch.randn(CHUNK + 5, generator=gen).to(torch.bfloat16) for _ in range(2)]
        dtypes = [torch.float32, torch.bfloat16]
        states = [[torch.rand(CHUNK + 5, generator=gen).to(d) for d in dtypes] for _ in range(2)]
        steps = [torch.tensor(3.0), torch.tensor(3.0)]
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        with emulated() if emulate else contextlib.nullcontext():
            if op == "adam":
                torch.ops.ampkit.fused_adam_(pick(ps), pick(gs), pick(states[0]), pick(states[1]), [], pick(steps),
                                             lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8,
                                             amsgrad=False, maximize=False, decoupled_weight_decay=True,
                                             stochastic_rounding=True, seed=4)
            else:
                torch.ops.ampkit.fused_sgd_(pick(ps), pick(gs), pick(states[0]), lr=0.1, momentum=0.9, dampening=0.0,
                                            weight_decay=0.0, nesterov=False, maximize=False, is_first_step=False,
                                            state_steps=pick(steps), stochastic_rounding=True, seed=4)
        return [[ps[i], states[0][i], states[1][i], steps[i]] for i in indices]

    together = run([0, 1])
    if op == "sgd":
        expected = run([0, 1], emulate=False)
        assert all(torch.equal(a, b) for x, y in zip(together, expected) for a, b in zip(x, y))
        return
    for (p, *rest), (q, *rest_alone) in zip(together, run([0]) + run([1])):
        assert all(torch.equal(a, b) for a, b in zip(rest, rest_alone))
        spacing = p.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((p.float() - q.float()).abs() <= spacing).all()


# ---- on a CUDA device ----

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _testing.cuda_kernels_built()),
                          reason="needs a CUDA device and ampkit built with its CUDA kernels")
TORCH_2_13 = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def _master_adam_cuda(cls, torch_cls, kwargs, dtype, steps=5):
    params = _params(dtype, SHAPES[:3] + SHAPES[-1:], device="cuda")
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    opt = cls(params, master_weights=True, **kwargs)
    ref = torch_cls(masters, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for it in range(steps):
        scale = torch.tensor(2.0 ** (8 - it), device="cuda")
        found_inf = torch.tensor(float(it == 2), device="cuda")
        for p, m, g in zip(params, masters, _grads(params, gen, float(scale))):
            p.grad, m.grad = g, g.float()
        opt.step(grad_scale=scale, found_inf=found_inf)
        ref.grad_scale, ref.found_inf = scale, found_inf
        ref.step()
        del ref.grad_scale, ref.found_inf
    return params, masters, opt, ref


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(ao.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                  (ao.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))],
                         ids=["adamw", "adam-amsgrad"])
def test_cuda_master_adam_vs_torch_fused_cuda_on_masters(case, dtype):
    """torch 2.13's formula: bitwise there; older torch computes some scalars in double, so close."""
    params, masters, opt, ref = _master_adam_cuda(*case, dtype)
    for p, m in zip(params, masters):
        if TORCH_2_13:
            assert torch.equal(opt.state[p]["master"], m.detach())
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[m]["exp_avg_sq"])
        else:
            torch.testing.assert_close(opt.state[p]["master"], m.detach(), rtol=2e-6, atol=1e-8)
        assert torch.equal(opt.state[p]["step"], ref.state[m]["step"])
        assert torch.equal(p.detach(), opt.state[p]["master"].to(dtype))


@cuda
@pytest.mark.parametrize("make", [lambda ps: ao.AdamW(ps, master_weights=True),
                                  lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9, master_weights=True),
                                  lambda ps: ao.AdamW(ps, stochastic_rounding=True, state_dtype=torch.bfloat16),
                                  lambda ps: ao.SGD(ps, lr=0.1, stochastic_rounding=True)],
                         ids=["adamw-master", "sgd-master", "adamw-sr", "sgd-sr"])
def test_cuda_step_is_sync_free_and_matches_the_emulation(make):
    """No host sync in a scaled step; the device's results equal the host emulation's up to the
    multiply-adds nvcc contracts (SGD: bitwise where none is contracted is not guaranteed)."""
    params = _params(torch.bfloat16, [(33, 7), (CHUNK + 3,)], device="cuda")
    host = [p.detach().cpu().requires_grad_() for p in params]
    opt, hopt = make(params), make(host)
    gen = torch.Generator().manual_seed(6)
    for p, h, g in zip(params, host, _grads(params, gen, 64.0)):
        p.grad, h.grad = g, g.cpu()
    scale, found_inf = torch.tensor(64.0, device="cuda"), torch.tensor(0.0, device="cuda")
    opt.step(grad_scale=scale, found_inf=found_inf)  # the states are created here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(grad_scale=scale, found_inf=found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with emulated():
        for _ in range(2):
            hopt.step(grad_scale=scale.cpu(), found_inf=found_inf.cpu())
    for p, h in zip(params, host):
        diff = (p.detach().cpu().float() - h.detach().float()).abs()
        spacing = h.detach().float().abs().clamp_min(1e-6) * 2.0 ** -7
        assert (diff <= 2 * spacing).all()


@cuda
def test_cuda_stochastic_rounding_reproducible_and_skips():
    def run(seed):
        params = _params(torch.bfloat16, [(300, 257)], device="cuda")
        opt = ao.SGD(params, lr=0.1, momentum=0.9, stochastic_rounding=True, seed=seed)
        gen = torch.Generator().manual_seed(9)
        for it in range(3):
            for p, g in zip(params, _grads(params, gen)):
                p.grad = g
            opt.step(grad_scale=torch.tensor(1.0, device="cuda"),
                     found_inf=torch.tensor(float(it == 1), device="cuda"))
        return params[0].detach().clone(), opt.state[params[0]]["step"].item()

    a, steps = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert steps == 2, "a skipped step must not count"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
