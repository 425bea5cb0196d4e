"""A complete mixed-precision training loop with ampkit.Trainer on a small synthetic regression
task: fp16 autocast with loss scaling, a fused AdamW, gradient accumulation and clipping.

    python examples/train.py [--steps N] [--device cpu|cuda]
"""
import argparse

import torch

import ampkit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    # Targets from a fixed random MLP, so that the task is learnable.
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 4)).to(device)
    optimizer = ampkit.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    trainer = ampkit.Trainer(model, optimizer, device_type=device.type, dtype=torch.float16,
                             accumulation_steps=2, max_grad_norm=1.0)

    first = loss = float("nan")
    for step in range(args.steps):
        x = torch.randn(64, 32, device=device)
        with torch.no_grad():
            y = teacher(x)
        stats = trainer.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y))
        if step % 50 == 0 or step == args.steps - 1:
            # item() reads the stats to the host (a sync); do it only when printing.
            values = stats.item()
            loss = values["loss"]
            first = loss if step == 0 else first
            print(f"step {step:4d}  loss {loss:.5f}  scale {values['scale']:g}  skipped {values['skipped']}")
    scaler = trainer.scaler
    skipped = scaler.steps_skipped() if isinstance(scaler, ampkit.GradScaler) else 0
    print(f"final loss {loss:.5f} (first {first:.5f}); skipped steps: {skipped}")
    if not loss < first:
        raise SystemExit("the loss did not decrease")


if __name__ == "__main__":
    main()
