"""The backbones behind one contract (see ``base.py``), discovered, not listed.

Every module of this package (``pkgutil``; ``base`` and names starting with ``_`` excepted)
that defines a concrete :class:`Backbone` subclass contributes it to ``REGISTRY`` under the
module's name: ``simvp.py`` -> ``"simvp"`` -> :class:`SimVPv2`. A module holds one backbone;
a class that another class of the same module subclasses (a shared base such as
``PatchRecurrentBackbone``) is not one. Adding ``beamvq/backbones/foo.py`` and
``configs/backbones/foo.yaml`` is all a new backbone takes.

Each discovered class is also an attribute of this package, so YAML configs name it as
``class_path: beamvq.backbones.<Class>``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

from beamvq.backbones.base import Backbone, Encoded

_SKIPPED_MODULES = frozenset({"base"})


def _backbones_of(module: ModuleType) -> list[type[Backbone]]:
    """The concrete Backbone classes defined in ``module`` that none of its classes extends."""
    defined = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Backbone)
        and obj.__module__ == module.__name__
        and not obj.__name__.startswith("_")
        and not inspect.isabstract(obj)
    ]
    return [c for c in defined if not any(o is not c and issubclass(o, c) for o in defined)]


def discover(package: str = __name__) -> dict[str, type[Backbone]]:
    """``{module name: Backbone class}`` for the modules of ``package`` (imported by name).

    Raises ``ValueError`` when a module defines more than one backbone (which one would its
    name select?) and lets an import error of a module through: a broken backbone file must
    not disappear from the registry silently.
    """
    root = importlib.import_module(package)
    found: dict[str, type[Backbone]] = {}
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        if info.ispkg or info.name.startswith("_") or info.name in _SKIPPED_MODULES:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        classes = _backbones_of(module)
        if len(classes) > 1:
            names = sorted(c.__name__ for c in classes)
            raise ValueError(
                f"{module.__file__}: defines {len(classes)} backbones {names}; a backbone module "
                "holds one (its file name is the registry name)"
            )
        if classes:
            found[info.name] = classes[0]
    return found


def backbone_class(name: str) -> type[Backbone]:
    """The backbone class of a registry name (``"simvp"``) or a YAML ``class_path``."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, _, attr = name.rpartition(".")
    if module_name:
        obj = getattr(importlib.import_module(module_name), attr, None)
        if inspect.isclass(obj) and issubclass(obj, Backbone):
            return obj
    raise ValueError(
        f"{name!r} is neither a registered backbone ({sorted(REGISTRY)}) nor the class path of "
        "a Backbone subclass"
    )


REGISTRY: dict[str, type[Backbone]] = discover()

# the class_path form of the YAML configs: beamvq.backbones.<Class>
globals().update({cls.__name__: cls for cls in REGISTRY.values()})

__all__ = [
    "REGISTRY",
    "Backbone",
    "Encoded",
    "backbone_class",
    "discover",
    *sorted(cls.__name__ for cls in REGISTRY.values()),
]
