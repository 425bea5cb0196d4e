"""ampkit.cast_model: bf16/fp16 parameters for the optimizers' master_weights / stochastic_rounding.

Apex's O2 and DeepSpeed keep the model's parameters in low precision and the float32 copies in the
optimizer; normalization layers stay in float32 (Apex's ``keep_batchnorm_fp32``), since their
statistics and affine parameters lose too much in bf16/fp16. ``cast_model`` does that preparation;
``ampkit.optim.AdamW(model.parameters(), master_weights=True)`` then keeps the masters.
"""
from __future__ import annotations

from typing import Callable, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["cast_model", "KEEP_FP32"]

#: The module types cast_model keeps in float32 by default: batch, layer, group, instance, RMS and
#: local-response norms.
KEEP_FP32: Tuple[Type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
)

KeepFp32 = Union[Tuple[Type[nn.Module], ...], Type[nn.Module], Callable[[str, nn.Module], bool]]


def cast_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_fp32: KeepFp32 = KEEP_FP32) -> nn.Module:
    """Casts the floating parameters and buffers of ``model`` to ``dtype`` in place, except those of
    the modules that ``keep_fp32`` keeps in float32, and returns ``model``.

    Args:
        model: the module; its submodules are visited with their qualified names.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        keep_fp32: module types (a type or a tuple of types) whose own parameters and buffers stay
            float32, or a predicate ``(qualified_name, module) -> bool``. Default: the
            normalization layers (``KEEP_FP32``). ``()`` casts everything.

    A kept module's parameters stay float32 even where its parent is cast; parameters shared by a
    kept and a cast module stay float32. Parameters keep their identity (``.data`` is replaced), so
    optimizers made before still hold them; grads of cast parameters are dropped (their dtype no
    longer matches). Raises ValueError for another dtype or a keep_fp32 that is neither.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"cast_model: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cast_model: expected dtype torch.bfloat16 or torch.float16, got {dtype!r}")
    if isinstance(keep_fp32, type):
        keep_fp32 = (keep_fp32,)
    if isinstance(keep_fp32, tuple):
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in keep_fp32):
            raise ValueError(f"cast_model: expected keep_fp32 to hold torch.nn.Module types, got {keep_fp32!r}")
        types = keep_fp32
        keep: Callable[[str, nn.Module], bool] = lambda name, module: isinstance(module, types)
    elif callable(keep_fp32):
        keep = keep_fp32
    else:
        raise ValueError("cast_model: expected keep_fp32 to be module types or a predicate (name, module) -> bool, "
                         f"got {keep_fp32!r}")
    # Decide everything first (the predicate may raise), then cast: a failure changes nothing.
    kept, cast = set(), []
    for name, module in model.named_modules(remove_duplicate=False):
        keep_this = bool(keep(name, module))
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.is_floating_point():
                (kept.add(id(t)) if keep_this else cast.append(t))
    done = set()
    with torch.no_grad():
        for t in cast:
            if id(t) in kept or id(t) in done:
                continue
            done.add(id(t))
            t.data = t.data.to(dtype)
            if isinstance(t, nn.Parameter) and t.grad is not None:
                t.grad = None
    return model
