"""ampkit.optim: fused, sync-free Adam, AdamW and SGD.

Drop-ins for ``torch.optim.Adam/AdamW/SGD(fused=True)`` that give the same numbers bitwise (the
same ATen kernels with the same arguments, run by the operators ``torch.ops.ampkit.fused_adam_`` /
``fused_sgd_``, the code that ``ampkit::optim`` uses in C++).

What they add over torch's:

* ``SGD``: bf16/fp16 parameters on the CPU get a one-pass kernel (torch's CPU fused SGD gives wrong
  results for them, and its foreach path is slower); with momentum it never reads an uninitialized
  momentum buffer after a first step that a GradScaler skipped (torch's fused SGD does).
* ``Adam`` / ``AdamW``: nothing numerical. They are thin: torch's fused kernel through the same
  operator as the C++ optimizers (so a model trained from C++ and from Python steps identically),
  with option errors that name the option (ValueError). ``torch.optim.AdamW(fused=True)`` is an
  equally good choice in Python.

They are ``torch.optim.Optimizer`` subclasses, so ``param_groups`` (lr editable, LR schedulers),
``zero_grad``, ``state_dict`` / ``load_state_dict`` (torch's layout: float32 ``step`` tensors,
``exp_avg``, ``momentum_buffer``...) and hooks work as usual. ``_step_supports_amp_scaling`` is
True: ``ampkit.GradScaler.step`` and ``torch.amp.GradScaler.step`` hand them the scale and the
inf flag, and a step with inf/NaN grads is skipped on the device, without a host sync.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch

from . import _C

__all__ = ["Adam", "AdamW", "SGD"]

Params = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]]


def _number(who: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{who}: expected {name} to be a float, got {value!r}")
    return float(value)


def _check_lr(who: str, lr: Any, check_value: bool) -> float:
    """A float lr, or a 1-element floating tensor lr as torch's fused optimizers accept (its value
    is read only when check_value: reading a CUDA tensor every step would sync)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{who}: expected a tensor lr to be a 1-element floating tensor, got {lr.dtype} of "
                             f"shape {tuple(lr.shape)}")
        return float(lr.item()) if check_value else 0.0
    return _number(who, "lr", lr)


def _overload(packet: Any, lr: Any) -> Any:
    """The operator's overload for this lr: ``tensor_lr`` for a tensor, as torch's fused optimizers
    accept one (named explicitly: overload resolution could turn a 1-element tensor into a float,
    a host read)."""
    return packet.tensor_lr if isinstance(lr, torch.Tensor) else packet.default


def _lr_arg(lr: Any) -> Union[float, torch.Tensor]:
    return lr if isinstance(lr, torch.Tensor) else float(lr)


def _scale_arg(value: Any) -> Optional[torch.Tensor]:
    # torch.amp.GradScaler passes sum([]) == 0 when it recorded no found_inf tensors.
    return value if isinstance(value, torch.Tensor) else None


