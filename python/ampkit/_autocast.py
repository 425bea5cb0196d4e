"""ampkit.autocast: torch.autocast itself, with ampkit's policy tables deciding the precision of each op."""
import contextlib
import threading
from typing import Any, List, Optional, Tuple

import torch

from . import _C
from ._cast_policy import _sync_compiled_code


def _not_traced(fn):
    """Keeps torch.compile out of fn and all it calls, as ``torch.compiler.disable`` does, without
    importing Dynamo (which that would, at a second of import time). The mark makes a compiled frame
    that calls fn graph-break and call it as it is; the frame strategy keeps Dynamo from compiling
    fn's own frame and the frames under it when it then runs (without it Dynamo compiled them as
    top-level frames: wasted compilations, and under torch 2.11, whose Dynamo takes a subclass of
    torch.amp.autocast for torch's region, an error from inside ``super().__init__``)."""
    fn._torchdynamo_disable = True
    frames = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    if frames is not None and hasattr(frames, "set_code_exec_strategy"):
        skip = frames._FrameAction.SKIP
        frames.set_code_exec_strategy(fn.__code__, frames._FrameExecStrategy(skip, skip))
    return fn


# torch.compile turns a torch.amp.autocast object met in a compiled frame into torch's own region
# (torch's lists, ampkit's table ignored) except, from torch 2.13, instances of torch's
# _UnmanagedAutocast subclass, which it treats as user objects: ampkit's regions then run eagerly
# (a graph break) with ampkit's table. Where torch lacks that class (2.11), every subclass of
# torch.amp.autocast became torch's region in compiled code, silently; there ampkit.autocast takes
# torch.amp.autocast's code (its __init__ and __call__, so the arguments, defaults, warnings and
# errors are still torch's) without its type: isinstance(r, torch.autocast) is False there.
if hasattr(torch.amp.autocast_mode, "_UnmanagedAutocast"):
    _TorchAutocast = torch.amp.autocast_mode._UnmanagedAutocast
else:

    class _TorchAutocast:  # type: ignore[no-redef]
        __init__ = torch.amp.autocast.__init__
        __call__ = torch.amp.autocast.__call__


