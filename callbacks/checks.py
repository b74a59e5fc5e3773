"""Check, before any work, that the datamodule and the module implement the protocols of
``beamvq.protocols`` a callback codes against, and name what is missing; and a callback's own
arguments, named by their YAML keys (``<Callback>: init_args.<name>``: a callback may sit anywhere
in ``trainer.callbacks``), alone in the constructor and against the data in ``setup``."""

from __future__ import annotations

import numbers
from typing import Any, TypeVar

from beamvq.protocols import ForecastData

T = TypeVar("T")


def at_least(who: str, low: int, **values: Any) -> None:
    """Each ``init_args.<name>`` of ``who`` given in ``values`` is an integer ``>= low``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{who}: init_args.{name} must be >= {low}, got {value!r}")


def data_channels(dm: Any) -> int | None:
    """The data's channel count (``ForecastData.info``); ``None`` for another datamodule."""
    return len(dm.info().channels) if isinstance(dm, ForecastData) else None


def check_channel(who: str, index: int, dm: Any, name: str = "channel") -> None:
    """``who``'s ``init_args.<name>`` indexes one of the data's channels (when it says)."""
    channels = data_channels(dm)
    if channels is not None and not 0 <= index < channels:
        raise ValueError(
            f"{who}: init_args.{name} = {index} is out of range for the data's {channels} "
            "channel(s)"
        )


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
