"""ampkit: mixed-precision training with an editable cast-policy table.

    import ampkit
    with ampkit.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).sum()

    scaler = ampkit.GradScaler("cpu")  # torch.amp.GradScaler's API; see ampkit.GradScaler
"""
import os as _os

import torch  # loads LibTorch, which ampkit._C links against

_REBUILD = ("`pip install --no-build-isolation --no-deps --force-reinstall .` from the "
            "ampkit source tree or sdist (after `pip install 'setuptools>=77'`), or `bash scripts/setup.sh` in a checkout")

try:
    from . import version
except ImportError as e:  # version.py is written by the CMake build, next to _C
    raise ImportError(
        f"ampkit is not built: ampkit.version and ampkit._C come from its CMake build; build it with {_REBUILD}"
    ) from e


def _check_torch_version(built: str, running: str) -> None:
    # LibTorch keeps no ABI across releases: a binary built against X.Y runs with X.Y.* only.
    if built.split(".")[:2] != running.split("+")[0].split(".")[:2]:
        raise ImportError(
            f"ampkit {version.__version__} was built against torch {built}, but torch {running} is installed. "
            f"Rebuild ampkit against this torch with {_REBUILD}; or install the torch it was built for "
            f"(pip install 'torch=={'.'.join(built.split('.')[:2])}.*').")


_check_torch_version(version.torch, torch.__version__)

try:
    from . import _C
except ImportError as e:  # keep the cause: a missing symbol means a torch mismatch
    raise ImportError(
        f"ampkit could not load its compiled module ampkit._C (built against torch {version.torch}, running "
        f"torch {torch.__version__}); rebuild it with {_REBUILD}"
    ) from e

#: The folder to add to CMAKE_PREFIX_PATH for ``find_package(ampkit)`` (headers, libampkit and the CMake
#: package of this install; like ``torch.utils.cmake_prefix_path``).
cmake_prefix_path: str = _os.path.dirname(_os.path.abspath(_C.__file__))

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
from ._trainer import Trainer, StepStats, StepValues
from ._diagnostics import (
    precision_report,
    overflow_locator,
    module_scope,
    PrecisionReport,
    OverflowLocator,
    OverflowEvent,
)
from . import optim
from ._low_precision import cast_model, KEEP_FP32
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

__version__ = version.__version__

__all__ = [
    "cast_model",
    "KEEP_FP32",
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
    "StepValues",
    "optim",
    "precision_report",
    "overflow_locator",
    "module_scope",
    "PrecisionReport",
    "OverflowLocator",
    "OverflowEvent",
    "version",
    "cmake_prefix_path",
]
