"""Argument checks shared by every class a YAML configuration names, run before any work.

Each check raises one ``ValueError`` saying ``<key> must be <rule>, got <value>``, where ``key``
names the argument as the user writes it in YAML: ``model.candidate_k``,
``SimVPv2: model.backbone.init_args.hid_s`` (:func:`backbone_key`),
``model.bottleneck.init_args.decay`` (:data:`BOTTLENECK`), or, for classes that may sit anywhere
in a configuration (callbacks, scorers), the class and its ``init_args`` key
(:func:`init_arg`: ``ForecastImageLogger: init_args.dpi``). Raised in a constructor, jsonargparse
reports it while building the configuration, before the Trainer starts; the checks that need two
objects (a callback and the module, a scorer and the data) run in ``setup`` hooks, before the
first batch. A check only raises: a valid value passes unchanged (no conversion, no rounding).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from functools import partial
from typing import Any

__all__ = [
    "BACKBONE",
    "BOTTLENECK",
    "at_least",
    "at_most",
    "backbone_key",
    "check_earthformer_arguments",
    "check_module_arguments",
    "check_scorer_channels",
    "finite",
    "fraction",
    "init_arg",
    "int_list",
    "non_negative",
    "non_negative_int",
    "odd_int",
    "one_of",
    "positive",
    "positive_int",
]

BACKBONE = "model.backbone.init_args"
BOTTLENECK = "model.bottleneck.init_args"


def backbone_key(who: str, name: str) -> str:
    """``"SimVPv2: model.backbone.init_args.hid_s"``: a backbone argument (inside ``TwoStage``
    the base's arguments sit under ``model.backbone.init_args.base.init_args``)."""
    return f"{who}: {BACKBONE}.{name}"


def init_arg(who: str, name: str) -> str:
    """``"ForecastImageLogger: init_args.dpi"``: an argument of a class that a configuration may
    name in several places (``trainer.callbacks``, a ``scorer``)."""
    return f"{who}: init_args.{name}"


def _fail(key: str, rule: str, value: Any) -> None:
    raise ValueError(f"{key} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def at_least(key: str, value: Any, low: int, *, optional: bool = False) -> None:
    """An integer ``>= low`` (``None`` too when ``optional``)."""
    if value is None and optional:
        return
    tail = " or null" if optional else ""
    if not _is_int(value):
        _fail(key, f"an integer >= {low}{tail}", value)
    if value < low:
        _fail(key, f">= {low}{tail}", value)


def positive_int(key: str, value: Any, *, optional: bool = False) -> None:
    """An integer ``>= 1`` (``None`` too when ``optional``)."""
    at_least(key, value, 1, optional=optional)


def non_negative_int(key: str, value: Any, *, optional: bool = False) -> None:
    """An integer ``>= 0`` (``None`` too when ``optional``)."""
    at_least(key, value, 0, optional=optional)


def odd_int(key: str, value: Any) -> None:
    """An odd integer ``>= 1`` (a kernel size whose padding keeps the grid)."""
    if not _is_int(value) or value < 1 or value % 2 == 0:
        _fail(key, "an odd integer >= 1", value)


def _range_rule(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The rule in words: ``in [0, 1)``, ``> 0``, ``a finite number``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return "a finite number"


def _outside(
    value: float, low: float | None, high: float | None, lo_open: bool, hi_open: bool
) -> bool:
    below = low is not None and (value <= low if lo_open else value < low)
    above = high is not None and (value >= high if hi_open else value > high)
    return below or above


def _number(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    if value is None and optional:
        return
    rule = _range_rule(low, high, low_open, high_open) + (" or null" if optional else "")
    if not _is_real(value) or not math.isfinite(value):
        _fail(key, rule if rule.startswith("a ") else f"a finite number {rule}", value)
    if _outside(value, low, high, low_open, high_open):
        _fail(key, rule, value)


def finite(key: str, value: Any, *, optional: bool = False) -> None:
    """A finite number (``None`` too when ``optional``)."""
    _number(key, value, optional=optional)


def positive(key: str, value: Any, *, optional: bool = False) -> None:
    """A finite number ``> 0``."""
    _number(key, value, 0.0, low_open=True, optional=optional)


def non_negative(key: str, value: Any, *, optional: bool = False) -> None:
    """A finite number ``>= 0``."""
    _number(key, value, 0.0, optional=optional)


def fraction(key: str, value: Any, *, below_one: bool = False, optional: bool = False) -> None:
    """A number in ``[0, 1]`` (``[0, 1)`` with ``below_one``: a dropout or drop-path rate)."""
    _number(key, value, 0.0, 1.0, high_open=below_one, optional=optional)


def one_of(key: str, value: Any, choices: Collection[Any]) -> None:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def int_list(key: str, values: Any, low: int = 1) -> None:
    """A non-empty list of integers, each ``>= low``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        _fail(key, f"a non-empty list of integers >= {low}", values)
    if not all(_is_int(v) and v >= low for v in values):
        _fail(key, f"a non-empty list of integers >= {low}", list(values))


def at_most(key: str, value: Any, limit_key: str, limit: Any, why: str = "") -> None:
    """``value <= limit``, where ``limit`` is another argument's value (an inconsistent pair:
    ``model.candidate_k = 600 is larger than model.bottleneck.init_args.codebook_size = 512``)."""
    if value > limit:
        tail = f" ({why})" if why else ""
        raise ValueError(f"{key} = {value} is larger than {limit_key} = {limit}{tail}")


# -- ForecastModule (beamvq.module): its arguments against each other and its model --------------
def check_module_arguments(
    model: Any,
    rollout_steps: Any,
    candidate_k: Any,
    loss: Any,
    ensemble: Any,
    csi_thresholds: Sequence[Any] | None,
) -> None:
    """The ``model.*`` arguments of ``ForecastModule`` once its ``VQForecaster`` is built (the
    code bank's size is known then): each one, and the pairs that must agree."""
    positive_int("model.rollout_steps", rollout_steps)
    positive_int("model.candidate_k", candidate_k)
    bottleneck = model.bottleneck
    if loss.candidate_weight > 0 and bottleneck is None:
        raise ValueError(
            "model.loss.candidate_weight > 0 needs a model.bottleneck (the candidates come "
            "from its code bank)"
        )
    if loss.candidate_weight > 0 and loss.candidate_loss == "crps" and candidate_k < 2:
        raise ValueError(
            f"model.loss.candidate_loss = 'crps' needs model.candidate_k >= 2 (the CRPS of an "
            f"ensemble of one member is undefined), got model.candidate_k = {candidate_k}"
        )
    ensemble.check(candidate_k, rollout_steps, bottleneck is not None)
    if bottleneck is not None:
        size_key = f"{BOTTLENECK}.codebook_size"
        size = int(bottleneck.codebook_size)
        at_most("model.candidate_k", candidate_k, size_key, size, "each candidate is another code")
        if ensemble.beam_width == 0:
            # the members are the rank-aligned code-bank rollouts: one code each
            at_most("model.ensemble.members", ensemble.members, size_key, size, "one code each")
    for i, threshold in enumerate(csi_thresholds or ()):
        finite(f"model.csi_thresholds[{i}]", threshold)
    check_scorer_channels(
        ensemble.scorer, int(model.backbone.out_channels), "model.ensemble.scorer"
    )


def check_scorer_channels(scorer: Any, channels: int, where: str) -> None:
    """The channels ``scorer`` reads (``beamvq.metrics.Scorer.check_channels``) exist among the
    data's ``channels``; ``where`` is the scorer's YAML key. Nothing for ``None``."""
    check = getattr(scorer, "check_channels", None)
    if callable(check):
        check(channels, where)


# -- Earthformer (beamvq.backbones.earthformer, long already; its structural checks, such as the
# level widths against num_heads, stay beside the code they protect) ------------------------------
def check_earthformer_arguments(
    name: str,
    height: Any,
    width: Any,
    base_units: Any,
    num_heads: Any,
    enc_depth: Sequence[Any],
    dec_depth: Sequence[Any],
    num_global_vectors: Any,
    downsample: Any,
    stem_dims: Sequence[Any] | None,
    stem_downscales: Sequence[Any],
    stem_convs: Any,
    cuboid_sizes: Sequence[Sequence[Any]] | None,
    shift_sizes: Sequence[Sequence[Any]] | None,
    cross_cuboid_hw: Sequence[Any],
    drops: dict[str, Any],
) -> None:
    """Each argument on its own: positive widths, depths and factors, rates in [0, 1]."""
    key = partial(backbone_key, name)
    for arg, value in (
        ("height", height), ("width", width), ("base_units", base_units),
        ("num_heads", num_heads), ("downsample", downsample), ("stem_convs", stem_convs),
    ):  # fmt: skip
        positive_int(key(arg), value)
    non_negative_int(key("num_global_vectors"), num_global_vectors)
    int_list(key("enc_depth"), enc_depth)
    int_list(key("dec_depth"), dec_depth)
    int_list(key("stem_downscales"), stem_downscales)
    if stem_dims is not None:
        int_list(key("stem_dims"), stem_dims)
    if cuboid_sizes is not None:
        if len(cuboid_sizes) == 0:
            raise ValueError(f"{key('cuboid_sizes')} must list one (t, h, w) per layer, got []")
        for i, size in enumerate(cuboid_sizes):
            int_list(key(f"cuboid_sizes[{i}]"), size)
    for i, shift in enumerate(shift_sizes or ()):
        int_list(key(f"shift_sizes[{i}]"), shift, low=0)
    int_list(key("cross_cuboid_hw"), cross_cuboid_hw)
    if len(cross_cuboid_hw) != 2:
        raise ValueError(
            f"{key('cross_cuboid_hw')} must be two sizes (kh, kw), got {list(cross_cuboid_hw)}"
        )
    for arg, rate in drops.items():
        fraction(key(arg), rate)
