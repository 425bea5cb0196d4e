"""HF accelerate: an ``Accelerator`` whose mixed precision is ampkit's autocast and GradScaler.

::

    from ampkit.integrations.accelerate import AmpkitAccelerator

    accelerator = AmpkitAccelerator(mixed_precision="fp16")     # instead of Accelerator(mixed_precision="fp16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for x, y in loader:
        loss = loss_fn(model(x), y)              # the forward runs under ampkit.autocast
        accelerator.backward(loss)               # scaled by the ampkit.GradScaler
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # unscales first
        optimizer.step()                         # skipped on inf/NaN grads; the scale is updated
        optimizer.zero_grad()
    accelerator.save_state("ckpt")               # the scaler's state is saved too (scaler.pt)

accelerate implements ``mixed_precision="fp16"`` / ``"bf16"`` with ``torch.autocast`` and
``torch.amp.GradScaler``. ``AmpkitAccelerator`` keeps accelerate's own mixed precision off and
puts ampkit's in the same places: ``prepare`` wraps each model's ``forward`` in ``ampkit.autocast``
(outputs converted to float32, as accelerate does), ``accelerator.autocast()`` opens an ampkit
region, and under fp16 ``accelerator.scaler`` is an ``ampkit.GradScaler`` that ``backward``, the
prepared optimizers' ``step``, ``unscale_gradients`` / ``clip_grad_norm_`` and
``save_state`` / ``load_state`` use. Unlike accelerate, fp16 also works on the CPU.

For single-process and DDP training. DeepSpeed, FSDP and Megatron-LM bring their own mixed
precision and are refused.
"""
from __future__ import annotations

import contextlib
import os
from types import MethodType
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import AutocastKwargs, convert_outputs_to_fp32

from .._autocast import autocast
from .._grad_scaler import GradScaler

__all__ = ["AmpkitAccelerator"]

_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class AmpkitAccelerator(Accelerator):
    """``accelerate.Accelerator`` with ampkit's autocast and GradScaler as its mixed precision.

    Takes ``Accelerator``'s keyword arguments. The autocast follows ampkit's cast-policy table,
    edited or not (``ampkit.set_policy``).

    Args:
        mixed_precision: ``"fp16"``, ``"bf16"`` or ``"no"``; None reads ``ACCELERATE_MIXED_PRECISION``
            (set by ``accelerate launch --mixed_precision``), as accelerate does, default ``"no"``.
        scaler: the GradScaler for ``"fp16"``; None: ``ampkit.GradScaler`` on the accelerator's
            device type, with the options of a ``GradScalerKwargs`` handler if one is given.
            Must be None otherwise.
        **kwargs: the other arguments of ``accelerate.Accelerator``; an ``AutocastKwargs``
            handler's ``enabled`` / ``cache_enabled`` apply to ampkit's regions.

    Attributes:
        autocast_dtype: torch.float16, torch.bfloat16, or None without mixed precision.
        scaler: the GradScaler, None unless fp16.

    Raises:
        ValueError: an unknown ``mixed_precision``, a scaler without fp16, or a DeepSpeed, FSDP or
            Megatron-LM plugin.
    """

    def __init__(self, *, mixed_precision: Optional[str] = None, scaler: Optional[torch.amp.GradScaler] = None,
                 **kwargs: Any) -> None:
        if mixed_precision is None:
            mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        precision = str(mixed_precision).lower()
        if precision not in _DTYPES:
            raise ValueError(f"AmpkitAccelerator: expected mixed_precision to be 'fp16', 'bf16' or 'no', got "
                             f"{mixed_precision!r}")
        for name in ("deepspeed_plugin", "fsdp_plugin", "megatron_lm_plugin"):
            if kwargs.get(name) is not None:
                raise ValueError(f"AmpkitAccelerator: expected no {name} (it brings its own mixed precision), got "
                                 f"{kwargs[name]!r}")
        if scaler is not None and precision != "fp16":
            raise ValueError(f"AmpkitAccelerator: expected no scaler with mixed_precision={precision!r} (only fp16 "
                             f"scales the loss), got {scaler!r}")
        super().__init__(mixed_precision="no", **kwargs)  # accelerate's own autocast and scaler stay off
        if self.distributed_type.value in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
            raise ValueError(f"AmpkitAccelerator: expected single-process or DDP training, got "
                             f"{self.distributed_type} (it brings its own mixed precision)")
        self.autocast_dtype = _DTYPES[precision]
        if precision == "fp16" and scaler is None:
            options = self.scaler_handler.to_kwargs() if self.scaler_handler is not None else {}
            scaler = GradScaler(self.device.type, **options)
        self.scaler = scaler

    def _region(self, autocast_handler: Optional[AutocastKwargs] = None) -> Any:
        handler = autocast_handler if autocast_handler is not None else self.autocast_handler
        options = handler.to_kwargs() if handler is not None else {}
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return autocast(self.device.type, dtype=self.autocast_dtype, **options)

    @contextlib.contextmanager
    def autocast(self, autocast_handler: Optional[AutocastKwargs] = None) -> Iterator[None]:
        """An ``ampkit.autocast`` region of the accelerator's device type and dtype (nothing without
        mixed precision); ``autocast_handler`` overrides the accelerator's ``AutocastKwargs``."""
        with self._region(autocast_handler):
            yield

    def prepare_model(self, model: torch.nn.Module, device_placement: Optional[bool] = None,
                      evaluation_mode: bool = False) -> torch.nn.Module:
        """accelerate's ``prepare_model``, with ``model.forward`` run under ``ampkit.autocast`` and
        its outputs converted to float32, as accelerate does with ``torch.autocast``
        (``unwrap_model(model, keep_fp32_wrapper=False)`` removes both)."""
        if self.autocast_dtype is not None:
            model._original_forward = model.forward
            region = self._region()
            if hasattr(model.forward, "__func__"):
                model.forward = MethodType(convert_outputs_to_fp32(region(model.forward.__func__)), model)
            else:
                model.forward = convert_outputs_to_fp32(region(model.forward))
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Unscales the gradients of ``optimizer`` (default: every prepared optimizer) with the
        GradScaler; nothing without one. ``clip_grad_norm_`` and ``clip_grad_value_`` call it."""
        if self.scaler is None:
            return
        if optimizer is None:
            optimizer = self._optimizers
        elif not isinstance(optimizer, (tuple, list)):
            optimizer = [optimizer]
        for opt in optimizer:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            self.scaler.unscale_(opt)
