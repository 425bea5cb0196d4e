"""ampkit.GradScaler: torch.amp.GradScaler's API and numbers, on ampkit's C++ core.

The per-optimizer state machine lives here, keyed by ``id(optimizer)`` as in torch, because
``torch.optim`` optimizers are Python objects; the numerics (grouped unscaling, the scale update
with bounds and hysteresis, option and state-dict validation) are the C++ functions that
``ampkit::GradScaler`` uses, reached through ``ampkit._C``.
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch.amp.grad_scaler import OptState  # the same enum, so code that checks stages keeps working

from . import _C

__all__ = ["GradScaler", "OptState"]

# Smallest positive normal float32: the default lower bound of the scale.
_FLT_MIN = 1.1754943508222875e-38


class _MultiDeviceReplicator:
    """Serves copies of a tensor to the devices asking for them, one copy per device."""

    def __init__(self, master: torch.Tensor) -> None:
        self.master = master
        self._per_device: Dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        t = self._per_device.get(device)
        if t is None:
            t = self._per_device[device] = self.master.to(device=device, non_blocking=True, copy=True)
        return t


def _refresh_per_optimizer_state() -> Dict[str, Any]:
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"GradScaler: expected {name} to be a float, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"GradScaler: expected {name} to be an int, got {value!r}")
    return int(value)


class GradScaler:
    """Dynamic loss scaling, a drop-in for ``torch.amp.GradScaler``.

    Same constructor, methods, state dict and numbers as torch's (the scale after every
    ``update()`` and the unscaled gradients are bitwise equal), for every ``torch.optim``
    optimizer, fused ones included. In addition:

    * ``min_scale`` / ``max_scale`` bound the scale. By default it can still never reach 0:
      backoff stops at the smallest positive normal float (torch lets it go denormal, then 0),
      and a growth that would overflow to inf is not applied (as in torch).
    * ``hysteresis=n`` backs off only after ``n`` consecutive overflowing steps (DeepSpeed's
      consecutive hysteresis); 1 is torch's behaviour. Overflowing steps are skipped either way.
    * ``last_step_skipped()`` (a device bool tensor, no sync), ``steps_applied()`` and
      ``steps_skipped()``.

    Args:
        device: device type of the scale, "cuda" (default) or "cpu". An enabled "cuda" scaler
            without CUDA disables itself with a warning, as torch's does.
        init_scale: initial scale (finite, > 0, within [min_scale, max_scale]).
        growth_factor: factor (> 1) applied after ``growth_interval`` clean steps in a row.
        backoff_factor: factor in (0, 1) applied when a step found inf/NaN.
        growth_interval: clean steps in a row before the scale grows (> 0).
        enabled: False makes ``scale`` return its input, ``step`` call ``optimizer.step()`` and
            the rest no-ops.
        min_scale: lower bound of the scale, > 0 (None: the smallest positive normal float).
        max_scale: upper bound, >= min_scale (None: no bound other than staying finite).
        hysteresis: consecutive overflowing steps before a backoff (>= 1).

    Bad arguments raise ValueError naming the argument; calls in the wrong order raise
    RuntimeError. A call that raises leaves the scaler as it was.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        min_scale: Optional[float] = None,
        max_scale: Optional[float] = None,
        hysteresis: int = 1,
    ) -> None:
        try:
            # "cuda:1" or torch.device("cuda") mean the device type, which is all a scaler keeps.
            device = torch.device(device).type
        except (TypeError, RuntimeError) as e:
            raise ValueError(
                f"GradScaler: expected device to be a device type string such as 'cuda' or 'cpu', got {device!r}"
            ) from e
        if not isinstance(enabled, bool):
            raise ValueError(f"GradScaler: expected enabled to be a bool, got {enabled!r}")
        init_scale = _check_float("init_scale", init_scale)
        growth_factor = _check_float("growth_factor", growth_factor)
        backoff_factor = _check_float("backoff_factor", backoff_factor)
        growth_interval = _check_int("growth_interval", growth_interval)
        min_scale = _FLT_MIN if min_scale is None else _check_float("min_scale", min_scale)
        max_scale = math.inf if max_scale is None else _check_float("max_scale", max_scale)
        hysteresis = _check_int("hysteresis", hysteresis)
        # Validated even when disabled: a bad option is a bug whether or not scaling is on.
        _C._check_grad_scaler_options(
            init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, hysteresis
        )

        self._device = device
        self._enabled = enabled
        if device == "cuda" and enabled and not torch.cuda.is_available():
            warnings.warn("ampkit.GradScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False

        self._init_scale = init_scale
        self._scale: Optional[torch.Tensor] = None  # created by the first scale(), on its device
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._growth_tracker: Optional[torch.Tensor] = None
        self._min_scale = min_scale
        self._max_scale = max_scale
        self._hysteresis = hysteresis
        self._init_overflow_streak = 0
        self._overflow_streak: Optional[torch.Tensor] = None
        self._per_optimizer_states: Dict[int, Dict[str, Any]] = defaultdict(_refresh_per_optimizer_state)
        self._steps = 0
        self._host_skipped = 0  # skips seen on the host (the synchronizing path)
        self._device_skipped: Optional[torch.Tensor] = None  # skips of sync-free steps, on the device
        self._last_step_skipped: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------------------- internals
    def _check_scale_growth_tracker(self, funcname: str):
        if self._scale is None or self._growth_tracker is None:
            raise RuntimeError(
                f"Attempted {funcname} but _scale is None.  This may indicate your script did not use "
                "scaler.scale(loss or outputs) earlier in the iteration."
            )
        return self._scale, self._growth_tracker

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=dev)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=dev)
        self._overflow_streak = torch.full((), self._init_overflow_streak, dtype=torch.int32, device=dev)

    def _stage(self, optimizer: torch.optim.Optimizer) -> OptState:
        state = self._per_optimizer_states.get(id(optimizer))
        return OptState.READY if state is None else state["stage"]

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
        allow_fp16: bool = False,
    ) -> Dict[torch.device, torch.Tensor]:
        # found_inf is accepted for torch's signature; the core creates one per device itself.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {t.device: t for t in _C._unscale_grads_(params, inv_scale, allow_fp16)}

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> Dict[torch.device, torch.Tensor]:
        """Records found_inf per device without unscaling (inv_scale 1), for fused optimizers."""
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        dummy_inv_scale = torch.full((), 1.0, dtype=torch.float32, device=scale.device)
        found = self._unscale_grads_(optimizer, dummy_inv_scale, allow_fp16=True)
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = found
        return found

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> Dict[torch.device, torch.Tensor]:
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    def _get_scale_async(self) -> Optional[torch.Tensor]:
        return self._scale

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())

    def _get_overflow_streak(self) -> int:
        if not self._enabled:
            return 0
        return self._init_overflow_streak if self._overflow_streak is None else int(self._overflow_streak.item())

    def _record_step(self, found_inf: Any, skipped: Optional[bool]) -> None:
        self._steps += 1
        if skipped is not None:
            self._host_skipped += int(skipped)
            self._last_step_skipped = found_inf.ne(0) if isinstance(found_inf, torch.Tensor) else None
            return
        if not isinstance(found_inf, torch.Tensor):  # no grads at all: nothing could be skipped
            self._last_step_skipped = torch.zeros((), dtype=torch.bool, device=self._scale.device)
            return
        self._last_step_skipped = found_inf.ne(0)
        count = self._last_step_skipped.to(torch.int64)
        self._device_skipped = count if self._device_skipped is None else self._device_skipped + count

    # -------------------------------------------------------------------------------- API
    def scale(self, outputs: Union[torch.Tensor, Iterable[torch.Tensor]]):
        """Multiplies a tensor, or the tensors of a (nested) list/tuple/iterable, by the scale.

        Returns the scaled outputs (the outputs themselves when disabled). The first call creates
        the scale on the device of the first tensor.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)

        stash: List[_MultiDeviceReplicator] = []

        def apply_scale(val):
            if isinstance(val, torch.Tensor):
                if not stash:
                    if self._scale is None:
                        self._lazy_init_scale_growth_tracker(val.device)
                    stash.append(_MultiDeviceReplicator(self._scale))
                return val * stash[0].get(val.device)
            if isinstance(val, Iterable):
                iterable = map(apply_scale, val)
                if isinstance(val, (list, tuple)):
                    return type(val)(iterable)
                return iterable
            raise ValueError(f"GradScaler.scale: expected outputs to be a Tensor or an iterable of Tensors, got {val!r}")

        return apply_scale(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides ``optimizer``'s gradients by the scale in place and records inf/NaN per device.

        Optional (``step`` does it otherwise); use it to clip or inspect unscaled gradients.
        Call it at most once per optimizer between two ``update()`` calls, and before ``step``.
        Does not synchronize. Raises ValueError on fp16 gradients.
        """
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        stage = self._stage(optimizer)
        if stage is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        found = self._unscale_grads_(optimizer, _C._reciprocal_scale(self._scale), allow_fp16=False)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = found
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscales (unless ``unscale_`` did) and runs ``optimizer.step(*args, **kwargs)`` unless a
        gradient held inf/NaN. Returns what ``optimizer.step`` returned (None when skipped).

        Synchronizes once, as torch does. Optimizers with ``_step_supports_amp_scaling`` (fused
        Adam/AdamW/SGD) get ``grad_scale`` and ``found_inf`` attributes instead and skip on the
        device, without synchronizing. ``last_step_skipped()`` tells what happened either way.
        """
        if not self._enabled:
            retval = optimizer.step(*args, **kwargs)
            self._steps += 1
            return retval
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        stage = self._stage(optimizer)
        if stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._step_scale_aware(optimizer, stage, args, kwargs)

        if stage is OptState.READY:
            found = self._unscale_grads_(optimizer, _C._reciprocal_scale(self._scale), allow_fp16=False)
        else:
            found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found:
            raise RuntimeError(
                "step(): no inf checks were recorded for this optimizer: none of its parameters has a gradient. "
                "Call backward() on the scaled loss before step()."
            )
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = found
        state["stage"] = OptState.UNSCALED
        found_inf = self._combine(found.values())
        skipped = bool(found_inf.item())  # the one host sync of a step
        retval = None if skipped else optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        self._record_step(found_inf, skipped)
        return retval

    def _combine(self, found_infs: Iterable[torch.Tensor]) -> torch.Tensor:
        found_infs = [t.to(self._scale.device, non_blocking=True) for t in found_infs]
        combined = found_infs[0]
        for t in found_infs[1:]:
            combined = combined + t
        return combined

    def _step_scale_aware(self, optimizer, stage, args, kwargs):
        # torch's _step_supports_amp_scaling contract, followed to the letter so that fused
        # optimizers see the same grad_scale / found_inf as under torch.amp.GradScaler.
        has_grad_scaler_kwarg = "grad_scaler" in inspect.signature(optimizer.step).parameters
        if has_grad_scaler_kwarg:
            warnings.warn(
                "GradScaler is going to stop passing itself as a keyword argument to the passed optimizer. In the "
                "near future GradScaler registers `grad_scale: Tensor` and `found_inf: Tensor` to the passed "
                "optimizer and let the optimizer use them directly.",
                FutureWarning,
                stacklevel=3,
            )
            kwargs.update({"grad_scaler": self})
            retval = optimizer.step(*args, **kwargs)
            self._per_optimizer_states[id(optimizer)]["stage"] = OptState.STEPPED
            found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
            self._record_step(self._combine(found.values()) if found else 0, None)
            return retval

        if stage is OptState.READY:
            found = self._check_inf_per_device(optimizer)
        else:
            found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        found_inf = self._combine(found.values()) if found else 0  # torch passes sum([]) == 0
        optimizer.grad_scale = (
            getattr(optimizer, "grad_scale", None)
            if stage is OptState.UNSCALED
            else self._scale * getattr(optimizer, "grad_scale", 1)
        )
        optimizer.found_inf = found_inf
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:  # torch leaves them behind on a throw, and multiplies a stale grad_scale next time
            del optimizer.grad_scale
            del optimizer.found_inf
        self._per_optimizer_states[id(optimizer)]["stage"] = OptState.STEPPED
        self._record_step(found_inf, None)
        return retval

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """Updates the scale on its device, without synchronizing.

        Backs off (``backoff_factor``) if an optimizer stepped since the last update found
        inf/NaN (after ``hysteresis`` such updates in a row), grows (``growth_factor``) after
        ``growth_interval`` clean updates in a row, and keeps the scale within
        [min_scale, max_scale]. ``new_scale`` (a float, or a 1-element tensor on the scaler's
        device type without grad, copied and clamped to the bounds) sets the scale instead.
        Call it once per iteration, after ``step`` for every optimizer.
        """
        if not self._enabled:
            return
        scale, growth_tracker = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, numbers.Real) and not isinstance(new_scale, bool):
                value = float(new_scale)
                if not (math.isfinite(value) and self._min_scale <= value <= self._max_scale):
                    raise ValueError(
                        "GradScaler.update: expected new_scale to be finite and in [min_scale, max_scale] = "
                        f"[{self._min_scale}, {self._max_scale}], got {value}"
                    )
                scale.fill_(value)
            else:
                if not (
                    isinstance(new_scale, torch.Tensor)
                    and new_scale.device.type == self._device
                    and new_scale.numel() == 1
                    and not new_scale.requires_grad
                    and new_scale.is_floating_point()
                ):
                    raise ValueError(
                        f"GradScaler.update: expected new_scale to be a float or a 1-element floating tensor on "
                        f"'{self._device}' with requires_grad=False, got {new_scale!r}"
                    )
                scale.copy_(new_scale.reshape(()))
                scale.clamp_(self._min_scale, self._max_scale)  # on the device: reading it would sync
        else:
            found_infs = [
                t for state in self._per_optimizer_states.values() for t in state["found_inf_per_device"].values()
            ]
            if not found_infs:
                raise RuntimeError(
                    "No inf checks were recorded prior to update(). Call step(optimizer) (or unscale_(optimizer)) "
                    "for at least one optimizer first."
                )
            _C._update_scale_(
                scale, growth_tracker, self._overflow_streak, found_infs,
                self._growth_factor, self._backoff_factor, self._growth_interval,
                self._min_scale, self._max_scale, self._hysteresis,
            )
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def get_scale(self) -> float:
        """The current scale (synchronizes); init_scale before the first ``scale``; 1.0 when disabled."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def last_step_skipped(self) -> Optional[torch.Tensor]:
        """0-dim bool tensor on the scale's device: whether the last ``step`` skipped its optimizer's
        update; None before the first step. Does not synchronize (pytorch#152279)."""
        return self._last_step_skipped

    def steps_skipped(self) -> int:
        """Number of ``step`` calls that skipped the update. Syncs only if sync-free steps are pending."""
        pending = 0 if self._device_skipped is None else int(self._device_skipped.item())
        return self._host_skipped + pending

    def steps_applied(self) -> int:
        """Number of ``step`` calls that ran the update. Same sync rule as ``steps_skipped``."""
        return self._steps - self.steps_skipped()

    def is_enabled(self) -> bool:
        """Whether this scaler scales."""
        return self._enabled

    def _set_option(self, name: str, value: Any) -> None:
        # The init scale is only checked at construction: the bounds may move past it later.
        opts = dict(
            init_scale=self._init_scale, growth_factor=self._growth_factor, backoff_factor=self._backoff_factor,
            growth_interval=self._growth_interval, min_scale=self._min_scale, max_scale=self._max_scale,
            hysteresis=self._hysteresis,
        )
        opts[name] = value
        _C._check_grad_scaler_options(**opts, check_init_scale=False)
        setattr(self, "_" + name, value)

    def get_growth_factor(self) -> float:
        """The growth factor."""
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        """Sets the growth factor (> 1), used from the next ``update``."""
        self._set_option("growth_factor", _check_float("growth_factor", new_factor))

    def get_backoff_factor(self) -> float:
        """The backoff factor."""
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Sets the backoff factor (in (0, 1)), used from the next ``update``."""
        self._set_option("backoff_factor", _check_float("backoff_factor", new_factor))

    def get_growth_interval(self) -> int:
        """The growth interval."""
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        """Sets the growth interval (> 0), used from the next ``update``."""
        self._set_option("growth_interval", _check_int("growth_interval", new_interval))

    def get_min_scale(self) -> float:
        """The lower bound of the scale."""
        return self._min_scale

    def set_min_scale(self, new_min: float) -> None:
        """Sets the lower bound (> 0, <= max_scale), applied from the next ``update``."""
        self._set_option("min_scale", _check_float("min_scale", new_min))

    def get_max_scale(self) -> float:
        """The upper bound of the scale (inf: none but finiteness)."""
        return self._max_scale

    def set_max_scale(self, new_max: float) -> None:
        """Sets the upper bound (>= min_scale), applied from the next ``update``."""
        self._set_option("max_scale", _check_float("max_scale", new_max))

    def get_hysteresis(self) -> int:
        """Consecutive overflowing steps before a backoff."""
        return self._hysteresis

    def set_hysteresis(self, new_hysteresis: int) -> None:
        """Sets the hysteresis (>= 1) and restarts the count of consecutive overflows."""
        self._set_option("hysteresis", _check_int("hysteresis", new_hysteresis))
        self._init_overflow_streak = 0
        if self._overflow_streak is not None:
            self._overflow_streak.zero_()

    def state_dict(self) -> Dict[str, Any]:
        """torch's five entries ("scale", "growth_factor", "backoff_factor", "growth_interval",
        "_growth_tracker") plus ampkit's "min_scale", "max_scale", "hysteresis" and
        "_overflow_streak", which torch.amp.GradScaler ignores when it loads the dict.
        Empty when disabled. Synchronizes; take it after ``update``."""
        if not self._enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._get_growth_tracker(),
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
            "hysteresis": self._hysteresis,
            "_overflow_streak": self._get_overflow_streak(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state dict of ampkit's or of torch.amp.GradScaler (no-op when disabled).

        Raises RuntimeError on an empty dict (saved from a disabled scaler) and ValueError on
        missing keys, wrong types or out-of-range values, before changing anything.
        """
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled instance of "
                "GradScaler."
            )
        _C._check_grad_scaler_state(
            state_dict, self._growth_factor, self._backoff_factor, self._growth_interval,
            self._min_scale, self._max_scale, self._hysteresis,
        )
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._max_scale = float(state_dict.get("max_scale", self._max_scale))
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._init_overflow_streak = int(state_dict.get("_overflow_streak", 0))
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
            self._overflow_streak.fill_(self._init_overflow_streak)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise RuntimeError(
                    "A GradScaler instance may only be pickled at the beginning of an iteration, or at the end "
                    "after scaler.update()."
                )
            # The unpickled scaler recreates its tensors lazily, on the device of its first scale().
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self._get_growth_tracker()
            state["_init_overflow_streak"] = self._get_overflow_streak()
            state["_scale"] = None
            state["_growth_tracker"] = None
            state["_overflow_streak"] = None
        state["_host_skipped"] = self.steps_skipped()
        state["_device_skipped"] = None
        if self._last_step_skipped is not None:
            state["_last_step_skipped"] = self._last_step_skipped.cpu()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
