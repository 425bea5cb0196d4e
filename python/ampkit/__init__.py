"""ampkit: mixed-precision training with an editable cast-policy table.

    import ampkit
    with ampkit.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).sum()

    scaler = ampkit.GradScaler("cpu")  # torch.amp.GradScaler's API; see ampkit.GradScaler
"""
import torch  # loads LibTorch, which ampkit._C links against

try:
    from . import _C
except ImportError as e:  # keep the cause: a missing symbol means a torch mismatch
    raise ImportError(
        "ampkit could not load its compiled module ampkit._C. It must be built against the torch "
        f"installed here (torch {torch.__version__}): reinstall with "
        "`pip install --no-build-isolation .` from the ampkit source tree."
    ) from e

from . import _ops  # noqa: F401  (fake kernels of torch.ops.ampkit, for torch.compile)
from ._autocast import (
    autocast,
    is_autocast_enabled,
    get_autocast_dtype,
    autocast_cache_size,
    clear_autocast_cache,
    checkpoint_context_fn,
)
from ._grad_scaler import GradScaler
from ._trainer import Trainer, StepStats
from ._diagnostics import (
    precision_report,
    overflow_locator,
    module_scope,
    PrecisionReport,
    OverflowLocator,
    OverflowEvent,
)
from . import optim
from ._cast_policy import (
    CastPolicy,
    get_policy,
    set_policy,
    remove_policy,
    list_policies,
    default_policies,
    reset_policies,
    policy_device_types,
)

__version__ = "0.1.0"

__all__ = [
    "autocast",
    "is_autocast_enabled",
    "get_autocast_dtype",
    "autocast_cache_size",
    "clear_autocast_cache",
    "checkpoint_context_fn",
    "CastPolicy",
    "get_policy",
    "set_policy",
    "remove_policy",
    "list_policies",
    "default_policies",
    "reset_policies",
    "policy_device_types",
    "GradScaler",
    "Trainer",
    "StepStats",
    "optim",
    "precision_report",
    "overflow_locator",
    "module_scope",
    "PrecisionReport",
    "OverflowLocator",
    "OverflowEvent",
]
