"""ampkit.GradScaler: torch.amp.GradScaler itself, with bounds, hysteresis and skip reporting.

ampkit.GradScaler subclasses ``torch.amp.GradScaler``: the per-optimizer state machine
(scale / unscale_ / step / update stages, the ``_step_supports_amp_scaling`` contract, the error
messages) is torch's own code, not a copy. ampkit overrides only the numerical hooks, which run in
ampkit's C++ core (the code ``ampkit::GradScaler`` uses): grouped unscaling, the scale update with
bounds and hysteresis, option and state-dict validation; and it records what each step did.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state  # torch's, not copies

from . import _C

__all__ = ["GradScaler", "OptState"]

# The default lower bound of the scale: FLT_MIN, the smallest positive normal float32, which is
# C++'s ampkit::kDefaultMinScale; read from torch rather than written out a second time.
_FLT_MIN = torch.finfo(torch.float32).tiny
_MAX_INT32 = 2**31 - 1


def _is_process_group(group: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(group, dist.ProcessGroup)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # Without importing torch.distributed for every unscale: a DTensor exists only once it is.
    module = type(tensor).__module__
    return module.startswith("torch.distributed") and type(tensor).__name__ == "DTensor"


def _note_sharded_dims(grad: Any, groups: list) -> None:
    """Adds to groups the process group of each mesh dimension on which grad is not replicated."""
    from torch.distributed.tensor import Replicate

    mesh = grad.device_mesh
    for dim, placement in enumerate(grad.placements):
        if not isinstance(placement, Replicate):
            group = mesh.get_group(dim)
            if group not in groups:
                groups.append(group)


class _ArgumentError(ValueError, AssertionError):
    """A bad argument where torch.amp.GradScaler raises AssertionError: ampkit raises ValueError,
    and code written against torch that catches AssertionError keeps working."""


def _check_options(**options: Any) -> None:
    try:
        _C._check_grad_scaler_options(**options)
    except ValueError as e:
        raise _ArgumentError(str(e)) from None


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"GradScaler: expected {name} to be a float, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"GradScaler: expected {name} to be an int, got {value!r}")
    if not 1 <= value <= _MAX_INT32:  # before C++ sees it: pybind would refuse it with no name
        raise _ArgumentError(f"GradScaler: expected {name} in [1, 2**31 - 1], got {value!r}")
    return int(value)


def _state_number(state_dict: Mapping, key: str, kind: type, required: bool = True) -> Any:
    """``state_dict[key]`` as ``kind`` (float: an int or a float; int: an int, not a bool, in 64
    bits); None for an absent key that is not required. Raises ValueError naming the key."""
    if key not in state_dict:
        if required:
            raise ValueError(f"GradScaler.load_state_dict: expected key '{key}' in the state dict, got keys "
                             f"{list(state_dict.keys())}")
        return None
    value = state_dict[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if not (is_int or isinstance(value, float)):
            raise ValueError(f"GradScaler.load_state_dict: expected '{key}' to be a float, got {value!r}")
        return float(value)
    if not is_int:
        raise ValueError(f"GradScaler.load_state_dict: expected '{key}' to be an int, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"GradScaler.load_state_dict: expected '{key}' to fit in 64 bits, got {value!r}")
    return value


class GradScaler(torch.amp.GradScaler):
    """Dynamic loss scaling: ``torch.amp.GradScaler`` (a subclass of it), with extras.

    Same constructor, methods, state dict and numbers as torch's (the scale after every
    ``update()`` and the unscaled gradients are bitwise equal), for every ``torch.optim``
    optimizer, fused ones included; ``isinstance(scaler, torch.amp.GradScaler)`` holds. In addition:

    * ``min_scale`` / ``max_scale`` bound the scale. By default it can still never reach 0:
      backoff stops at the smallest positive normal float (torch lets it go denormal, then 0),
      and a growth that would overflow to inf is not applied (as in torch).
    * ``hysteresis=n`` backs off only after ``n`` consecutive overflowing steps (DeepSpeed's
      consecutive hysteresis); 1 is torch's behaviour. Overflowing steps are skipped either way.
    * ``step()`` tells what it did: ``last_step_skipped()`` (a device bool tensor, no sync),
      ``steps_applied()`` and ``steps_skipped()``.
    * Options are validated (ValueError naming the option) also when the scaler is disabled, and
      a load or a step that raises leaves the scaler as it was.
    * Sharded and data-parallel training: with DTensor grads (FSDP2's ``fully_shard``) each rank
      checks its shards and found_inf is all-reduced (MAX) over the mesh before the skip decision,
      as torch's scaler does for DTensors; ``process_group=`` does the same over a group for plain
      grads that differ per rank (torch's ``ShardedGradScaler``). Every rank then skips the same
      steps and keeps the same scale. No host sync is added: the sync-free path stays sync-free.

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
        process_group: a ``torch.distributed.ProcessGroup`` over which found_inf is all-reduced
            (None: only DTensor grads' meshes).

    Bad arguments raise ValueError naming the argument; calls in the wrong order raise torch's
    errors (RuntimeError, or AssertionError where torch raises that).
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
        process_group: Any = None,
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
        if process_group is not None and not _is_process_group(process_group):
            raise ValueError(f"GradScaler: expected process_group to be a torch.distributed.ProcessGroup or None, "
                             f"got {process_group!r}")
        # Validated even when disabled: a bad option is a bug whether or not scaling is on.
        _check_options(
            init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
            growth_interval=growth_interval, min_scale=min_scale, max_scale=max_scale, hysteresis=hysteresis,
        )
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        # torch keeps its options only when enabled; ampkit keeps them always.
        self._init_scale = init_scale
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._min_scale = min_scale
        self._max_scale = max_scale
        self._hysteresis = hysteresis
        self._process_group = process_group
        self._init_overflow_streak = 0
        self._overflow_streak: Optional[torch.Tensor] = None
        self._steps = 0
        self._host_skipped = 0  # skips seen on the host (the synchronizing path)
        self._device_skipped: Optional[torch.Tensor] = None  # skips of sync-free steps, on the device
        self._last_step_skipped: Optional[torch.Tensor] = None

    # ------------------------------------------------------------- torch's hooks, ampkit's numerics
    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        super()._lazy_init_scale_growth_tracker(dev)
        self._overflow_streak = torch.full((), self._init_overflow_streak, dtype=torch.int32, device=dev)

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> Dict[torch.device, torch.Tensor]:
        # torch's split by device and dtype, in C++ (faster for many small grads). found_inf is
        # torch's template for the per-device flags, copied to each device as torch does.
        grads, found_infs, groups = [], {}, []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grad = param.grad
                    if grad is None:
                        continue
                    # An uncoalesced sparse grad may hold several values for one index that only
                    # overflow once summed (fp16 sums easily do): coalesce, replacing the grad, as
                    # torch does. Without allow_fp16 the operator refuses fp16 grads instead.
                    if allow_fp16 and grad.is_sparse and grad.dtype == torch.float16:
                        param.grad = grad = grad.coalesce()
                    if _is_dtensor(grad):
                        # A shard (FSDP2): checked locally, then found_inf is reduced over the
                        # mesh, as torch's DTensor rule for the unscale op does.
                        _note_sharded_dims(grad, groups)
                        grad = grad.to_local()
                    grads.append(grad)
                    device = grad.device
                    if device not in found_infs:
                        found_infs[device] = found_inf.to(device, copy=True)
            torch.ops.ampkit.unscale_grads_(grads, list(found_infs.values()), inv_scale, allow_fp16)
        if self._process_group is not None and self._process_group not in groups:
            groups.append(self._process_group)
        if groups:
            self._all_reduce_found_infs(found_infs, groups)
        return found_infs

    def _all_reduce_found_infs(self, found_infs: Dict[torch.device, torch.Tensor], groups: list) -> None:
        # MAX over each group in turn (a mesh dimension after another gives the max over the
        # mesh); the all-reduces of one group are all started before any is waited for, as in
        # torch's ShardedGradScaler, and a CPU flag is reduced through the scaler's device when
        # that is another (NCCL reduces only device tensors).
        import torch.distributed as dist

        for group in groups:
            works, copies = [], []
            for found_inf in found_infs.values():
                target = found_inf
                if self._device != "cpu" and found_inf.device.type == "cpu":
                    target = found_inf.to(self._device)
                    copies.append((found_inf, target))
                works.append(dist.all_reduce(target, op=dist.ReduceOp.MAX, group=group, async_op=True))
            for work in works:
                work.wait()
            for found_inf, target in copies:
                found_inf.copy_(target)

    def _maybe_opt_step(self, optimizer, optimizer_state, *args: Any, **kwargs: Any):
        # torch's synchronizing path: one host read of the combined flag, as torch does.
        found_inf = self._combine(optimizer_state["found_inf_per_device"].values())
        skipped = bool(found_inf.item())
        retval = None if skipped else optimizer.step(*args, **kwargs)
        self._record_step(found_inf, skipped)
        return retval

    # ----------------------------------------------------------------------------- internals
    def _get_overflow_streak(self) -> int:
        if not self._enabled:
            return 0
        return self._init_overflow_streak if self._overflow_streak is None else int(self._overflow_streak.item())

    def _combine(self, found_infs: Iterable[torch.Tensor]) -> torch.Tensor:
        found_infs = [t.to(self._scale.device, non_blocking=True) for t in found_infs]
        combined = found_infs[0]
        for t in found_infs[1:]:
            combined = combined + t
        return combined

    def _record_step(self, found_inf: Optional[torch.Tensor], skipped: Optional[bool]) -> None:
        self._steps += 1
        if found_inf is None:  # no grads at all: nothing could be skipped
            self._last_step_skipped = torch.zeros((), dtype=torch.bool, device=self._scale.device)
            return
        self._last_step_skipped = found_inf.ne(0)
        if skipped is not None:
            self._host_skipped += int(skipped)
            return
        count = self._last_step_skipped.to(torch.int64)
        self._device_skipped = count if self._device_skipped is None else self._device_skipped + count

    # -------------------------------------------------------------------------------- API
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """torch's ``step``: unscales (unless ``unscale_`` did) and runs
        ``optimizer.step(*args, **kwargs)`` unless a gradient held inf/NaN; returns what it returned.

        Synchronizes once, as torch does. Optimizers with ``_step_supports_amp_scaling`` (fused
        Adam/AdamW/SGD, ``ampkit.optim``) get ``grad_scale`` and ``found_inf`` attributes instead and
        skip on the device, without synchronizing. ``last_step_skipped()`` tells what happened either
        way. If ``optimizer.step`` raises, the attributes are taken off again (torch leaves them, and
        the next step would multiply the stale ``grad_scale`` in).
        """
        if not self._enabled:
            retval = super().step(optimizer, *args, **kwargs)
            self._steps += 1
            return retval
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            had_state = id(optimizer) in self._per_optimizer_states
            try:
                return super().step(optimizer, *args, **kwargs)  # _maybe_opt_step records the step
            except BaseException:
                # No parameter had a grad: torch raises after marking the optimizer unscaled. Nothing
                # was unscaled, so the optimizer goes back to where it was. (When optimizer.step
                # itself raises, the grads are unscaled already and it stays unscaled, as in torch.)
                state = self._per_optimizer_states.get(id(optimizer))
                if state is not None and not state["found_inf_per_device"] and not had_state:
                    del self._per_optimizer_states[id(optimizer)]
                raise
        saved = {k: optimizer.__dict__[k] for k in ("grad_scale", "found_inf") if k in optimizer.__dict__}
        try:
            retval = super().step(optimizer, *args, **kwargs)
        except BaseException:
            for k in ("grad_scale", "found_inf"):
                if k in saved:
                    optimizer.__dict__[k] = saved[k]
                else:
                    optimizer.__dict__.pop(k, None)
            raise
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        self._record_step(self._combine(found.values()) if found else None, None)
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
            self._set_scale(scale, new_scale)
        else:
            self._update_scale(scale, growth_tracker)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def _set_scale(self, scale: torch.Tensor, new_scale: Union[float, torch.Tensor]) -> None:
        """update(new_scale): the scale becomes new_scale, checked against the bounds."""
        if isinstance(new_scale, numbers.Real) and not isinstance(new_scale, bool):
            value = float(new_scale)
            self._check_new_scale(value)
            scale.fill_(value)
            return
        if not (
            isinstance(new_scale, torch.Tensor)
            and new_scale.device.type == self._device
            and new_scale.numel() == 1
            and not new_scale.requires_grad
            and new_scale.is_floating_point()
        ):
            raise _ArgumentError(
                f"GradScaler.update: expected new_scale to be a float or a 1-element floating tensor on "
                f"'{self._device}' with requires_grad=False, got {new_scale!r}"
            )
        # One host read to check it: torch copies a NaN, inf or negative scale unchecked, and every
        # later step is then skipped.
        self._check_new_scale(float(new_scale.item()))
        scale.copy_(new_scale.reshape(()))

    def _update_scale(self, scale: torch.Tensor, growth_tracker: torch.Tensor) -> None:
        """update(): back off, hold (hysteresis) or grow from the steps' found_inf flags, on the device."""
        states = self._per_optimizer_states.values()
        found_infs = [t for state in states for t in state["found_inf_per_device"].values()]
        if not found_infs:  # AssertionError, as torch
            raise AssertionError(
                "No inf checks were recorded prior to update(). Call step(optimizer) (or unscale_(optimizer)) "
                "for at least one optimizer first."
            )
        torch.ops.ampkit.update_scale_(
            scale, growth_tracker, self._overflow_streak, found_infs,
            growth_factor=self._growth_factor, backoff_factor=self._backoff_factor,
            growth_interval=self._growth_interval, min_scale=self._min_scale, max_scale=self._max_scale,
            hysteresis=self._hysteresis,
        )

    def _check_new_scale(self, value: float) -> None:
        try:
            _C._check_new_scale(value, self._min_scale, self._max_scale)
        except ValueError as e:
            raise _ArgumentError(str(e)) from None

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

    def _set_option(self, name: str, value: Any) -> None:
        # The init scale is only checked at construction: the bounds may move past it later.
        opts = dict(
            init_scale=self._init_scale, growth_factor=self._growth_factor, backoff_factor=self._backoff_factor,
            growth_interval=self._growth_interval, min_scale=self._min_scale, max_scale=self._max_scale,
            hysteresis=self._hysteresis,
        )
        opts[name] = value
        _check_options(**opts, check_init_scale=False)
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
        state = super().state_dict()
        if state:
            state.update(
                min_scale=self._min_scale, max_scale=self._max_scale, hysteresis=self._hysteresis,
                _overflow_streak=self._get_overflow_streak(),
            )
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state dict of ampkit's or of torch.amp.GradScaler (no-op when disabled).

        Raises RuntimeError on an empty dict (saved from a disabled scaler) and ValueError on
        missing keys, wrong types or out-of-range values, before changing anything.
        """
        if not self._enabled:
            return
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._max_scale = float(state_dict.get("max_scale", self._max_scale))
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._init_overflow_streak = int(state_dict.get("_overflow_streak", 0))
        if self._overflow_streak is not None:
            self._overflow_streak.fill_(self._init_overflow_streak)

    def _check_state_dict(self, state_dict: Any) -> None:
        """Raises, naming the key, unless ``state_dict`` can be loaded; changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"GradScaler.load_state_dict: expected state_dict to be a dict, got "
                            f"{type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled instance of "
                "GradScaler."
            )
        _C._check_grad_scaler_state(
            _state_number(state_dict, "scale", float), _state_number(state_dict, "growth_factor", float),
            _state_number(state_dict, "backoff_factor", float), _state_number(state_dict, "growth_interval", int),
            _state_number(state_dict, "_growth_tracker", int),
            # ampkit's own keys; absent from torch.amp.GradScaler's state dicts
            _state_number(state_dict, "min_scale", float, required=False),
            _state_number(state_dict, "max_scale", float, required=False),
            _state_number(state_dict, "hysteresis", int, required=False),
            _state_number(state_dict, "_overflow_streak", int, required=False),
            current_growth_factor=self._growth_factor, current_backoff_factor=self._backoff_factor,
            current_growth_interval=self._growth_interval, current_min_scale=self._min_scale,
            current_max_scale=self._max_scale, current_hysteresis=self._hysteresis,
        )

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()  # torch's checks; its tensors become lazy init values
        if self._enabled:
            state["_init_overflow_streak"] = self._get_overflow_streak()
            state["_overflow_streak"] = None
        state["_process_group"] = None  # a live connection; the unpickled scaler decides locally
        state["_host_skipped"] = self.steps_skipped()
        state["_device_skipped"] = None
        if self._last_step_skipped is not None:
            state["_last_step_skipped"] = self._last_step_skipped.cpu()
        return state

