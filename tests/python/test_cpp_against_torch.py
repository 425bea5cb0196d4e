"""The C++ classes against their references, driven from Python through ampkit._C._testing:
ampkit::GradScaler against torch.amp.GradScaler over random sequences (scale, growth tracker and
parameters compared bitwise after every step), and ampkit::Trainer against ampkit.Trainer."""
import math
import random

import pytest
import torch

import ampkit
from shared import random_scaler_options

CppScaler = ampkit._C._testing.CppScaler
CppTrainer = ampkit._C._testing.CppTrainer

# The C++ optimizer and the Python one that computes the same thing.
OPTIMIZERS = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr, foreach=False),
    "sgd_momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=False),
    "adamw_fused": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True),
}


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _bitwise(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _run_sequence(seed):
    rng = random.Random(seed)
    kind = rng.choice(sorted(OPTIMIZERS))
    lr = rng.choice([0.01, 0.1])
    kwargs = random_scaler_options(rng)
    ref_model, cpp_model = _model(seed), _model(seed)
    ref_opt = OPTIMIZERS[kind](ref_model.parameters(), lr)
    ref = torch.amp.GradScaler("cpu", **kwargs)
    cpp = CppScaler(list(cpp_model.parameters()), kind, lr, **kwargs)
    torch.manual_seed(seed)
    for it in range(rng.randint(4, 10)):
        x = torch.randn(6, 8) * rng.choice([1.0, 1e3])
        y = torch.randn(6, 4)
        ref_opt.zero_grad()
        cpp.zero_grad()
        ref.scale(torch.nn.functional.mse_loss(ref_model(x), y)).backward()
        cpp.scale(torch.nn.functional.mse_loss(cpp_model(x), y)).backward()
        if rng.random() < 0.3:  # the same poisoned grad in both
            pi = rng.randrange(4)
            index = rng.randrange(list(ref_model.parameters())[pi].numel())
            value = rng.choice([math.inf, -math.inf, math.nan])
            for m in (ref_model, cpp_model):
                with torch.no_grad():
                    list(m.parameters())[pi].grad.view(-1)[index] = value
        if rng.random() < 0.3:
            ref.unscale_(ref_opt)
            cpp.unscale_()
            for m in (ref_model, cpp_model):
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        ref.step(ref_opt)
        cpp.step()
        new_scale = rng.choice([1024.0, 7.5]) if rng.random() < 0.1 else None
        ref.update(new_scale)
        cpp.update(new_scale)
        what = f"seed {seed} ({kind}, {kwargs}) step {it}"
        assert cpp.get_scale() == ref.get_scale(), what
        if ref.is_enabled():
            assert cpp.get_growth_tracker() == ref._get_growth_tracker(), what
            _bitwise(cpp.scale_tensor(), ref._scale, what)
        for p, q in zip(cpp_model.parameters(), ref_model.parameters()):
            _bitwise(p, q, what)


@pytest.mark.parametrize("chunk", range(5))
def test_cpp_grad_scaler_matches_torch_on_random_sequences(chunk):
    for seed in range(chunk * 40, (chunk + 1) * 40):
        _run_sequence(seed)


@pytest.mark.parametrize("dtype,accum,clip", [(torch.float16, 1, None), (torch.float16, 3, 0.5),
                                               (torch.bfloat16, 2, 1.0)], ids=str)
def test_cpp_trainer_matches_the_python_trainer(dtype, accum, clip):
    py_model, cpp_model = _model(3), _model(3)
    py_trainer = ampkit.Trainer(
        py_model, ampkit.optim.AdamW(py_model.parameters(), lr=1e-2), device_type="cpu", dtype=dtype,
        scaler=ampkit.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if dtype == torch.float16 else None,
        accumulation_steps=accum, max_grad_norm=clip,
    )
    cpp_trainer = CppTrainer(list(cpp_model.parameters()), 1e-2, dtype, accum, clip, 2.0**10, 2)
    g = torch.Generator().manual_seed(4)
    for i in range(6 * accum):
        x, y = torch.randn(4, 8, generator=g) * (1e4 if i == 2 * accum - 1 else 1.0), torch.randn(4, 4, generator=g)
        stats = py_trainer.step(lambda: torch.nn.functional.mse_loss(py_model(x).float(), y))
        cpp_norm = cpp_trainer.step(lambda: torch.nn.functional.mse_loss(cpp_model(x).float(), y))
        if stats.stepped and clip is not None:
            assert cpp_norm == float(stats.grad_norm)
        for p, q in zip(cpp_model.parameters(), py_model.parameters()):
            _bitwise(p, q, f"micro-batch {i}")
        assert cpp_trainer.get_scale() == (py_trainer.scaler.get_scale() if py_trainer.scaler else 1.0)
    assert cpp_trainer.micro_steps == py_trainer.micro_steps
