"""The cast-policy tables: which precision each operator runs in under ampkit.autocast."""
import hashlib
import sys
from typing import Dict, List, Optional, Union

import torch

from . import _C

CastPolicy = _C.CastPolicy

# The table generation that compiled code was last made consistent with.
_synced_generation = _C._policy_generation()
# torch.compiler.config.cache_key_tag as the user set it, and the value ampkit last set.
_user_cache_key_tag: Optional[str] = None
_our_cache_key_tag: Optional[str] = None


def _tables_fingerprint() -> Optional[str]:
    """A digest of every table, or None when all of them are torch's defaults."""
    items = []
    for device_type in _C.policy_device_types():
        table = _C.list_policies(device_type)
        if table != _C.default_policies(device_type):
            items.append((device_type, sorted((op, int(p)) for op, p in table.items())))
    if not items:
        return None
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def _set_cache_key_tag(fingerprint: Optional[str]) -> None:
    # torch.compile's on-disk and in-memory caches (FX graph, AOTAutograd) key on the traced
    # graph and (not in torch 2.11) on the autocast dtype, not on ampkit's table: a graph compiled
    # under another table (in this process or an earlier one) would be reused. The tag is part of
    # their keys.
    global _user_cache_key_tag, _our_cache_key_tag
    try:
        import torch.compiler.config as config
    except ImportError:
        return
    if not hasattr(config, "cache_key_tag"):
        return
    current = config.cache_key_tag
    if _our_cache_key_tag is None or current != _our_cache_key_tag:
        _user_cache_key_tag = current  # first time, or the user set a tag of their own since
    if fingerprint is None:
        config.cache_key_tag = _user_cache_key_tag
        _our_cache_key_tag = None
    else:
        _our_cache_key_tag = f"{_user_cache_key_tag}|ampkit-policies:{fingerprint}"
        config.cache_key_tag = _our_cache_key_tag


def _sync_compiled_code() -> None:
    """Keeps torch.compile from running a graph traced under another version of the tables.

    A graph traced inside an ampkit region has the table's casts baked in, and Dynamo's guards
    see the region's dtype but not ampkit's table: after an edit, such a graph would run the old
    policy. So after an edit the compiled code is dropped (``torch._dynamo.reset_code_caches()``,
    nothing else of Dynamo's state), and the tables' digest goes into
    ``torch.compiler.config.cache_key_tag`` so that torch's compile caches do not hand back a
    graph compiled under other tables. Called after each edit made from Python and when a region
    is entered (which catches edits made from C++).
    """
    global _synced_generation
    generation = _C._policy_generation()
    if generation == _synced_generation:
        return
    _synced_generation = generation
    _set_cache_key_tag(_tables_fingerprint())
    if sys.modules.get("torch._dynamo") is None:
        return  # nothing can have been compiled in this process
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    tracker = getattr(convert_frame, "input_codes", None)
    if tracker is not None and not getattr(tracker, "seen", True):
        return  # Dynamo is loaded but has compiled nothing
    torch._dynamo.reset_code_caches()


def _as_policy(policy: Union["CastPolicy", str]) -> "CastPolicy":
    if isinstance(policy, CastPolicy):
        return policy
    if isinstance(policy, str) and policy in CastPolicy.__members__:
        return CastPolicy.__members__[policy]
    names = ", ".join(CastPolicy.__members__)
    raise ValueError(f"ampkit: expected policy to be an ampkit.CastPolicy or one of {names}, got {policy!r}")


def get_policy(op: str, device_type: str) -> Optional["CastPolicy"]:
    """The policy of ``op`` (e.g. ``"aten::mm"``) on ``device_type``, or None when it has no entry."""
    return _C.get_policy(op, device_type)


def set_policy(op: str, device_type: str, policy: Union["CastPolicy", str]) -> None:
    """Gives ``op`` a policy on ``device_type``, replacing any entry it had (the argument order of
    ``torch.library.register_autocast(op, device_type, cast_inputs)``).

    Refused with ValueError, leaving the table as it was, for malformed names, operators the
    dispatcher does not know, in-place or ``out=`` operators, and policies that do not fit the
    operator's schema. Custom operators (``torch.library``) are accepted once defined.
    """
    _C.set_policy(op, device_type, _as_policy(policy))
    _sync_compiled_code()


def remove_policy(op: str, device_type: str) -> bool:
    """Removes the entry of ``op`` on ``device_type``; returns False when it had none."""
    removed = _C.remove_policy(op, device_type)
    _sync_compiled_code()
    return removed


def list_policies(device_type: str) -> Dict[str, "CastPolicy"]:
    """The whole table of ``device_type`` as a dict op -> CastPolicy."""
    return _C.list_policies(device_type)


def default_policies(device_type: str) -> Dict[str, "CastPolicy"]:
    """torch's own autocast list for ``device_type``, for the installed torch version."""
    return _C.default_policies(device_type)


def policy_device_types() -> List[str]:
    """The device types that have a cast-policy table (``["cpu", "cuda"]``); other device types
    get torch's own autocast."""
    return _C.policy_device_types()


def reset_policies(device_type: Optional[str] = None) -> None:
    """Restores the default table of ``device_type``, or of every device type when None."""
    _C.reset_policies(device_type)
    _sync_compiled_code()
