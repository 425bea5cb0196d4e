"""A typed user of ampkit's public API: tests/python/test_packaging.py runs mypy --strict on it."""
import torch

import ampkit
import ampkit.optim


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer = ampkit.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = ampkit.Trainer(model, optimizer, device_type="cpu", dtype=torch.bfloat16, max_grad_norm=1.0)
    stats: ampkit.StepStats = trainer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    values: ampkit.StepValues = stats.item()
    return values["loss"]


def edit_table() -> bool:
    ampkit.set_policy("aten::gelu", "cpu", ampkit.CastPolicy.fp32)
    policy: ampkit.CastPolicy | None = ampkit.get_policy("aten::gelu", "cpu")
    ampkit.reset_policies("cpu")
    return policy == ampkit.CastPolicy.fp32


def scaled_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    scaler = ampkit.GradScaler("cpu", init_scale=2.0**10, hysteresis=2)
    with ampkit.autocast("cpu", dtype=torch.bfloat16):
        out = model(loss)
    scaler.scale(out.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    skipped: torch.Tensor | None = scaler.last_step_skipped()
    return ampkit.is_autocast_enabled("cpu") or (skipped is not None and bool(skipped))


def cmake_prefix() -> str:
    return ampkit.cmake_prefix_path + ampkit.version.torch + ampkit.__version__


def nan_hunt(model: torch.nn.Module, x: torch.Tensor) -> str:
    with ampkit.precision_report(model) as report:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    rows: list[dict[str, object]] = report.rows
    with ampkit.overflow_locator(model) as locator, ampkit.module_scope("head"):
        model(x)
    first: ampkit.OverflowEvent | None = locator.first
    fix: str | None = None if first is None else first.suggestion
    return report.table(phase="forward") + str(len(rows)) + (fix or "")
