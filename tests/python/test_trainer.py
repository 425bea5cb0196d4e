"""ampkit.Trainer against the hand-written AMP loop (autocast + GradScaler + optimizer)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import ampkit
from shared import FailingOnceSGD
import ampkit.optim as ao

F = torch.nn.functional


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def _same(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _inject_inf(model, when, i):
    if i in when:
        model[0].weight.grad[0, 0] = float("inf")


OPTIMIZERS = [
    pytest.param(lambda ps: ao.AdamW(ps, lr=1e-2), id="ampkit-AdamW"),
    pytest.param(lambda ps: ao.SGD(ps, lr=0.05, momentum=0.9), id="ampkit-SGD-momentum"),
    pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2), id="torch-Adam"),
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), id="torch-SGD-fused"),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_trainer_equals_hand_loop_fp16(make_opt, accum, clip):
    m1, m2 = _model(), _model()
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    s1 = ampkit.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    s2 = ampkit.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    trainer = ampkit.Trainer(m1, o1, device_type="cpu", dtype=torch.float16, scaler=s1,
                             accumulation_steps=accum, max_grad_norm=clip)
    inf_at = {4 * accum - 1}  # poison the last micro-batch of the 4th optimizer step

    def loss_fn(m, x, y):
        return F.mse_loss(m(x).float(), y)

    steps = 6 * accum
    for i, (x, y) in enumerate(_data(steps)):
        # Injection through a hook on the trainer side: the closure cannot touch grads.
        handle = None
        if i in inf_at:
            handle = m1[0].weight.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("inf")))
        stats = trainer.step(lambda: loss_fn(m1, x, y))
        if handle is not None:
            handle.remove()

        with ampkit.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(m2, x, y)
        s2.scale(loss / accum if accum > 1 else loss).backward()
        if i in inf_at:
            m2[0].weight.grad[:, 0] = float("inf")
        if (i + 1) % accum == 0:
            if clip is not None:
                s2.unscale_(o2)
                torch.nn.utils.clip_grad_norm_(m2.parameters(), clip)
            s2.step(o2)
            s2.update()
            o2.zero_grad()
            assert stats.stepped
            assert bool(stats.skipped) == (i in inf_at)
        else:
            assert not stats.stepped and not bool(stats.skipped)
        assert torch.equal(stats.loss, loss.detach())
        assert _same(m1, m2), f"micro-batch {i}"
    assert s1.get_scale() == s2.get_scale()
    assert s1.steps_skipped() == 1


def test_bf16_default_has_no_scaler_and_equals_hand_loop():
    m1, m2 = _model(), _model()
    o1, o2 = ao.AdamW(m1.parameters()), ao.AdamW(m2.parameters())
    trainer = ampkit.Trainer(m1, o1, device_type="cpu", dtype=torch.bfloat16, max_grad_norm=1.0)
    assert trainer.scaler is None
    for x, y in _data(4):
        stats = trainer.step(lambda: F.mse_loss(m1(x).float(), y))
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(m2(x).float(), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
        o2.step()
        o2.zero_grad()
        assert torch.equal(stats.grad_norm, norm)
        assert stats.scale is None and not bool(stats.skipped)
        assert _same(m1, m2)


def test_trainer_with_torch_grad_scaler_equals_ampkit_one():
    m1, m2 = _model(), _model()
    t1 = ampkit.Trainer(m1, ao.AdamW(m1.parameters()), device_type="cpu", dtype=torch.float16,
                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**6), max_grad_norm=1.0)
    t2 = ampkit.Trainer(m2, ao.AdamW(m2.parameters()), device_type="cpu", dtype=torch.float16,
                        scaler=ampkit.GradScaler("cpu", init_scale=2.0**6), max_grad_norm=1.0)
    for i, (x, y) in enumerate(_data(4)):
        hooks = []
        if i == 1:
            hooks = [m[0].bias.register_hook(lambda g: g * float("inf")) for m in (m1, m2)]
        s1 = t1.step(lambda: F.mse_loss(m1(x).float(), y))
        s2 = t2.step(lambda: F.mse_loss(m2(x).float(), y))
        for h in hooks:
            h.remove()
        assert bool(s1.skipped) == bool(s2.skipped) == (i == 1)
        assert torch.equal(s1.scale, s2.scale)
        assert _same(m1, m2)


def test_fp16_default_scaler():
    m = _model()
    trainer = ampkit.Trainer(m, ao.SGD(m.parameters(), lr=0.1), device_type="cpu", dtype=torch.float16)
    assert isinstance(trainer.scaler, ampkit.GradScaler)


def test_skipped_step_leaves_sgd_momentum_and_adam_state_untouched():
    for make in (lambda ps: ao.SGD(ps, lr=0.1, momentum=0.9), lambda ps: ao.Adam(ps, lr=0.1)):
        m = _model()
        opt = make(m.parameters())
        trainer = ampkit.Trainer(m, opt, device_type="cpu", dtype=torch.float16,
                                 scaler=ampkit.GradScaler("cpu", init_scale=4.0))
        data = _data(3)
        trainer.step(lambda: F.mse_loss(m(data[0][0]).float(), data[0][1]))
        params = [p.detach().clone() for p in m.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        h = m[2].bias.register_hook(lambda g: g * float("nan"))
        stats = trainer.step(lambda: F.mse_loss(m(data[1][0]).float(), data[1][1]))
        h.remove()
        assert bool(stats.skipped)
        assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
        new_state = opt.state_dict()["state"]
        for k, st in state.items():
            for key, v in st.items():
                assert torch.equal(new_state[k][key], v), key


@pytest.mark.parametrize("make_opt", OPTIMIZERS[:3])
def test_resume_is_bitwise(make_opt, tmp_path):
    data = _data(8)

    def run(m, trainer, batches):
        for x, y in batches:
            trainer.step(lambda: F.mse_loss(m(x).float(), y))

    def make(seed=0):
        m = _model(seed)
        opt = make_opt(m.parameters())
        scaler = ampkit.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        return m, ampkit.Trainer(m, opt, device_type="cpu", dtype=torch.float16, scaler=scaler,
                                 accumulation_steps=2, max_grad_norm=1.0)

    m_full, t_full = make()
    run(m_full, t_full, data)

    m_a, t_a = make()
    run(m_a, t_a, data[:4])
    path = tmp_path / "trainer.pt"
    torch.save(t_a.state_dict(), path)
    m_b, t_b = make(seed=123)  # different init: everything must come from the checkpoint
    t_b.load_state_dict(torch.load(path, weights_only=True))  # plain data: no pickled objects
    assert t_b.micro_steps == 4
    run(m_b, t_b, data[4:])
    assert _same(m_full, m_b)
    assert t_full.scaler.get_scale() == t_b.scaler.get_scale()


def test_misuse_errors():
    m = _model()
    opt = ao.AdamW(m.parameters())
    with pytest.raises(ValueError, match="at least one parameter"):
        ampkit.Trainer(None, _EmptyOpt(), device_type="cpu")
    with pytest.raises(ValueError, match="accumulation_steps"):
        ampkit.Trainer(m, opt, device_type="cpu", accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        ampkit.Trainer(m, opt, device_type="cpu", max_grad_norm=-1.0)
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="expected every parameter on cpu"):
        ampkit.Trainer(meta, torch.optim.SGD(meta.parameters(), lr=0.1), device_type="cpu")
    trainer = ampkit.Trainer(m, opt, device_type="cpu", dtype=torch.bfloat16, accumulation_steps=2)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="scalar loss, got a torch.float32 tensor of shape \\(4, 2\\)"):
        trainer.step(lambda: m(x).float())
    with pytest.raises(ValueError, match="expected the closure to return the loss tensor, got NoneType"):
        trainer.step(lambda: None)
    with pytest.raises(ValueError, match="require grad"):
        trainer.step(lambda: torch.tensor(1.0))
    assert trainer.micro_steps == 0 and all(p.grad is None for p in m.parameters())
    trainer.step(lambda: m(x).float().sum())
    with pytest.raises(RuntimeError, match="middle of an accumulation"):
        trainer.state_dict()


class _EmptyOpt:
    param_groups = [{"params": []}]


def test_train_example_runs():
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train.py")
    out = subprocess.run([sys.executable, example, "--steps", "60"], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "final loss" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_trainer_step_has_no_host_sync(dtype):
    m = _model().cuda()
    trainer = ampkit.Trainer(m, ao.AdamW(m.parameters()), device_type="cuda", dtype=dtype, max_grad_norm=1.0,
                             accumulation_steps=2)
    x, y = torch.randn(4, 8, device="cuda"), torch.randn(4, 2, device="cuda")
    for _ in range(2):  # warm-up: lazy state and scale creation
        trainer.step(lambda: F.mse_loss(m(x).float(), y))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            stats = trainer.step(lambda: F.mse_loss(m(x).float(), y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.stepped and not bool(stats.skipped)


# ------------------------------------------------------------------ failed calls change nothing


def _trainer_with_state(accum=2):
    m = _model()
    opt = ao.AdamW(m.parameters(), lr=1e-2)
    scaler = ampkit.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    t = ampkit.Trainer(m, opt, device_type="cpu", dtype=torch.float16, scaler=scaler, accumulation_steps=accum)
    for x, y in _data(2 * accum):
        t.step(lambda: F.mse_loss(m(x).float(), y))
    return m, t


def _everything(m, t):
    return ({k: v.clone() for k, v in m.state_dict().items()}, copy.deepcopy(t.optimizer.state_dict()),
            t.scaler.state_dict(), t.micro_steps)


def _assert_same_everything(a, b):
    (ma, oa, sa, ua), (mb, ob, sb, ub) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for k in oa["state"][i])
    assert sa == sb and ua == ub


def _corrupt(sd, what):
    sd = copy.deepcopy(sd)
    if what == "nan scale":
        sd["scaler"]["scale"] = float("nan")
    elif what == "huge growth tracker":
        sd["scaler"]["_growth_tracker"] = 2**70
    elif what == "wrong-shape weight":
        sd["model"]["2.weight"] = torch.zeros(3, 16)  # torch's load copies the fitting tensors, then raises
    elif what == "missing weight":
        del sd["model"]["0.bias"]
    elif what == "extra group":
        sd["optimizer"]["param_groups"].append(dict(sd["optimizer"]["param_groups"][0], params=[99]))
    elif what == "negative micro_steps":
        sd["micro_steps"] = -2
    elif what == "micro_steps inside a window":
        sd["micro_steps"] = 3
    elif what == "micro_steps not an int":
        sd["micro_steps"] = "4"
    elif what == "no scaler":
        sd["scaler"] = None
    elif what == "a list":
        sd = list(sd.items())
    return sd


CORRUPTIONS = ["nan scale", "huge growth tracker", "wrong-shape weight", "missing weight", "extra group",
               "negative micro_steps", "micro_steps inside a window", "micro_steps not an int", "no scaler", "a list"]


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_a_failed_load_changes_nothing(what):
    m_src, t_src = _trainer_with_state()
    m, t = _trainer_with_state()
    for x, y in _data(2, seed=7):  # make the target differ from the source
        t.step(lambda: F.mse_loss(m(x).float(), y))
    before = _everything(m, t)
    with pytest.raises((ValueError, TypeError)) as info:
        t.load_state_dict(_corrupt(t_src.state_dict(), what))
    assert "expected" in str(info.value)  # the message says what was expected
    _assert_same_everything(_everything(m, t), before)


class _RefusingAdamW(ao.AdamW):
    """An optimizer whose load fails after it changed its state (the part a check cannot foresee)."""

    refuse = True

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.refuse:
            self.refuse = False
            raise RuntimeError("refused")


def test_a_load_that_fails_late_is_rolled_back():
    m_src, t_src = _trainer_with_state()
    m = _model(5)
    t = ampkit.Trainer(m, _RefusingAdamW(m.parameters(), lr=1e-2), device_type="cpu", dtype=torch.float16,
                       scaler=ampkit.GradScaler("cpu", init_scale=4.0), accumulation_steps=2)
    for x, y in _data(2, seed=3):
        t.step(lambda: F.mse_loss(m(x).float(), y))
    before = _everything(m, t)
    with pytest.raises(RuntimeError, match="refused"):
        t.load_state_dict(t_src.state_dict())
    _assert_same_everything(_everything(m, t), before)


def test_bad_scaler_and_fp16_params_are_refused_before_any_step():
    m = _model()
    with pytest.raises(ValueError, match="expected scaler to be an ampkit.GradScaler or torch.amp.GradScaler .* got 'yes'"):
        ampkit.Trainer(m, ao.AdamW(m.parameters()), device_type="cpu", scaler="yes")
    half = _model().half()
    with pytest.raises(ValueError, match="got float16 parameters"):
        ampkit.Trainer(half, torch.optim.SGD(half.parameters(), lr=0.1), device_type="cpu", dtype=torch.float16)
    assert all(p.grad is None for p in half.parameters())


def test_a_failing_optimizer_step_drops_its_window_and_the_next_one_is_clean():
    m, m_ref = _model(), _model()
    t = ampkit.Trainer(m, FailingOnceSGD(m.parameters()), device_type="cpu", dtype=torch.float16,
                       scaler=ampkit.GradScaler("cpu", init_scale=2.0**8), accumulation_steps=2)
    ref = ampkit.Trainer(m_ref, torch.optim.SGD(m_ref.parameters(), lr=0.1), device_type="cpu", dtype=torch.float16,
                         scaler=ampkit.GradScaler("cpu", init_scale=2.0**8), accumulation_steps=2)
    data = _data(4)
    t.step(lambda: F.mse_loss(m(data[0][0]).float(), data[0][1]))
    with pytest.raises(RuntimeError, match="step failed"):
        t.step(lambda: F.mse_loss(m(data[1][0]).float(), data[1][1]))
    assert t.micro_steps == 0 and all(p.grad is None for p in m.parameters())
    assert id(t.optimizer) not in t.scaler._per_optimizer_states
    for x, y in data[2:]:  # the next window runs as on a fresh trainer
        t.step(lambda: F.mse_loss(m(x).float(), y))
        ref.step(lambda: F.mse_loss(m_ref(x).float(), y))
    assert _same(m, m_ref) and t.micro_steps == 2


def test_step_stats_repr_reads_no_tensor_value(monkeypatch):
    # Oracle: every way of reading a tensor's value raises, so a repr that formats one fails.
    model = _model()
    trainer = ampkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device_type="cpu",
                             dtype=torch.float16, max_grad_norm=1.0)
    x, y = _data(1)[0]
    stats = trainer.step(lambda: F.mse_loss(model(x), y))

    def refuse(*args, **kwargs):
        raise AssertionError("StepStats.__repr__ read a tensor's value")

    for name in ("item", "tolist", "numpy", "__repr__", "__str__", "__format__", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    text = repr(stats)
    monkeypatch.undo()
    assert text == ("StepStats(loss=<tensor float32[] on cpu>, scale=<tensor float32[] on cpu>, "
                    "skipped=<tensor bool[] on cpu>, grad_norm=<tensor float32[] on cpu>, stepped=True)")


def test_step_stats_item_reads_every_field():
    model = _model()
    trainer = ampkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device_type="cpu",
                             dtype=torch.float16, scaler=ampkit.GradScaler("cpu", init_scale=2.0), max_grad_norm=1.0)
    x, y = _data(1)[0]
    stats = trainer.step(lambda: F.mse_loss(model(x), y))
    assert stats.item() == {"loss": stats.loss.item(), "scale": stats.scale.item(), "skipped": stats.skipped.item(),
                            "grad_norm": stats.grad_norm.item(), "stepped": True}
    bf16 = ampkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device_type="cpu")
    values = bf16.step(lambda: F.mse_loss(model(x), y)).item()
    assert values["scale"] is None and values["grad_norm"] is None and values["skipped"] is False
