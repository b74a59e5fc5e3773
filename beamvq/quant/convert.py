"""In-place conversion of a model's Linear/Conv layers to quantized layers.

The walk never enters the VQ bottleneck (BeamVQ's code bank must see full-precision latents,
DESIGN.md): a module is skipped, with everything inside it, when it is an instance of
``beamvq.bottleneck.VQBottleneck`` (imported lazily, so conversion works before or without
that module), when any class in its MRO is named ``VQBottleneck``, or when its qualified name
contains ``"bottleneck"``. ``include`` / ``exclude`` are regular expressions searched in the
qualified layer names. The returned :class:`ConversionReport` lists what was converted and
what was left alone and why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from torch import nn

from beamvq.quant.layers import QUANT_CLASSES, QuantRecipe

log = logging.getLogger(__name__)

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class ConversionReport(NamedTuple):
    """Qualified names of the layers a conversion touched or left alone."""

    backend: str
    converted: list[str]
    skipped_bottleneck: list[str]
    filtered: list[str]

    def summary(self) -> str:
        return (
            f"{self.backend}: converted {len(self.converted)} layer(s), left "
            f"{len(self.skipped_bottleneck)} in the bottleneck and {len(self.filtered)} filtered "
            f"out; converted={self.converted}"
        )


def is_bottleneck(module: nn.Module, qualified_name: str) -> bool:
    """True for the VQ bottleneck (by class, lazily imported, or by name)."""
    if "bottleneck" in qualified_name.lower():
        return True
    try:
        from beamvq.bottleneck import VQBottleneck
    except ImportError:
        VQBottleneck = None  # noqa: N806 - the class, when the module exists
    if VQBottleneck is not None and isinstance(module, VQBottleneck):
        return True
    return any(cls.__name__ == "VQBottleneck" for cls in type(module).__mro__)


def walk_layers(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...]
) -> Iterator[tuple[str, nn.Module, bool]]:
    """Yield ``(qualified_name, layer, inside_bottleneck)`` for layers of exactly these types.

    Exact types only: subclasses (``NonDynamicallyQuantizableLinear`` inside
    ``nn.MultiheadAttention``, already converted layers, library-specific layers) have their own
    forward semantics.
    """

    def visit(module: nn.Module, prefix: str, skip: bool) -> Iterator[tuple[str, nn.Module, bool]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            child_skip = skip or is_bottleneck(child, name)
            if type(child) in layer_types:
                yield name, child, child_skip
            yield from visit(child, name, child_skip)

    root_skip = is_bottleneck(model, "")
    if type(model) in layer_types:
        yield "", model, root_skip
    yield from visit(model, "", root_skip)


def name_filter(
    include: Sequence[str] | None, exclude: Sequence[str] | None
) -> Callable[[str], bool]:
    """Predicate on qualified names: matches an ``include`` regex (if any) and no ``exclude``."""
    inc = [re.compile(p) for p in include] if include else None
    exc = [re.compile(p) for p in exclude] if exclude else []

    def accept(name: str) -> bool:
        if inc is not None and not any(p.search(name) for p in inc):
            return False
        return not any(p.search(name) for p in exc)

    return accept


def convert_to_quantized(
    model: nn.Module,
    recipe: QuantRecipe,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    linear: bool = True,
    conv: bool = True,
    divisible_by: int = 1,
) -> ConversionReport:
    """Swap Linear (and Conv/ConvTranspose) layers of ``model`` to quantized ones, in place.

    ``divisible_by`` keeps only Linear layers whose in/out features it divides (torchao's FP8
    GEMMs need 16; the simulated fallback of that path uses the same rule).
    """
    float_types = (LINEAR_TYPES if linear else ()) + (CONV_TYPES if conv else ())
    # already quantized layers are visited too, so a second conversion updates their recipe
    layer_types = float_types + tuple(QUANT_CLASSES[t] for t in float_types)
    accept = name_filter(include, exclude)
    converted: list[str] = []
    skipped: list[str] = []
    filtered: list[str] = []
    # collect first: the walk must not see the classes it is changing
    for name, layer, in_bottleneck in list(walk_layers(model, layer_types)):
        if in_bottleneck:
            skipped.append(name)
            continue
        shape_ok = not isinstance(layer, nn.Linear) or (
            layer.in_features % divisible_by == 0 and layer.out_features % divisible_by == 0
        )
        if not accept(name) or not shape_ok:
            filtered.append(name)
            continue
        quant_class = QUANT_CLASSES.get(type(layer), type(layer))
        quant_class.convert(layer, recipe)  # type: ignore[attr-defined]
        converted.append(name)
    report = ConversionReport("simulate", converted, skipped, filtered)
    log.info("ExMy conversion (%s): %s", recipe.describe(), report.summary())
    return report


def revert_quantized(model: nn.Module) -> list[str]:
    """Turn quantized layers back into their float classes, in place; returns their names."""
    float_of = {q: f for f, q in QUANT_CLASSES.items()}
    reverted = []
    for name, module in model.named_modules():
        if type(module) in float_of:
            module.__class__ = float_of[type(module)]
            del module.recipe
            reverted.append(name)
    return reverted
