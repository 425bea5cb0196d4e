"""The cast-policy tables: which precision each operator runs in under ampkit.autocast."""
from typing import Dict, Optional, Union

from . import _C

CastPolicy = _C.CastPolicy


def _as_policy(policy: Union["CastPolicy", str]) -> "CastPolicy":
    if isinstance(policy, CastPolicy):
        return policy
    if isinstance(policy, str) and policy.upper() in CastPolicy.__members__:
        return CastPolicy.__members__[policy.upper()]
    names = ", ".join(CastPolicy.__members__)
    raise ValueError(f"ampkit: expected policy to be an ampkit.CastPolicy or one of {names}, got {policy!r}")


def get_policy(op: str, device_type: str) -> Optional["CastPolicy"]:
    """The policy of ``op`` (e.g. ``"aten::mm"``) on ``device_type``, or None when it has no entry."""
    return _C.get_policy(op, device_type)


def set_policy(op: str, policy: Union["CastPolicy", str], device_type: str) -> None:
    """Gives ``op`` a policy on ``device_type``, replacing any entry it had.

    Refused with ValueError, leaving the table as it was, for malformed names, operators the
    dispatcher does not know, in-place or ``out=`` operators, and policies that do not fit the
    operator's schema. Custom operators (``torch.library``) are accepted once defined.
    """
    _C.set_policy(op, _as_policy(policy), device_type)


def remove_policy(op: str, device_type: str) -> bool:
    """Removes the entry of ``op`` on ``device_type``; returns False when it had none."""
    return _C.remove_policy(op, device_type)


def list_policies(device_type: str) -> Dict[str, "CastPolicy"]:
    """The whole table of ``device_type`` as a dict op -> CastPolicy."""
    return _C.list_policies(device_type)


def default_policies(device_type: str) -> Dict[str, "CastPolicy"]:
    """torch's own autocast list for ``device_type``, for the installed torch version."""
    return _C.default_policies(device_type)


def reset_policies(device_type: Optional[str] = None) -> None:
    """Restores the default table of ``device_type``, or of every device type when None."""
    _C.reset_policies(device_type)
