"""ampkit.autocast: torch.autocast's signature and behaviour, driven by ampkit's policy tables."""
import functools
import threading
from typing import Any, Optional

import torch

from . import _C


class autocast:
    """Context manager and decorator that runs ops in mixed precision.

    A drop-in for ``torch.autocast(device_type, dtype=None, enabled=True, cache_enabled=None)``:
    inside the region each op listed in ampkit's table for ``device_type`` runs in the precision
    the table gives it (see ``ampkit.set_policy``). While the region is open torch's own
    autocast is switched off for ``device_type`` so that nothing is cast twice.

    Args:
        device_type: "cpu" or "cuda".
        dtype: torch.float16 or torch.bfloat16; None takes torch's autocast dtype of the
            device type (CPU bfloat16, CUDA float16).
        enabled: False opens a region in which ampkit casts nothing on ``device_type``.
        cache_enabled: cache the lower-precision casts of fp32 weights inside the region
            (None means True, as in torch).
    """

    def __init__(
        self,
        device_type: str,
        dtype: Optional[torch.dtype] = None,
        enabled: bool = True,
        cache_enabled: Optional[bool] = None,
    ):
        if not isinstance(device_type, str):
            raise ValueError(f"ampkit.autocast: expected device_type of type str, got {type(device_type).__name__}")
        if dtype is None:
            dtype = _C.default_autocast_dtype(device_type)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"ampkit.autocast: expected dtype to be a torch.dtype or None, got {dtype!r}")
        if not isinstance(enabled, bool):
            raise ValueError(f"ampkit.autocast: expected enabled to be a bool, got {enabled!r}")
        if cache_enabled is not None and not isinstance(cache_enabled, bool):
            raise ValueError(f"ampkit.autocast: expected cache_enabled to be a bool or None, got {cache_enabled!r}")
        _C.check_autocast_arguments(device_type, dtype)
        self.device = device_type
        self.fast_dtype = dtype
        self._enabled = enabled
        self._cache_enabled = True if cache_enabled is None else cache_enabled
        # Regions entered and not yet left, per thread: a decorated function may recurse or
        # run on several threads at once.
        self._local = threading.local()

    def __enter__(self) -> "autocast":
        region = _C._AutocastRegion(self.device, self.fast_dtype, self._enabled, self._cache_enabled)
        region.enter()
        stack = getattr(self._local, "regions", None)
        if stack is None:
            stack = self._local.regions = []
        stack.append(region)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self._local.regions.pop().exit()

    def __call__(self, func):
        @functools.wraps(func)
        def decorate_autocast(*args, **kwargs):
            with self:
                return func(*args, **kwargs)

        return decorate_autocast


def is_autocast_enabled(device_type: str) -> bool:
    """Whether ampkit's autocast is on for ``device_type`` on this thread."""
    return _C.is_autocast_enabled(device_type)


def get_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of this thread's innermost ampkit region of ``device_type``, or None."""
    return _C.get_autocast_dtype(device_type)


def autocast_cache_size() -> int:
    """Number of weight casts cached on this thread (emptied when the outermost region exits)."""
    return _C.autocast_cache_size()


def clear_autocast_cache() -> None:
    """Drops this thread's cached weight casts."""
    _C.clear_autocast_cache()
