"""See what ran in which precision, and find the op that overflowed.

    with ampkit.precision_report(model) as rep:
        with ampkit.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).sum()
        loss.backward()
    print(rep.table())

    with ampkit.overflow_locator(model, scaler=scaler) as loc:
        ...  # forward, scaler.scale(loss).backward()
    print(loc.first)  # None, or the first op whose output was inf/NaN from finite inputs

Both observe every op in C++ (ampkit::PrecisionReport / ampkit::OverflowLocator, through
at::RecordFunction callbacks, the mechanism torch's profiler uses) on the thread that entered them
and in the backward passes started there; they cost nothing when no one is open.
"""
import json
import os
from typing import Any, Dict, List, Optional, Tuple, TypeVar, Union

import torch

from . import _C


def _check_model(model: Any) -> Optional[torch.nn.Module]:
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"ampkit: expected model to be a torch.nn.Module or None, got {type(model).__name__}")
    return model


class module_scope:
    """Attributes the ops this thread runs inside the block to ``name`` (ampkit::ModuleScope):
    for code that is not an ``nn.Module``, or a C++-style label of your own."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"ampkit.module_scope: expected name to be a str, got {type(name).__name__}")
        self.name = name

    def __enter__(self) -> "module_scope":
        _C._push_module_scope(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        _C._pop_module_scope(self.name)


class _ModuleHooks:
    """Forward pre/post hooks on every submodule that keep the C++ module-path stack of this thread:
    forward ops get the innermost module's qualified name (the root: its class name), and their
    backward ops the same, through the autograd node's sequence number."""

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self._model = model
        self._handles: List[Any] = []
        self._depth = 0

    def attach(self) -> None:
        if self._model is None:
            return
        self._depth = _C._module_scope_depth()
        try:
            for name, module in self._model.named_modules():
                path = name or type(self._model).__name__
                self._handles.append(module.register_forward_pre_hook(self._push(path)))
                self._handles.append(module.register_forward_hook(self._pop(path), always_call=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        if self._handles:
            # torch runs always_call hooks on Exception, not on KeyboardInterrupt: end what was left open.
            _C._truncate_module_scopes(self._depth)
        self._handles.clear()

    @staticmethod
    def _push(path: str):
        def hook(module: torch.nn.Module, args: Any) -> None:
            _C._push_module_scope(path)

        return hook

    @staticmethod
    def _pop(path: str):
        # always_call: also when forward raised; a no-op when the push did not happen (an earlier
        # pre-hook raised), so that the enclosing module's scope stays.
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            _C._pop_module_scope(path)

        return hook


_ToolT = TypeVar("_ToolT", bound="_Tool")


class _Tool:
    """What a report and a locator share: a C++ session opened by ``with`` (one per block), the
    module hooks, and the errors of misuse."""

    _label = ""
    _noun = ""

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self._hooks = _ModuleHooks(_check_model(model))
        self._impl: Optional[Any] = None

    def _open(self) -> Any:
        raise NotImplementedError

    def _on_enter(self) -> None:
        pass

    def _on_exit(self) -> None:
        pass

    def __enter__(self: _ToolT) -> _ToolT:
        if self._impl is not None:
            raise RuntimeError(f"{self._label}: expected a {self._noun} that was not entered yet, got one entered "
                               "before (make a new one per block)")
        self._impl = self._open()
        try:
            self._hooks.attach()
            self._on_enter()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self._hooks.detach()
            self._on_exit()
        finally:
            assert self._impl is not None
            self._impl.stop()

    def _started(self) -> Any:
        if self._impl is None:
            raise RuntimeError(f"{self._label}: expected a {self._noun} entered with `with`, got one never entered")
        return self._impl


class PrecisionReport(_Tool):
    """What every op did while the report was open: see :func:`precision_report`.

    ``rows`` is a list of dicts, one per distinct (op, device, phase, module, policy, dtypes, nested)
    with the keys ``op`` (full name, e.g. ``"aten::addmm"``), ``device`` (``"cpu"``), ``phase``
    (``"forward"`` / ``"backward"``), ``module`` (qualified name, or None), ``policy`` (the cast
    policy ampkit applied, e.g. ``"lower_precision_fp"``, or None), ``in_dtypes`` (the tensor inputs'
    dtypes as the op computed in them, after ampkit's casts), ``arg_dtypes`` (as the caller passed
    them), ``out_dtype``, ``nested`` (called by another op), ``calls``, ``casts`` (inputs ampkit
    cast), ``cached_casts`` (of those, served by the weight cache) and ``cast_bytes``.
    """

    _label, _noun = "ampkit.precision_report", "report"

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__(model)

    def _open(self) -> Any:
        return _C._PrecisionReport()

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return [
            {
                "op": r.op,
                "device": r.device,
                "phase": r.phase,
                "module": r.module or None,
                "policy": r.policy,
                "in_dtypes": tuple(r.in_dtypes),
                "arg_dtypes": tuple(r.arg_dtypes),
                "out_dtype": r.out_dtype,
                "nested": r.nested,
                "calls": r.calls,
                "casts": r.casts,
                "cached_casts": r.cached_casts,
                "cast_bytes": r.cast_bytes,
            }
            for r in self._started().rows()
        ]

    def table(self, nested: bool = False, phase: Optional[str] = None) -> str:
        """A readable table of the rows; ops called by other ops only when ``nested``; only those of
        ``phase`` (``"forward"`` or ``"backward"``) when given."""
        if phase not in (None, "forward", "backward"):
            raise ValueError(f"ampkit: expected phase to be 'forward', 'backward' or None, got {phase!r}")
        return self._started().to_string(nested, phase or "")

    def to_json(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes ``{"rows": [...]}`` to ``path`` (dtypes as ``"torch.bfloat16"``)."""
        rows = []
        for r in self.rows:
            r = dict(r)
            r["in_dtypes"] = [str(d) for d in r["in_dtypes"]]
            r["arg_dtypes"] = [str(d) for d in r["arg_dtypes"]]
            r["out_dtype"] = None if r["out_dtype"] is None else str(r["out_dtype"])
            rows.append(r)
        with open(path, "w") as f:
            json.dump({"rows": rows}, f, indent=1)

    def __str__(self) -> str:
        return self.table()


class OverflowEvent:
    """The first op whose output was inf/NaN although its inputs were finite.

    Attributes: ``op``, ``phase`` (``"forward"`` / ``"backward"``), ``module`` (or None; a backward op
    is attributed to the module of its forward), ``grad_fn`` (the autograd node, in backward),
    ``device``, ``in_dtypes``, ``out_dtype``, ``input_absmax`` (the largest absolute value of each floating input),
    ``policy_op`` / ``policy`` (the op whose cast policy decided the precision, and that policy),
    ``cause`` (``"precision"``: finite when recomputed in float32; ``"loss_scale"``: a backward op whose
    output is finite once divided by the GradScaler's scale; ``"range"``: not finite in float32
    either; ``"input"``: only for ``first_nonfinite_input``), ``loss_scale``, ``suggestion`` (the
    ``ampkit.set_policy(...)`` call that avoids it, or None), ``suggested_edit`` (its arguments) and
    ``explanation``.
    """

    def __init__(self, event: Any) -> None:
        self.op: str = event.op
        self.phase: str = event.phase
        self.module: Optional[str] = event.module or None
        self.grad_fn: Optional[str] = event.grad_fn or None
        self.device: str = event.device
        self.in_dtypes: Tuple[torch.dtype, ...] = tuple(event.in_dtypes)
        self.out_dtype: Optional[torch.dtype] = event.out_dtype
        self.input_absmax: Tuple[float, ...] = tuple(event.input_absmax)
        self.policy_op: Optional[str] = event.policy_op or None
        self.policy: Optional[str] = event.policy
        self.cause: str = event.cause
        self.loss_scale: Optional[float] = event.loss_scale
        self.suggested_edit: Optional[Tuple[str, str, str]] = event.suggested_edit
        self.explanation: str = event.explanation
        self.op_index: int = event.op_index

    @property
    def suggestion(self) -> Optional[str]:
        if self.suggested_edit is None:
            return None
        op, device, policy = self.suggested_edit
        return f'ampkit.set_policy("{op}", "{device}", "{policy}")'

    def apply_suggestion(self) -> None:
        """Makes the suggested table edit (``ampkit.set_policy(*suggested_edit)``)."""
        if self.suggested_edit is None:
            raise RuntimeError(f"ampkit: expected an event with a suggestion, got one whose cause is '{self.cause}' "
                               "and that has none")
        from ._cast_policy import set_policy

        set_policy(*self.suggested_edit)

    def __str__(self) -> str:
        where = f" in module '{self.module}'" if self.module else ""
        node = f", in {self.grad_fn}" if self.grad_fn else ""
        lines = [f"first non-finite output: {self.op} ({self.phase}{node}){where}"]
        io = ", ".join(str(d).replace("torch.", "") for d in self.in_dtypes)
        out = str(self.out_dtype).replace("torch.", "") if self.out_dtype is not None else "-"
        detail = f"  inputs {io} -> {out}"
        if self.input_absmax:
            detail += "; max |input| " + ", ".join(f"{v:.3g}" for v in self.input_absmax)
        if self.loss_scale is not None:
            detail += f"; loss scale {self.loss_scale:.3g}"
        lines.append(detail)
        lines.append(f"  cause: {self.cause}: {self.explanation}")
        if self.suggestion:
            lines.append(f"  fix: {self.suggestion}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"OverflowEvent(op={self.op!r}, phase={self.phase!r}, module={self.module!r}, cause={self.cause!r})"


class _ScaleWatch:
    """While an overflow locator is open, ``torch.amp.GradScaler.scale`` (ampkit.GradScaler's too: it
    inherits it) tells the locators the scale that the gradients of the coming backward pass carry.
    The C++ GradScaler does so by itself. Counted, so that nested locators restore it once."""

    _count = 0
    _original: Any = None

    @classmethod
    def acquire(cls) -> None:
        if cls._count == 0:
            original = torch.amp.GradScaler.scale

            def scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
                scaled = original(self, outputs)
                current = getattr(self, "_scale", None)  # absent or None while disabled
                if current is not None:
                    _C._note_loss_scale(current)
                return scaled

            scale.__wrapped__ = original  # type: ignore[attr-defined]
            cls._original = original
            torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]
        cls._count += 1

    @classmethod
    def release(cls) -> None:
        cls._count -= 1
        if cls._count == 0:
            torch.amp.GradScaler.scale = cls._original  # type: ignore[method-assign]
            cls._original = None


class OverflowLocator(_Tool):
    """Watches every op's outputs while open: see :func:`overflow_locator`."""

    _label, _noun = "ampkit.overflow_locator", "locator"

    def __init__(self, model: Optional[torch.nn.Module] = None, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError("ampkit.overflow_locator: expected scaler to be a torch.amp.GradScaler (or ampkit's) or "
                            f"None, got {type(scaler).__name__}")
        super().__init__(model)
        self._scaler = scaler
        self._watching = False

    def _open(self) -> Any:
        return _C._OverflowLocator()

    def _on_enter(self) -> None:
        _ScaleWatch.acquire()
        self._watching = True
        # A scale() made before the block (the loss scaled, backward still to come) counts too.
        current = getattr(self._scaler, "_scale", None)
        if current is not None:
            self._impl.set_loss_scale(current)

    def _on_exit(self) -> None:
        if self._watching:
            _ScaleWatch.release()
            self._watching = False

    @property
    def first(self) -> Optional[OverflowEvent]:
        """The first op that produced a non-finite output from finite inputs, or None."""
        event = self._started().first()
        return None if event is None else OverflowEvent(event)

    @property
    def first_nonfinite_input(self) -> Optional[OverflowEvent]:
        """The first op that received a non-finite input no watched op produced (data, parameters
        or state already non-finite when the locator started), or None."""
        event = self._started().first_nonfinite_input()
        return None if event is None else OverflowEvent(event)

    def reset(self) -> None:
        """Forgets what was found and watches again."""
        self._started().reset()

    def set_loss_scale(self, scale: torch.Tensor) -> None:
        """The scale a loss was multiplied by by hand (GradScalers say it themselves): a backward
        overflow that is finite once divided by it is put down to it. A one-element floating tensor,
        read when an overflow is found."""
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"ampkit: expected scale to be a torch.Tensor, got {type(scale).__name__}")
        self._started().set_loss_scale(scale)


def precision_report(model: Optional[torch.nn.Module] = None) -> PrecisionReport:
    """A context manager that records, for every op run on a device type with an open
    ``ampkit.autocast`` region (and every op of backward passes), forward and backward, listed in
    the cast-policy table or not: the policy applied, input and output dtypes, calls and the casts
    ampkit made. With ``model``, each row names the submodule the op ran under (backward ops: the
    module of their forward). ``rep.rows``, ``rep.table()``, ``rep.to_json(path)``."""
    return PrecisionReport(model)


def overflow_locator(model: Optional[torch.nn.Module] = None,
                     scaler: Optional[torch.amp.GradScaler] = None) -> OverflowLocator:
    """A context manager that watches every op's outputs (forward and backward, scaled losses
    included) and keeps the first op that produced inf/NaN from finite inputs in ``loc.first``,
    with the module it ran under (given ``model``), why, and the cast-policy edit that avoids it.
    Overflows that exist only because of the loss scale are told apart: every GradScaler's
    ``scale()`` (torch's and ampkit's, C++ included) tells the locator its scale while it is open;
    ``scaler`` is needed only when the loss was scaled before the block was entered. It reads every output (syncs on CUDA) and changes
    no result."""
    return OverflowLocator(model, scaler)
