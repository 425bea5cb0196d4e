"""A NaN hunt, end to end: an fp16 run whose loss is NaN from the first step, what ran in which
precision (ampkit.precision_report), the op that overflowed and the fix (ampkit.overflow_locator),
and the run again with the fix.

The model is an attention block that forgets the 1/sqrt(d) scaling of its scores and gets
large activations: q @ k^T exceeds float16's range (65504) while every input is finite.

    python examples/nan_hunt.py [--steps N]
"""
import argparse
import math

import torch
import torch.nn.functional as F

import ampkit


class Attention(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1)  # no / sqrt(d): the bug
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


class Net(torch.nn.Module):
    def __init__(self, d_in: int = 16, d: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(d_in, d)
        self.attn = Attention(d)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.attn(self.embed(x))).mean(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Net()
    optimizer = ampkit.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = ampkit.Trainer(model, optimizer, device_type="cpu", dtype=torch.float16)
    x = 200.0 * torch.randn(32, 16, 16)  # features in raw units, not normalized
    y = torch.randint(0, 4, (32,))

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    print("1. fp16 training: the loss is NaN and GradScaler skips every step")
    for step in range(3):
        stats = trainer.step(closure)
        print(f"   step {step}: loss {float(stats.loss):.4g}, scale {float(stats.scale):.4g}, "
              f"skipped {bool(stats.skipped)}")

    print("\n2. what ran in which precision (one step, the forward's top-level ops):")
    with ampkit.precision_report(model) as report:
        trainer.step(closure)
    forward = [r for r in report.rows if r["phase"] == "forward" and not r["nested"]]
    print(report.table(phase="forward"))
    assert any(r["op"] == "aten::matmul" and r["out_dtype"] == torch.float16 for r in forward)

    print("3. where it overflows first:")
    with ampkit.overflow_locator(model) as locator:
        trainer.step(closure)
    first = locator.first
    print(first)
    assert first is not None and first.module == "attn" and first.suggestion is not None

    print(f"\n4. the fix, {first.suggestion}, and training again:")
    first.apply_suggestion()
    losses = []
    for step in range(args.steps):
        losses.append(float(trainer.step(closure).loss))
    print(f"   loss {losses[0]:.4g} -> {losses[-1]:.4g} in {args.steps} steps; scale {trainer.scaler.get_scale():.4g}")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    ampkit.reset_policies()


if __name__ == "__main__":
    main()
