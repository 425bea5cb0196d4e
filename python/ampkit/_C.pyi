"""Type stub of ampkit._C, the pybind11 module built from csrc/python/ (cast-policy tables,
autocast regions, option checks, clipping). Generated with pybind11-stubgen, then tidied; keep it in
step with the bindings (tests/python/test_packaging.py compares the names)."""
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

_testing: Any  # C++ classes for the differential tests; not API

class CastPolicy:
    """
    How an operator's floating inputs are treated under autocast.

    Members:

      lower_precision_fp : cast to the autocast dtype (fp16 / bf16)

      fp32 : cast to float32

      fp32_set_opt_dtype : fill an absent dtype= with float32

      fp32_append_dtype : call the dtype overload with float32

      promote : run in the widest floating input type

      banned : refuse to run under autocast
    """
    __members__: ClassVar[dict[str, CastPolicy]]
    banned: ClassVar[CastPolicy]
    fp32: ClassVar[CastPolicy]
    fp32_append_dtype: ClassVar[CastPolicy]
    fp32_set_opt_dtype: ClassVar[CastPolicy]
    lower_precision_fp: ClassVar[CastPolicy]
    promote: ClassVar[CastPolicy]
    def __eq__(self, other: object) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: int) -> None:
        ...
    def __int__(self) -> int:
        ...
    def __ne__(self, other: object) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: int) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class _AutocastRegion:
    """
    One autocast region; ampkit.autocast enters and leaves it.
    """
    def __init__(self, device_type: str, dtype: torch.dtype, enabled: bool, cache_enabled: bool | None) -> None:
        ...
    def enter(self) -> None:
        """
        Enters the region on the calling thread.
        """
    def exit(self) -> None:
        """
        Leaves the region, in any order; raises if called on another thread than the one that entered it.
        """
class _OverflowEvent:
    """What an overflow locator found (ampkit::OverflowEvent)."""
    op: str
    phase: str
    module: str
    grad_fn: str
    device: str
    in_dtypes: list[torch.dtype]
    out_dtype: torch.dtype | None
    input_absmax: list[float]
    policy_op: str
    policy: str | None
    cause: str
    loss_scale: float | None
    suggested_edit: tuple[str, str, str] | None
    explanation: str
    op_index: int
class _OverflowLocator:
    """Watches every op's outputs from construction until stop() (ampkit::OverflowLocator)."""
    def __init__(self) -> None: ...
    def first(self) -> _OverflowEvent | None: ...
    def first_nonfinite_input(self) -> _OverflowEvent | None: ...
    def reset(self) -> None: ...
    def set_loss_scale(self, scale: torch.Tensor) -> None: ...
    def stop(self) -> None: ...
class _PrecisionRecord:
    """One row of a precision report (ampkit::PrecisionRecord)."""
    op: str
    device: str
    phase: str
    module: str
    policy: str | None
    in_dtypes: list[torch.dtype]
    arg_dtypes: list[torch.dtype]
    out_dtype: torch.dtype | None
    nested: bool
    calls: int
    casts: int
    cached_casts: int
    cast_bytes: int
class _PrecisionReport:
    """Records every op from construction until stop() (ampkit::PrecisionReport)."""
    def __init__(self) -> None: ...
    def rows(self) -> list[_PrecisionRecord]: ...
    def stop(self) -> None: ...
    def to_string(self, nested: bool = False, phase: str = "") -> str: ...
def _check_adam_options(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, master_weights: bool,
                        stochastic_rounding: bool, state_dtype: torch.dtype) -> None:
    """
    Raises ValueError, naming the option, unless Adam's / AdamW's options are valid.
    """
def _check_grad_scaler_options(init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int, min_scale: float, max_scale: float, hysteresis: int, check_init_scale: bool = True) -> None:
    """
    Raises ValueError, naming the option, unless GradScaler's options are all in range (init_scale is ignored when check_init_scale is False, as setters do).
    """
