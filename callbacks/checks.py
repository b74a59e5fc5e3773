"""Check, before any work, that the datamodule and the module implement the protocols of
``beamvq.protocols`` a callback codes against, and name what is missing."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a ``typing.Protocol`` class names (its own, not inherited)."""
    own = vars(protocol)
    names = set(own.get("__annotations__", {}))
    names |= {n for n, v in own.items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}  # fmt: skip
    return sorted(names)


def require(obj: Any, protocol: type[T], who: str, role: str) -> T:
    """``obj`` when it implements the runtime-checkable ``protocol``, else a ``TypeError`` that
    names ``who`` needs it, as ``role`` (``"datamodule"``, ``"module"``), and what ``obj`` lacks."""
    if isinstance(obj, protocol):
        return obj
    if obj is None:
        raise TypeError(f"{who} needs a {role} (beamvq.protocols.{protocol.__name__}); got none")
    # only reached when the protocol check failed: list the members that are absent
    missing = [name for name in protocol_members(protocol) if not hasattr(obj, name)]
    raise TypeError(
        f"{who} needs a {role} implementing beamvq.protocols.{protocol.__name__}; "
        f"{type(obj).__name__} lacks {missing}"
    )