class autocast(_TorchAutocast):
    """Context manager and decorator that runs ops in mixed precision.

    A drop-in for ``torch.autocast(device_type, dtype=None, enabled=True, cache_enabled=None)``,
    and a subclass of it (from torch 2.13; see the note above the class): the arguments, their
    defaults, the warnings and errors are torch's, and inside the region torch's autocast state is
    set exactly as ``torch.autocast`` sets it (``torch.is_autocast_enabled(device_type)``,
    ``torch.get_autocast_dtype(device_type)``), so
    ``torch.amp.custom_fwd``, activation checkpointing, ``torch.compile`` and nested
    ``torch.autocast(enabled=False)`` / ``torch.autocast(dtype=...)`` regions behave as under
    torch. The difference: each op listed in ampkit's table runs in the precision the table gives
    it (see ``ampkit.set_policy``), also inside nested ``torch.autocast`` regions, and the table
    can be read and edited at run time.

    Args:
        device_type: "cpu" or "cuda", whose ops follow ampkit's tables; other device types that
            torch.autocast supports ("xpu", "mps", "hpu", ...) get torch's autocast and its lists.
        dtype: torch.float16 or torch.bfloat16; None takes torch's autocast dtype of the device
            type (CPU bfloat16, CUDA float16). Any other dtype with ``enabled=True`` warns and
            disables the region, as torch does.
        enabled: False opens a region in which nothing is autocast on ``device_type``.
        cache_enabled: cache the lower-precision casts of fp32 weights inside the region; None
            keeps the current setting (True by default), as in torch.

    Raises:
        ValueError: device_type is not a str (as torch).
        RuntimeError: device_type is not a device type, or one torch's autocast does not support
            (as torch).
        TypeError: dtype, enabled or cache_enabled of the wrong type (torch raises the same type
            when the region is entered).
    """

    # torch.compile cannot trace into ampkit's C++ regions: a function compiled with an ampkit
    # region inside runs that region eagerly (a graph break), which keeps the table's semantics.
    @_not_traced
    def __init__(
        self,
        device_type: str,
        dtype: Optional[torch.dtype] = None,
        enabled: bool = True,
        cache_enabled: Optional[bool] = None,
    ):
        # The messages carry torch's own wording too, for code that matches it.
        if not isinstance(device_type, str):
            raise ValueError(f"ampkit.autocast: Expected `device_type` of type `str`, got: `{type(device_type)}`")
        try:
            torch.device(device_type)
        except RuntimeError as e:
            raise RuntimeError(f"ampkit.autocast: expected device_type to be a device type string such as 'cpu' or "
                               f"'cuda', got {device_type!r} ({e})") from None
        _C.check_autocast_device(device_type)
        # torch raises these TypeErrors only when the region is entered, from deep inside.
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"ampkit.autocast: expected dtype to be a torch.dtype or None, got {dtype!r}")
        if not isinstance(enabled, bool):
            raise TypeError(f"ampkit.autocast: expected enabled to be a bool, got {enabled!r}")
        if cache_enabled is not None and not isinstance(cache_enabled, bool):
            raise TypeError(f"ampkit.autocast: expected cache_enabled to be a bool or None, got {cache_enabled!r}")
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        # Regions entered and not yet left, as (thread id, region): a decorated function may recurse
        # or run on several threads at once, and a generator may be finished on another thread.
        self._regions: List[Tuple[int, Any]] = []

    @_not_traced
    def __enter__(self) -> "autocast":
        _sync_compiled_code()
        region = _C._AutocastRegion(self.device, self.fast_dtype, self._enabled, self._cache_enabled)
        region.enter()
        self._regions.append((threading.get_ident(), region))
        return self

    @_not_traced
    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        # The region this `with` entered: the latest of this thread, or (a generator or coroutine
        # finished on another thread) the latest of any thread, which the core refuses to leave
        # here and hands back to its own thread.
        me = threading.get_ident()
        regions = list(self._regions)  # list operations are atomic; this snapshot is searched
        entry = next((e for e in reversed(regions) if e[0] == me), regions[-1] if regions else None)
        if entry is None:
            raise RuntimeError(
                "ampkit.autocast.__exit__: expected a region entered with this object, got none "
                "(__exit__ called without __enter__, or more often than __enter__)"
            )
        self._regions.remove(entry)
        entry[1].exit()  # regions may be left in any order; see ampkit._C._AutocastRegion.exit
        return False


def is_autocast_enabled(device_type: str) -> bool:
    """Whether ops on ``device_type`` are autocast by ampkit's table on this thread: an enabled
    ampkit region is open and ``torch.is_autocast_enabled(device_type)`` is True."""
    return _C.is_autocast_enabled(device_type)


def get_autocast_dtype(device_type: str) -> torch.dtype:
    """``torch.get_autocast_dtype(device_type)``: the innermost region's dtype, or torch's default."""
    return torch.get_autocast_dtype(device_type)


def autocast_cache_size() -> int:
    """Number of weight casts cached on this thread (emptied when the outermost region exits)."""
    return _C.autocast_cache_size()


def clear_autocast_cache() -> None:
    """Drops this thread's cached weight casts."""
    _C.clear_autocast_cache()


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that
    recomputes under ampkit's table.

    Checkpointing saves torch's autocast state and re-enters it with ``torch.autocast`` for the
    recomputation. When backward runs inside the ampkit region that ran the forward, ampkit's
    table decides the recomputation too; when it runs outside, the recomputation follows torch's
    lists, which equal ampkit's default table but not an edited one (torch then raises a
    CheckpointError: "Recomputed values ... have different metadata"). This context_fn re-enters
    the forward's ampkit regions around the recomputation::

        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
                                              context_fn=ampkit.checkpoint_context_fn)
    """
    regions = [
        (device, torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled())
        for device in _C.policy_device_types()
        if is_autocast_enabled(device)
    ]

    @contextlib.contextmanager
    def recompute():
        with contextlib.ExitStack() as stack:
            for device, dtype, cache_enabled in regions:
                stack.enter_context(autocast(device, dtype=dtype, cache_enabled=cache_enabled))
            yield

    return contextlib.nullcontext(), recompute()
