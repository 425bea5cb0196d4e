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

Beyond torch.amp (which keeps float32 weights and casts them every step), each takes bf16/fp16
parameters two ways (see ``ampkit.cast_model``):

* ``master_weights=True``: a float32 master copy of every bf16/fp16 parameter and float32 states;
  each step reads the low-precision grad (still scaled: the scale is divided out in float32, so
  fp16 grads under a GradScaler never underflow in an unscale), updates the master and writes the
  parameter rounded to nearest, in one pass over memory (ampkit's kernels on the CPU and, in a
  CUDA build, on CUDA; elsewhere torch's fused step on the masters). A master step equals torch's
  fused step on the float32 master with the grad upcast.
* ``stochastic_rounding=True`` (bf16; CPU, and CUDA in a CUDA build): no master; the update is computed in float32 and rounded
  stochastically into the parameter (unbiased), states in ``state_dtype`` (float32 or bfloat16).
  The random bits depend on ``seed``, the step, the group and the tensor, so runs reproduce and
  resume bitwise.

float32 parameters in such groups (norms kept in float32) step as usual.

They are ``torch.optim.Optimizer`` subclasses, so ``param_groups`` (lr editable, LR schedulers),
``zero_grad``, ``state_dict`` / ``load_state_dict`` (torch's layout: float32 ``step`` tensors,
``exp_avg``, ``momentum_buffer``...) and hooks work as usual. ``_step_supports_amp_scaling`` is
True: ``ampkit.GradScaler.step`` and ``torch.amp.GradScaler.step`` hand them the scale and the
inf flag, and a step with inf/NaN grads is skipped on the device, without a host sync.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from . import _C

try:  # torch.distributed is absent from some builds
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

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


_LOW_PRECISION = (torch.float16, torch.bfloat16)

# The low-precision options of every optimizer, with their defaults (also what groups saved
# before they existed behaved as).
_LOW_PRECISION_DEFAULTS: Dict[str, Any] = {"master_weights": False, "stochastic_rounding": False,
                                           "state_dtype": torch.float32, "seed": 0}


def _check_low_precision(who: str, group: Dict[str, Any]) -> None:
    for name in ("master_weights", "stochastic_rounding"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{who}: expected {name} to be a bool, got {group[name]!r}")
    if not isinstance(group["state_dtype"], torch.dtype):
        raise ValueError(f"{who}: expected state_dtype to be a torch.dtype, got {group['state_dtype']!r}")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"{who}: expected seed to be a 64-bit int, got {seed!r}")


def _state_dtype(p: torch.Tensor, group: Dict[str, Any]) -> torch.dtype:
    """The dtype of p's states: float32 next to a master, state_dtype when rounded stochastically."""
    if p.dtype in _LOW_PRECISION and group["master_weights"]:
        return torch.float32
    if p.dtype == torch.bfloat16 and group["stochastic_rounding"]:
        return group["state_dtype"]
    return p.dtype


def _state_like(state: Dict[str, Any], key: str, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """state[key] in dtype: zeros where missing, converted where the options changed since."""
    t = state.get(key)
    t = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) if t is None else t.to(dtype)
    state[key] = t
    return t


def _master(state: Dict[str, Any], p: torch.Tensor, group: Dict[str, Any]) -> torch.Tensor:
    """What the operators take as p's master: its float32 copy (made at its first master step), or p
    itself for a float32 parameter. A master the options no longer ask for is dropped."""
    if p.dtype in _LOW_PRECISION and group["master_weights"]:
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return state["master"]
    state.pop("master", None)
    return p


def _local(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """The local shards of DTensors (FSDP2's sharded parameters, grads and states), which alias
    them: the step is elementwise, so each rank updates its own shard in place."""
    if _DTensor is None:
        return tensors
    return [t.to_local() if isinstance(t, _DTensor) else t for t in tensors]


def _scale_arg(value: Any) -> Optional[torch.Tensor]:
    # torch.amp.GradScaler passes sum([]) == 0 when it recorded no found_inf tensors.
    return value if isinstance(value, torch.Tensor) else None


class _FusedOptimizer(torch.optim.Optimizer):
    _step_supports_amp_scaling = True

    # Flags that groups saved by older torch / ampkit versions may lack, with the values those
    # versions behaved as (torch's __setstate__ fills them in the same way).
    _group_flag_defaults: Dict[str, Any] = {"maximize": False, **_LOW_PRECISION_DEFAULTS}
    _name = "optimizer"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # Check the group as it will be (defaults filled in) before torch adds it, so that a bad
        # group leaves the optimizer as it was.
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(group)
        if group.get("stochastic_rounding"):
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for i, p in enumerate(params):
                if isinstance(p, torch.Tensor):
                    _C._check_rounded_param(self._name, p, len(self.param_groups), i)
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        raise NotImplementedError

    def _group_index(self, group: Dict[str, Any]) -> int:
        for i, g in enumerate(self.param_groups):
            if g is group:
                return i
        return 0

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's, except that states keep the dtypes of the low-precision layouts: float32 masters
        and states next to bf16/fp16 parameters (torch casts every floating state to its parameter's
        dtype, which would round the masters away), state_dtype with stochastic rounding."""
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups", [])
        id_map = {}
        if len(groups) == len(saved_groups) and all(len(g["params"]) == len(s["params"])
                                                    for g, s in zip(groups, saved_groups)):
            for g, sg in zip(groups, saved_groups):
                opts = {**_LOW_PRECISION_DEFAULTS, **sg}
                _check_low_precision(self._name, opts)
                for p, pid in zip(g["params"], sg["params"]):
                    id_map[pid] = (p, opts)
        exact = {}
        for pid, st in state_dict.get("state", {}).items():
            if pid not in id_map:
                continue
            p, opts = id_map[pid]
            for key, value in st.items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"{self._name}.load_state_dict: expected state '{key}' of parameter {pid} to "
                                     f"have its parameter's shape {tuple(p.shape)}, got {tuple(value.shape)}")
                dtype = torch.float32 if key == "master" else _state_dtype(p, opts)
                exact[(p, key)] = value.to(device=p.device, dtype=dtype)
        super().load_state_dict(state_dict)  # validates the rest, then replaces state and groups
        for (p, key), value in exact.items():
            self.state[p][key] = value

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
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        fused=True, master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                        state_dtype=state_dtype, seed=seed)
        self._check_group(defaults)
        super().__init__(params, defaults)

    _group_flag_defaults = {"amsgrad": False, "maximize": False, **_LOW_PRECISION_DEFAULTS}

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        who = self._name
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{who}: expected betas to be a pair of floats, got {betas!r}")
        lr = _check_lr(who, group["lr"], check_lr_value)
        for name in ("amsgrad", "maximize"):
            if not isinstance(group[name], bool):
                raise ValueError(f"{who}: expected {name} to be a bool, got {group[name]!r}")
        _check_low_precision(who, group)
        _C._check_adam_options(
            lr=lr, beta1=_number(who, "betas[0]", betas[0]),
            beta2=_number(who, "betas[1]", betas[1]), eps=_number(who, "eps", group["eps"]),
            weight_decay=_number(who, "weight_decay", group["weight_decay"]),
            master_weights=group["master_weights"], stochastic_rounding=group["stochastic_rounding"],
            state_dtype=group["state_dtype"],
        )

    def _step_group(self, group, grad_scale, found_inf) -> None:
        amsgrad = group["amsgrad"]
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masters = [], [], [], [], [], [], []
        pending = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p] if p in self.state else None
            if not state:
                # torch's fused layout; stored only once the step is known to be valid.
                state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
                pending[p] = state
            dtype = _state_dtype(p, group)
            exp_avgs.append(_state_like(state, "exp_avg", p, dtype))
            exp_avg_sqs.append(_state_like(state, "exp_avg_sq", p, dtype))
            if amsgrad:
                max_sqs.append(_state_like(state, "max_exp_avg_sq", p, dtype))
            master = _master(state, p, group)
            if group["master_weights"]:
                masters.append(master)
            params.append(p)
            grads.append(p.grad)
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _overload(torch.ops.ampkit.fused_adam_, group["lr"])(
            _local(params), _local(grads), _local(exp_avgs), _local(exp_avg_sqs), _local(max_sqs), steps,
            lr=_lr_arg(group["lr"]), beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), amsgrad=amsgrad,
            maximize=group["maximize"], decoupled_weight_decay=self._decoupled,
            grad_scale=grad_scale, found_inf=found_inf, masters=_local(masters),
            stochastic_rounding=group["stochastic_rounding"], seed=group["seed"], group_index=self._group_index(group),
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
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype, seed=seed)


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
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, fused=True, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, state_dtype=state_dtype, seed=seed)
        self._check_group(defaults)
        super().__init__(params, defaults)

    _name = "SGD"
    _group_flag_defaults = {"nesterov": False, "maximize": False, **_LOW_PRECISION_DEFAULTS}

    def _check_group(self, group: Dict[str, Any], check_lr_value: bool = True) -> None:
        lr = _check_lr("SGD", group["lr"], check_lr_value)
        for name in ("nesterov", "maximize"):
            if not isinstance(group[name], bool):
                raise ValueError(f"SGD: expected {name} to be a bool, got {group[name]!r}")
        _check_low_precision("SGD", group)
        _C._check_sgd_options(
            lr=lr, momentum=_number("SGD", "momentum", group["momentum"]),
            dampening=_number("SGD", "dampening", group["dampening"]),
            weight_decay=_number("SGD", "weight_decay", group["weight_decay"]), nesterov=group["nesterov"],
            master_weights=group["master_weights"], stochastic_rounding=group["stochastic_rounding"],
            state_dtype=group["state_dtype"],
        )

    def _step_group(self, group, grad_scale, found_inf) -> None:
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        rounded = group["stochastic_rounding"]
        ordinary = ([], [], [], [], [])  # params, grads, momentum buffers, masters, rounding counters
        first = ([], [], [], [], [])  # the same for first steps with dampening != 0
        pending = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p] if p in self.state else {}
            dtype = _state_dtype(p, group)
            master = _master(state, p, group)
            if rounded and "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if state and p not in self.state:
                self.state[p] = state  # a master or a rounding counter: made before the step, as in C++
            buf = state.get("momentum_buffer") if momentum != 0 else None
            if buf is not None:
                buf = state["momentum_buffer"] = buf.to(dtype)
            lists = ordinary
            if momentum != 0 and buf is None:
                buf = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if dampening == 0:
                    pending[p] = buf
                else:
                    lists = first
            lists[0].append(p)
            lists[1].append(p.grad)
            if buf is not None:
                lists[2].append(buf)
            if group["master_weights"]:
                lists[3].append(master)
            if rounded:
                lists[4].append(state["step"])
        kwargs = dict(
            lr=_lr_arg(group["lr"]), momentum=momentum, dampening=dampening,
            weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=rounded, seed=group["seed"],
            group_index=self._group_index(group),
        )
        fused_sgd_ = _overload(torch.ops.ampkit.fused_sgd_, group["lr"])
        params = ordinary[0]
        if params:
            fused_sgd_(*map(_local, ordinary[:3]), masters=_local(ordinary[3]), state_steps=ordinary[4],
                       is_first_step=False, **kwargs)
            for p, buf in pending.items():
                self.state[p]["momentum_buffer"] = buf
        first_params, first_bufs = first[0], first[2]
        if first_params:
            fused_sgd_(*map(_local, first[:3]), masters=_local(first[3]), state_steps=first[4], is_first_step=True,
                       **kwargs)
            if found_inf is None or not bool(found_inf.item()):  # the documented first-step sync
                for p, buf in zip(first_params, first_bufs):
                    self.state[p]["momentum_buffer"] = buf
