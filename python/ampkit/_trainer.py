"""ampkit.Trainer: the AMP training step (autocast forward, scaled backward, accumulation,
clipping, skippable step, scale update, zero_grad) in one call, for any torch.optim optimizer.

The recipe and its arithmetic are those of ``ampkit::Trainer`` in C++: the same division of the
loss by the accumulation steps, the same scaler (ampkit.GradScaler shares its numerics with
ampkit::GradScaler) and the same clipping function (``_C._clip_grad_norm_``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, TypedDict, Union

import torch

from . import _C
from ._autocast import autocast
from ._grad_scaler import GradScaler

__all__ = ["Trainer", "StepStats", "StepValues"]

_DEFAULT = object()


class StepValues(TypedDict):
    """``StepStats.item()``: the stats read to the host."""

    loss: float
    scale: Optional[float]
    skipped: bool
    grad_norm: Optional[float]
    stepped: bool


class StepStats:
    """What one ``Trainer.step`` did. Every field is a device tensor (reading it does not sync;
    ``float(stats.loss)`` does).

    ``repr`` shows each tensor's dtype, shape and device, not its value, so that printing the stats
    does not wait for the device; ``item()`` reads the values with one synchronization.

    Attributes:
        loss: the closure's loss (before division by accumulation_steps), detached, 0-dim.
        scale: the scale the loss was multiplied by (0-dim float32), None without a scaler.
        skipped: 0-dim bool, whether the optimizer step was skipped for inf/NaN grads (False on
            micro-batches that only accumulate, and without a scaler).
        grad_norm: total 2-norm of the unscaled grads before clipping, None unless this call
            stepped with max_grad_norm set.
        stepped: bool, whether this call ran the optimizer step.
    """

    __slots__ = ("loss", "scale", "skipped", "grad_norm", "stepped")

    loss: torch.Tensor
    scale: Optional[torch.Tensor]
    skipped: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    stepped: bool

    def __init__(self, loss: torch.Tensor, scale: Optional[torch.Tensor], skipped: torch.Tensor,
                 grad_norm: Optional[torch.Tensor], stepped: bool) -> None:
        self.loss = loss
        self.scale = scale
        self.skipped = skipped
        self.grad_norm = grad_norm
        self.stepped = stepped

    def __repr__(self) -> str:
        # Only metadata: formatting a tensor's value would wait for the device (a host sync per
        # field, e.g. when a training loop logs the stats).
        return (f"StepStats(loss={_describe(self.loss)}, scale={_describe(self.scale)}, "
                f"skipped={_describe(self.skipped)}, grad_norm={_describe(self.grad_norm)}, stepped={self.stepped})")

    def item(self) -> StepValues:
        """The fields as Python numbers, read to the host with one synchronization (``scale`` and
        ``grad_norm`` are None where the tensors are)."""
        names = [n for n in ("loss", "scale", "skipped", "grad_norm") if getattr(self, n) is not None]
        tensors = [getattr(self, n).detach().reshape(()).to(self.loss.device, torch.float64) for n in names]
        read = dict(zip(names, torch.stack(tensors).tolist()))
        return StepValues(loss=read["loss"], scale=read.get("scale"), skipped=bool(read["skipped"]),
                          grad_norm=read.get("grad_norm"), stepped=self.stepped)


def _describe(value: Optional[torch.Tensor]) -> str:
    if not isinstance(value, torch.Tensor):
        return repr(value)
    return f"<tensor {str(value.dtype).replace('torch.', '')}{list(value.shape)} on {value.device}>"


class Trainer:
    """One call per micro-batch runs the AMP recipe of a hand-written loop::

        trainer = ampkit.Trainer(model, opt, device_type="cuda", max_grad_norm=1.0)
        for x, y in data:
            stats = trainer.step(lambda: loss_fn(model(x), y))

    ``step(closure)`` runs the closure (forward + loss) inside ``ampkit.autocast``, leaves the
    region, runs backward on ``loss / accumulation_steps`` times the scale, and on every
    ``accumulation_steps``-th call unscales, clips (``max_grad_norm``), steps (skipped for
    inf/NaN grads; without a host sync for optimizers with ``_step_supports_amp_scaling`` such
    as ``ampkit.optim``'s and torch's fused ones), updates the scale and zeroes the grads.
    With a model wrapped in torch's ``DistributedDataParallel`` or FSDP2's ``fully_shard``, the
    micro-batches before the last of a window do not reduce their grads (``no_sync`` /
    ``set_requires_gradient_sync(False)``); the scaler's skip decision is the same on every rank
    (for sharded grads ampkit.GradScaler all-reduces found_inf, as torch's does).

    Args:
        model: the module whose state ``state_dict`` saves (may be None).
        optimizer: any ``torch.optim.Optimizer`` (or anything with ``param_groups``, ``step``,
            ``zero_grad``, ``state_dict``, ``load_state_dict``).
        device_type: "cpu" or "cuda": the autocast device type; every parameter must be on it.
        dtype: torch.float16 or torch.bfloat16; None: torch's autocast dtype of the device type.
        scaler: an ``ampkit.GradScaler`` (or ``torch.amp.GradScaler``), None for no scaling, or
            left out: a default GradScaler under float16, none under bfloat16.
        accumulation_steps: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip the total 2-norm of the grads to this (> 0) before each step.
        set_to_none: passed to ``optimizer.zero_grad``.
        enabled: False runs the closure without autocast.
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        device_type: str,
        dtype: Optional[torch.dtype] = None,
        scaler: Any = _DEFAULT,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        set_to_none: bool = True,
        enabled: bool = True,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"Trainer: expected model to be a torch.nn.Module or None, got {type(model).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral) \
                or accumulation_steps < 1:
            raise ValueError(f"Trainer: expected accumulation_steps to be an int >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real)
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
        ):
            raise ValueError(f"Trainer: expected max_grad_norm to be finite and > 0 (or None), got {max_grad_norm!r}")
        self._autocast = autocast(device_type, dtype=dtype, enabled=enabled)  # validates device_type / dtype
        device = self._autocast.device
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            raise ValueError("Trainer: expected an optimizer with at least one parameter, got none")
        for i, p in enumerate(params):
            if p.device.type != device:
                raise ValueError(
                    f"Trainer: expected every parameter on {device} (device_type), got parameter {i} on {p.device}")
        if scaler is _DEFAULT:
            # bf16 has fp32's exponent range: nothing underflows, so nothing to scale.
            scaler = GradScaler(device) if (enabled and self._autocast.fast_dtype == torch.float16) else None
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"Trainer: expected scaler to be an ampkit.GradScaler or torch.amp.GradScaler (or None, "
                             f"or left out), got {scaler!r}")
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        if scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            # The scaler unscales such an optimizer's grads itself and refuses fp16 ones; refuse
            # here, before any step ran a backward.
            half = [i for i, p in enumerate(params) if p.dtype == torch.float16]
            if half:
                raise ValueError(
                    f"Trainer: expected float32 parameters with a GradScaler and an optimizer that does not handle "
                    f"the scale itself, got float16 parameters (indices {half[:5]}); keep fp32 master weights "
                    "(autocast casts them) or use a fused optimizer such as ampkit.optim's")
        self.model: Optional[torch.nn.Module] = model
        self.optimizer: torch.optim.Optimizer = optimizer
        self.scaler: Optional[torch.amp.GradScaler] = scaler
        self.accumulation_steps: int = int(accumulation_steps)
        self.max_grad_norm: Optional[float] = None if max_grad_norm is None else float(max_grad_norm)
        self.set_to_none: bool = set_to_none
        self.micro_steps: int = 0

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps run so far (skipped ones included)."""
        return self.micro_steps // self.accumulation_steps

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, closure: Callable[[], torch.Tensor]) -> StepStats:
        """One micro-batch; see the class docstring. Raises ValueError, before any backward, if the
        closure returns something other than a floating-point scalar tensor that requires grad.

        If the optimizer step of a window raises (``unscale_``, clipping or ``optimizer.step``), the
        window is dropped: the grads are zeroed, the scaler forgets the optimizer's stage and
        ``micro_steps`` goes back to the start of the window, so that the next call starts a clean
        window; parameters, optimizer state and scale are as the failed call found them, unless
        ``optimizer.step`` itself failed half-way through its parameters."""
        n = self.accumulation_steps
        with self._gradient_sync((self.micro_steps + 1) % n == 0):
            return self._micro_step(closure)

    def _gradient_sync(self, sync: bool) -> Any:
        """Under torch's DDP or FSDP2, the micro-batches before the last of a window only accumulate
        locally (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``): the grads are reduced
        once per optimizer step, with the same result."""
        model = self.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if sync else model.no_sync()
        set_sync = getattr(model, "set_requires_gradient_sync", None)  # an FSDPModule (fully_shard)
        if callable(set_sync):
            set_sync(sync)
        return contextlib.nullcontext()

    def _micro_step(self, closure: Callable[[], torch.Tensor]) -> StepStats:
        with self._autocast:
            loss = closure()
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"Trainer.step: expected the closure to return the loss tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                "Trainer.step: expected the closure to return a floating-point scalar loss, got "
                f"a {loss.dtype} tensor of shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("Trainer.step: expected the closure's loss to require grad, got a tensor that does not")
        n = self.accumulation_steps
        to_backward = loss / n if n > 1 else loss
        scale = None
        if self.scaler is not None:
            scaled = self.scaler.scale(to_backward)
            scale = self.scaler._scale.clone()  # update() changes the scale in place below
        else:
            scaled = to_backward
        scaled.backward()
        detached = loss.detach()
        if (self.micro_steps + 1) % n != 0:
            self.micro_steps += 1
            return StepStats(detached, scale, torch.zeros((), dtype=torch.bool, device=loss.device), None, False)
        try:
            skipped, grad_norm = self._optimizer_step(loss.device)
        except BaseException:
            self._drop_window()
            raise
        self.micro_steps += 1
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        return StepStats(detached, scale, skipped, grad_norm, True)

    def _optimizer_step(self, device):
        grad_norm = None
        if self.scaler is not None:
            if self.max_grad_norm is not None:
                params = self._params()
                if any(p.grad is not None and p.grad.dtype == torch.float16 for p in params):
                    # fp16 grads (fp16 parameters with master weights): clipped while scaled, unscaled
                    # by the optimizer's fused step, never in place in fp16 (what torch refuses).
                    grad_norm = _C._clip_grad_norm_(params, self.max_grad_norm, grad_scale=self.scaler._scale)
                else:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = _C._clip_grad_norm_(params, self.max_grad_norm)
            self.scaler.step(self.optimizer)
            skipped = self._last_step_skipped()
            self.scaler.update()
        else:
            if self.max_grad_norm is not None:
                grad_norm = _C._clip_grad_norm_(self._params(), self.max_grad_norm)
            self.optimizer.step()
            skipped = torch.zeros((), dtype=torch.bool, device=device)
        return skipped, grad_norm

    def _drop_window(self) -> None:
        # The optimizer step of this window failed after its backward: the grads hold this window's
        # micro-batches, scaled or already unscaled, and the scaler may have marked the optimizer
        # unscaled. Back to the start of the window, so that the next step starts clean.
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        if self.scaler is not None:
            self.scaler._per_optimizer_states.pop(id(self.optimizer), None)
        self.micro_steps -= self.micro_steps % self.accumulation_steps

    def _last_step_skipped(self) -> torch.Tensor:
        if hasattr(self.scaler, "last_step_skipped"):
            return self.scaler.last_step_skipped()
        # torch.amp.GradScaler: the found_inf it recorded, read before update() clears it.
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        found = [t.to(self.scaler._scale.device) for t in state["found_inf_per_device"].values()]
        return (sum(found) != 0) if found else torch.zeros((), dtype=torch.bool)

    def state_dict(self) -> Dict[str, Any]:
        """Model (if any), optimizer, scaler and counters. Raises RuntimeError in the middle of an
        accumulation: accumulated grads are not part of the state."""
        if self.micro_steps % self.accumulation_steps != 0:
            raise RuntimeError(
                f"Trainer.state_dict: called after micro-batch {self.micro_steps}, in the middle of an accumulation "
                f"of {self.accumulation_steps}; accumulated grads are not saved, so save after a step that stepped "
                "the optimizer")
        return {
            "model": None if self.model is None else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "micro_steps": self.micro_steps,
            "accumulation_steps": self.accumulation_steps,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads what ``state_dict`` returned; the resumed run continues bitwise as the
        uninterrupted one.

        Everything is checked before anything is loaded, and a load that fails anyway (an
        optimizer or scaler that refuses its part) is rolled back: a failed load leaves the model,
        the optimizer, the scaler and the counters as they were. Raises TypeError for a state that
        is not a dict and ValueError for one that does not fit this trainer (model / scaler present
        on one side only, other accumulation_steps, parameters of other names or shapes, other
        parameter groups, a bad scaler state or micro_steps)."""
        self._check_state_dict(state_dict)
        snapshot = self._snapshot()
        try:
            if self.model is not None:
                self.model.load_state_dict(state_dict["model"])
            self.optimizer.load_state_dict(state_dict["optimizer"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state_dict["scaler"])
        except BaseException:
            self._restore(snapshot)
            raise
        self.micro_steps = int(state_dict["micro_steps"])

    def _check_state_dict(self, state_dict: Any) -> None:
        who = "Trainer.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{who}: expected state_dict to be a dict, got {type(state_dict).__name__}")
        missing = {"model", "optimizer", "scaler", "micro_steps", "accumulation_steps"} - set(state_dict)
        if missing:
            raise ValueError(f"{who}: expected keys {sorted(missing)} in the state dict")
        if state_dict["accumulation_steps"] != self.accumulation_steps:
            raise ValueError(
                f"{who}: expected accumulation_steps {self.accumulation_steps}, got {state_dict['accumulation_steps']!r}")
        micro = state_dict["micro_steps"]
        if isinstance(micro, bool) or not isinstance(micro, numbers.Integral) or micro < 0 \
                or micro % self.accumulation_steps != 0:
            raise ValueError(f"{who}: expected micro_steps to be an int >= 0 and a multiple of accumulation_steps "
                             f"({self.accumulation_steps}), got {micro!r}")
        if (state_dict["model"] is None) != (self.model is None):
            raise ValueError(f"{who}: expected a model state exactly when the trainer has a model")
        if (state_dict["scaler"] is None) != (self.scaler is None):
            raise ValueError(f"{who}: expected a scaler state exactly when the trainer has a scaler")
        if self.model is not None:
            # torch's Module.load_state_dict copies the tensors that fit before it raises.
            model_sd, own = state_dict["model"], self.model.state_dict()
            if not isinstance(model_sd, Mapping):
                raise TypeError(f"{who}: expected the model state to be a dict, got {type(model_sd).__name__}")
            if set(model_sd) != set(own):
                raise ValueError(f"{who}: expected the model state to have this model's keys; missing "
                                 f"{sorted(set(own) - set(model_sd))}, unexpected {sorted(set(model_sd) - set(own))}")
            for key, value in own.items():
                saved = model_sd[key]
                if not isinstance(saved, torch.Tensor) or saved.shape != value.shape:
                    got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
                    raise ValueError(f"{who}: expected model entry '{key}' of shape {tuple(value.shape)}, got {got}")
        opt_sd = state_dict["optimizer"]
        if not isinstance(opt_sd, Mapping) or not isinstance(opt_sd.get("param_groups"), list):
            raise ValueError(f"{who}: expected the optimizer state to be a dict with 'param_groups', got "
                             f"{type(opt_sd).__name__}")
        groups = self.optimizer.param_groups
        saved_sizes = [len(g.get("params", ())) for g in opt_sd["param_groups"]]
        if saved_sizes != [len(g["params"]) for g in groups]:
            raise ValueError(f"{who}: expected optimizer parameter groups of sizes "
                             f"{[len(g['params']) for g in groups]}, got {saved_sizes}")
        if self.scaler is not None and hasattr(self.scaler, "_check_state_dict"):
            self.scaler._check_state_dict(state_dict["scaler"])

    def _snapshot(self) -> Dict[str, Any]:
        return {
            "model": None if self.model is None else {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def _restore(self, snapshot: Dict[str, Any]) -> None:
        # Each part on its own: a part that fails to restore must not keep the others from it.
        parts = [(self.optimizer, snapshot["optimizer"])]
        if self.model is not None:
            parts.append((self.model, snapshot["model"]))
        if self.scaler is not None and snapshot["scaler"]:
            parts.append((self.scaler, snapshot["scaler"]))
        for owner, state in parts:
            try:
                owner.load_state_dict(state)
            except Exception:  # the original error is what the caller needs to see
                pass
