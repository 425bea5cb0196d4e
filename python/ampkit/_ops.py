"""Fake kernels of ampkit's operators (csrc/ops.cpp), for torch.compile.

The operators mutate their inputs and return nothing, so tracing them needs no shapes: under
FakeTensor each fake kernel does nothing. torch.library.register_fake puts the fake kernel on the
Meta key, so it also receives real tensors on the meta device; those go on to the C++ kernel,
whose device check raises the error torch's fused optimizers raise for them.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import _C  # noqa: F401  (defines torch.ops.ampkit)

_MUTATING_OPS = ("unscale_grads_", "update_scale_", "fused_adam_", "fused_sgd_")


def _is_fake(args) -> bool:
    for a in args:
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(t, torch.Tensor):
                return isinstance(t, FakeTensor)
    return True  # no tensor at all: nothing to check, nothing to do


def _register(overload: torch._ops.OpOverload) -> None:
    def fake(*args, **kwargs):
        if not _is_fake(args):
            return overload._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        return None

    torch.library.register_fake(overload)(fake)


for _name in _MUTATING_OPS:
    _packet = getattr(torch.ops.ampkit, _name)
    for _overload in _packet.overloads():
        _register(getattr(_packet, _overload))
