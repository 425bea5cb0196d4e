"""pytest plugin: runs PyTorch's own AMP tests against ampkit by swapping torch's public names.

Loaded by scripts/run_pytorch_amp_tests.py (``-p ampkit_swap``). Before any test module is
imported it points ``torch.autocast`` / ``torch.amp.autocast`` / ``torch.cpu.amp.autocast`` /
``torch.cuda.amp.autocast`` at ampkit.autocast and ``torch.amp.GradScaler`` / ``torch.GradScaler`` /
``torch.cpu.amp.GradScaler`` / ``torch.cuda.amp.GradScaler`` at ampkit.GradScaler, with the
signatures of the names they replace. torch's internals that call these names (checkpointing's
recomputation) then use ampkit too; those that hold their own reference keep torch's.
"""
import warnings

import torch

import ampkit

SWAPPED = []


def _swap(owner, name, value):
    if hasattr(owner, name):
        SWAPPED.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)


def _deprecated(name, device):
    # The deprecated aliases warn as torch's do.
    warnings.warn(f"`torch.{device}.amp.{name}(args...)` is deprecated. Please use "
                  f"`torch.amp.{name}('{device}', args...)` instead.", FutureWarning, stacklevel=3)


class _CpuAutocast(ampkit.autocast):
    """torch.cpu.amp.autocast's signature."""

    def __init__(self, enabled=True, dtype=torch.bfloat16, cache_enabled=True):
        _deprecated("autocast", "cpu")
        super().__init__("cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


class _CudaAutocast(ampkit.autocast):
    """torch.cuda.amp.autocast's signature."""

    def __init__(self, enabled=True, dtype=torch.float16, cache_enabled=True):
        _deprecated("autocast", "cuda")
        super().__init__("cuda", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


class _CpuGradScaler(ampkit.GradScaler):
    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True):
        _deprecated("GradScaler", "cpu")
        super().__init__("cpu", init_scale, growth_factor, backoff_factor, growth_interval, enabled)


class _CudaGradScaler(ampkit.GradScaler):
    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True):
        _deprecated("GradScaler", "cuda")
        super().__init__("cuda", init_scale, growth_factor, backoff_factor, growth_interval, enabled)


def pytest_configure(config):
    _swap(torch, "autocast", ampkit.autocast)
    _swap(torch.amp, "autocast", ampkit.autocast)
    _swap(torch.cpu.amp, "autocast", _CpuAutocast)
    _swap(torch.cuda.amp, "autocast", _CudaAutocast)
    _swap(torch.amp, "GradScaler", ampkit.GradScaler)
    _swap(torch, "GradScaler", ampkit.GradScaler)
    _swap(torch.cpu.amp, "GradScaler", _CpuGradScaler)
    _swap(torch.cuda.amp, "GradScaler", _CudaGradScaler)


def pytest_report_header(config):
    return "ampkit_swap: " + ", ".join(f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in SWAPPED)
