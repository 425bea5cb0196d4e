"""What several test files share: the scaler options of the random GradScaler sequences (the
differential of ampkit.GradScaler against torch.amp.GradScaler in test_grad_scaler.py and that of the
C++ GradScaler in test_cpp_against_torch.py draw them here, so both cover the same option space), and
an optimizer whose step fails once."""
import torch


def random_scaler_options(rng):
    """GradScaler keyword arguments drawn from ``rng`` (a random.Random): torch's options only."""
    return dict(
        init_scale=rng.choice([2.0**16, 128.0, 3000.5, 2.0**120, 1e-30]),
        growth_factor=rng.choice([2.0, 1.5, 4.0]),
        backoff_factor=rng.choice([0.5, 0.25, 0.9]),
        growth_interval=rng.choice([1, 2, 3, 7]),
        enabled=rng.random() > 0.1,
    )


class FailingOnceSGD(torch.optim.SGD):
    """torch.optim.SGD (lr 0.1, other options as given) whose first step raises RuntimeError, as an
    OOM or a NaN check would."""

    def __init__(self, params, **kwargs):
        super().__init__(params, lr=0.1, **kwargs)
        self.fail = True

    def step(self, closure=None):
        if self.fail:
            self.fail = False
            raise RuntimeError("step failed")
        return super().step(closure)
