"""One typed configuration of low-precision training and activation offload.

:class:`QuantConfig` is what the precision plugin (:class:`beamvq.quant.plugin.QuantPrecision`)
and the strategies that carry it take, as their single ``quant`` argument, so a YAML config
reads::

    trainer:
      strategy:
        class_path: beamvq.quant.plugin.FP8OffloadStrategy
        init_args:
          quant: {backend: simulate, fmt: e4m3, granularity: tensor, offload_alpha: null}

The formats, operand roles and scalings follow *Scaling Laws for Floating-Point Quantization
Training* (arXiv 2501.02423), the real-FP8 recipes torchao's ``torchao.float8``, the offload
MEMO (arXiv 2407.12117). Every field is checked when the config is built, before any training,
with a message naming its YAML key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from beamvq.quant.exmy import GRANULARITIES, SPECIALS, FloatFormat
from beamvq.quant.fp8 import RECIPES
from beamvq.quant.layers import ROLES, QuantRecipe, parse_targets

BACKENDS: tuple[str, ...] = ("simulate", "torchao", "none")

# where the fields sit in a LightningCLI config (the strategies' ``quant`` argument)
YAML_PREFIX = "trainer.strategy.init_args.quant"


def _key(name: str) -> str:
    return f"{YAML_PREFIX}.{name}"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{_key(name)} must be one of {choices}, got {value!r}")


def _check_patterns(name: str, patterns: list[str] | None) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{_key(name)} must be a list of regular expressions, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"{_key(name)}: {pattern!r} is no regular expression ({err})"
            ) from None


def _check_format(name: str, fmt: str, special_name: str, special: str) -> None:
    _check_choice(special_name, special, SPECIALS)
    try:
        FloatFormat.parse(fmt, special)
    except ValueError as err:
        raise ValueError(f"{_key(name)} (with {special_name}={special!r}): {err}") from None


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of GEMM operands (simulated ExMy or real FP8) and activation offload.

    Args:
        backend: ``"simulate"`` (ExMy fake quantization of Linear/Conv layers, any device),
            ``"torchao"`` (real FP8 Linear layers on GPUs with compute capability >= 8.9;
            elsewhere the simulated torchao recipe, with a logged warning), ``"none"``.
        fmt, special: format of X/W operands (``"e4m3"`` + ``"fn"`` is OCP E4M3, max 448;
            ``special="none"`` is the paper's convention, E4M3 max 480).
        grad_fmt, grad_special: format of dY operands (``None``: same as ``fmt``).
        targets: operand roles to quantize (``x, w, dy_dx, w_dx, dy_dw, x_dw``); ``None``: all.
        granularity: ``"none"``, ``"tensor"``, ``"channel"`` or ``"block"`` scaling.
        block_size: elements per scale for ``"block"``.
        scale_pow2: round scales down to powers of two.
        quantize_conv: also convert Conv/ConvTranspose layers; with ``"torchao"`` (which has no
            FP8 convolution) they run the simulated torchao recipe.
        torchao_recipe: ``"tensorwise"``, ``"rowwise"`` or ``"rowwise_with_gw_hp"``.
        include, exclude: regular expressions on qualified layer names.
        offload_alpha: fraction of each saved activation offloaded (rest recomputed);
            ``None`` disables offload (saved bytes are still counted).
        offload_modules: regular expressions selecting the modules whose calls may become
            offload frames (``None``: every module inside the backbone; the outermost one
            actually called becomes the frame).
        token_dim: axis along which ``offload_alpha`` splits a saved activation.
    """

    backend: str = "torchao"
    fmt: str = "e4m3"
    special: str = "fn"
    grad_fmt: str | None = "e5m2"
    grad_special: str = "ieee"
    targets: list[str] | None = None
    granularity: str = "tensor"
    block_size: int = 32
    scale_pow2: bool = False
    quantize_conv: bool = True
    torchao_recipe: str = "tensorwise"
    include: list[str] | None = None
    exclude: list[str] | None = None
    offload_alpha: float | None = 1.0
    offload_modules: list[str] | None = None
    token_dim: int = -2

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("torchao_recipe", self.torchao_recipe, RECIPES)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_format("fmt", self.fmt, "special", self.special)
        if self.grad_fmt is not None:
            _check_format("grad_fmt", self.grad_fmt, "grad_special", self.grad_special)
        try:
            parse_targets(self.targets)
        except ValueError:
            raise ValueError(
                f"{_key('targets')} must list roles of {ROLES} (or be 'all' / null), "
                f"got {self.targets!r}"
            ) from None
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"{_key('block_size')} must be an integer, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"{_key('block_size')} must be >= 1, got {self.block_size}")
        if isinstance(self.token_dim, bool) or not isinstance(self.token_dim, int):
            raise ValueError(f"{_key('token_dim')} must be an integer, got {self.token_dim!r}")
        alpha = self.offload_alpha
        if alpha is not None and not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"{_key('offload_alpha')} must be in [0, 1] or null, got {alpha}")
        for name in ("include", "exclude", "offload_modules"):
            _check_patterns(name, getattr(self, name))

    def recipe(self) -> QuantRecipe:
        """The per-operand recipe of the ``simulate`` backend."""
        return QuantRecipe.build(
            self.fmt,
            self.special,
            self.grad_fmt,
            self.grad_special,
            self.targets,
            self.granularity,
            self.block_size,
            self.scale_pow2,
        )
