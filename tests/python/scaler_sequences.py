"""What the random GradScaler sequences share: the differential of ampkit.GradScaler against
torch.amp.GradScaler (test_grad_scaler.py) and that of the C++ GradScaler (test_cpp_against_torch.py)
draw their scaler options from here, so both cover the same option space."""


def random_scaler_options(rng):
    """GradScaler keyword arguments drawn from ``rng`` (a random.Random): torch's options only."""
    return dict(
        init_scale=rng.choice([2.0**16, 128.0, 3000.5, 2.0**120, 1e-30]),
        growth_factor=rng.choice([2.0, 1.5, 4.0]),
        backoff_factor=rng.choice([0.5, 0.25, 0.9]),
        growth_interval=rng.choice([1, 2, 3, 7]),
        enabled=rng.random() > 0.1,
    )