def _check_grad_scaler_state(scale: float, growth_factor: float, backoff_factor: float, growth_interval: int, growth_tracker: int, min_scale: float | None, max_scale: float | None, hysteresis: int | None, overflow_streak: int | None, *, current_growth_factor: float, current_backoff_factor: float, current_growth_interval: int, current_min_scale: float, current_max_scale: float, current_hysteresis: int) -> None:
    """
    Raises ValueError, naming the key, unless a state dict with these values (None: an absent ampkit key) can be loaded into a scaler with the current options.
    """
def _check_new_scale(new_scale: float, min_scale: float, max_scale: float) -> None:
    """
    Raises ValueError unless new_scale is finite and > 0 in float32 and within [min_scale, max_scale].
    """
def _check_sgd_options(lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                       master_weights: bool, stochastic_rounding: bool, state_dtype: torch.dtype) -> None:
    """
    Raises ValueError, naming the option, unless SGD's options are valid.
    """
def _check_rounded_param(who: str, param: torch.Tensor, group: int, index: int) -> None:
    """Raises ValueError unless param can be rounded stochastically (bf16 on the CPU, or float32)."""
def _clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """
    torch.nn.utils.clip_grad_norm_(params, max_norm) without a host sync (foreach norms, clip coefficient clamped to 1): multiplies the grads in place and returns the total 2-norm before clipping. With grad_scale the grads are still scaled by it: the norm is theirs divided by it, and they are clipped scaled. bf16/fp16 norms in float32.
    """
def _diagnostics_live() -> bool:
    """Whether a precision report or overflow locator is alive."""
def _module_scope_depth() -> int:
    """How many module scopes are open on this thread."""
def _note_loss_scale(scale: torch.Tensor) -> None:
    """Tells live overflow locators the loss scale that this backward pass's gradients carry."""
def _policy_generation() -> int:
    """
    A counter bumped by every table edit, from C++ or Python (compiled graphs compare it).
    """
def _pop_module_scope(name: str) -> bool:
    """Ends the innermost _push_module_scope() if it is name; returns whether it did."""
def _push_module_scope(name: str) -> None:
    """Ops this thread runs are attributed to name until the matching _pop_module_scope()."""
def _truncate_module_scopes(depth: int) -> None:
    """Ends the module scopes above depth (those a KeyboardInterrupt in a forward left open)."""
def _reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """
    1 / scale in float64, rounded to float32, as torch.amp.GradScaler computes it.
    """
def autocast_cache_size() -> int:
    """
    Number of weight casts cached on this thread.
    """
def autocast_nesting_depth() -> int:
    """
    Number of ampkit regions open on this thread.
    """
def check_autocast_device(device_type: str) -> None:
    """
    Raises RuntimeError unless torch's autocast supports device_type.
    """
def clear_autocast_cache() -> None:
    """
    Drops this thread's cached weight casts.
    """
def default_policies(device_type: str) -> dict[str, CastPolicy]:
    """
    torch's own autocast list for device_type, for the installed torch.
    """
def get_policy(op: str, device_type: str) -> CastPolicy | None:
    """
    The policy of op (e.g. 'aten::mm') on device_type, or None when it has no entry.
    """
def is_autocast_enabled(device_type: str) -> bool:
    """
    Whether ops on device_type are autocast by ampkit's table on this thread.
    """
def list_policies(device_type: str) -> dict[str, CastPolicy]:
    """
    The table of device_type as a dict op -> CastPolicy.
    """
def policy_device_types() -> list[str]:
    """
    The device types that have a cast-policy table, e.g. ['cpu', 'cuda'].
    """
def remove_policy(op: str, device_type: str) -> bool:
    """
    Removes the entry of op; returns False when it had none.
    """
def reset_policies(device_type: str | None = None) -> None:
    """
    Restores the default table of device_type, or of every device type.
    """
def set_policy(op: str, device_type: str, policy: CastPolicy) -> None:
    """
    Adds or replaces the entry of op. Refused (table unchanged) for unknown or in-place ops and for a policy that does not fit the op's schema.
    """