class _FusedOptimizer(torch.optim.Optimizer):
    _step_supports_amp_scaling = True

    # Flags that groups saved by older torch / ampkit versions may lack, with the values those
    # versions behaved as (torch's __setstate__ fills them in the same way).
    _group_flag_defaults: Dict[str, Any] = {"maximize": False}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # Check the group as it will be (defaults filled in) before torch adds it, so that a bad
        # group leaves the optimizer as it was.
        self._check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        raise NotImplementedError

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.optim.Optimizer.load_state_dict comes here too. As torch does: groups saved without
        # newer flags get their defaults, and a Python-number step (saved by old versions) becomes
        # the float32 tensor on the parameter's device that the fused kernels count in.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_flag_defaults.items():
                group.setdefault(key, value)
            group["fused"] = True
            for p in group["params"]:
                p_state = self.state.get(p)
                if not p_state or "step" not in p_state:
                    continue
                step = p_state["step"]
                if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == p.device):
                    p_state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)

    def _scale_and_inf(self, grad_scale, found_inf) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        # Explicit arguments win; otherwise the attributes that GradScaler.step sets.
        if grad_scale is None:
            grad_scale = _scale_arg(getattr(self, "grad_scale", None))
        if found_inf is None:
            found_inf = _scale_arg(getattr(self, "found_inf", None))
        return grad_scale, found_inf

    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], Any]] = None,
        *,
        grad_scale: Optional[torch.Tensor] = None,
        found_inf: Optional[torch.Tensor] = None,
    ) -> Any:
        """One step. ``grad_scale``: 1-element float32 tensor the grads are still multiplied by
        (the kernel unscales them); ``found_inf``: 1-element float32 tensor, nonzero to skip the
        step on the device (parameters and state, step counters included, stay as they were).
        Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._scale_and_inf(grad_scale, found_inf)
        for group in self.param_groups:
            self._check_group(group, check_lr_value=False)  # lr and friends may have been edited since
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf)
        return loss


class _AdamBase(_FusedOptimizer):
    _decoupled = False
    _name = "Adam"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        fused=True)
        self._check_group(defaults)
        super().__init__(params, defaults)

    _group_flag_defaults = {"amsgrad": False, "maximize": False}

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        who = self._name
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{who}: expected betas to be a pair of floats, got {betas!r}")
        lr = _check_lr(who, group["lr"], check_lr_value)
        for name in ("amsgrad", "maximize"):
            if not isinstance(group[name], bool):
                raise ValueError(f"{who}: expected {name} to be a bool, got {group[name]!r}")
        _C._check_adam_options(
            lr=lr, beta1=_number(who, "betas[0]", betas[0]),
            beta2=_number(who, "betas[1]", betas[1]), eps=_number(who, "eps", group["eps"]),
            weight_decay=_number(who, "weight_decay", group["weight_decay"]),
        )

    def _step_group(self, group, grad_scale, found_inf) -> None:
        amsgrad = group["amsgrad"]
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        pending = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p] if p in self.state else None
            if not state:
                # torch's fused layout; stored only once the step is known to be valid.
                state = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                pending[p] = state
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _overload(torch.ops.ampkit.fused_adam_, group["lr"])(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
            lr=_lr_arg(group["lr"]), beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), amsgrad=amsgrad,
            maximize=group["maximize"], decoupled_weight_decay=self._decoupled,
            grad_scale=grad_scale, found_inf=found_inf,
        )
        for p, state in pending.items():
            self.state[p] = state


class Adam(_AdamBase):
    """Fused Adam, thin: ``torch.optim.Adam(params, lr, betas, eps, weight_decay, amsgrad,
    maximize=..., fused=True)`` with the same results, through the operator the C++ ``ampkit::optim::
    Adam`` runs. Raises ValueError for bad options (naming them), an empty parameter list, sparse
    gradients or gradients that do not match their parameters."""


class AdamW(_AdamBase):
    """Fused AdamW (decoupled weight decay, default 1e-2), thin: ``torch.optim.AdamW(...,
    fused=True)`` with the same results, through the operator the C++ ``ampkit::optim::AdamW`` runs."""

    _decoupled = True
    _name = "AdamW"

    # Adam's signature again, on purpose: torch.optim.AdamW's, with its default weight_decay, so that
    # inspect.signature and IDEs show what torch shows.
    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


class SGD(_FusedOptimizer):
    """Fused SGD: ``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov,
    maximize=..., fused=True)`` with the same results, except that a skipped first step leaves the
    momentum buffers uninitialized in torch and absent (or zero) here.

    Momentum buffers start at zero, so that with ``dampening == 0`` the ordinary update
    ``buf = momentum * 0 + grad`` equals torch's first step ``buf = grad`` and a skipped step
    changes nothing, without a sync. With ``dampening != 0`` the first step of each parameter must
    be ``buf = grad`` and the buffer is kept only if the step ran, which costs one host read of
    ``found_inf`` on that first step.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, fused=True)
        self._check_group(defaults)
        super().__init__(params, defaults)

    _group_flag_defaults = {"nesterov": False, "maximize": False}

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        lr = _check_lr("SGD", group["lr"], check_lr_value)
        for name in ("nesterov", "maximize"):
            if not isinstance(group[name], bool):
                raise ValueError(f"SGD: expected {name} to be a bool, got {group[name]!r}")
        _C._check_sgd_options(
            lr=lr, momentum=_number("SGD", "momentum", group["momentum"]),
            dampening=_number("SGD", "dampening", group["dampening"]),
            weight_decay=_number("SGD", "weight_decay", group["weight_decay"]), nesterov=group["nesterov"],
        )

    def _step_group(self, group, grad_scale, found_inf) -> None:
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        params, grads, bufs, pending = [], [], [], {}
        first_params, first_grads, first_bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].get("momentum_buffer") if (momentum != 0 and p in self.state) else None
            if momentum == 0 or buf is not None:
                params.append(p)
                grads.append(p.grad)
                if buf is not None:
                    bufs.append(buf)
            elif dampening == 0:
                buf = pending[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(buf)
            else:
                first_params.append(p)
                first_grads.append(p.grad)
                first_bufs.append(torch.zeros_like(p, memory_format=torch.preserve_format))
        kwargs = dict(
            lr=_lr_arg(group["lr"]), momentum=momentum, dampening=dampening,
            weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf,
        )
        fused_sgd_ = _overload(torch.ops.ampkit.fused_sgd_, group["lr"])
        if params:
            fused_sgd_(params, grads, bufs, is_first_step=False, **kwargs)
            for p, buf in pending.items():
                self.state[p]["momentum_buffer"] = buf
        if first_params:
            fused_sgd_(first_params, first_grads, first_bufs, is_first_step=True, **kwargs)
            if found_inf is None or not bool(found_inf.item()):  # the documented first-step sync
                for p, buf in zip(first_params, first_bufs):
                    self.state[p]["momentum_buffer"] = buf
