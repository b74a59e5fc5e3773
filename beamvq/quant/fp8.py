"""Real FP8 training through torchao, and its faithful simulation elsewhere.

torchao's ``convert_to_float8_training`` (https://github.com/pytorch/ao, ``torchao.float8``)
swaps ``nn.Linear`` layers for ``Float8Linear``, whose GEMMs run in FP8 on GPUs of compute
capability >= 8.9 (Ada, Hopper, Blackwell). Only Linear layers whose in/out features are
divisible by 16 are swapped (the FP8 GEMM's alignment rule); convolutions stay in the layer's
precision. torchao is imported lazily and is optional (``pip install beamvq[fp8]``).

Where real FP8 is not possible (no CUDA, an older GPU, torchao missing) :func:`convert_float8`
logs a warning saying why and converts the same layers to the simulated recipe below, which
mirrors torchao's casts: dynamic scales ``FPmax / amax``, saturating E4M3 (max 448) for X and W,
E5M2 for dY in the tensorwise recipe; row-wise (per-row of each GEMM operand) power-of-two
scales and E4M3 everywhere in the rowwise recipe; high-precision dW in ``rowwise_with_gw_hp``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence

import torch
from torch import nn

from beamvq.quant.convert import ConversionReport, convert_to_quantized, name_filter, walk_layers
from beamvq.quant.exmy import FloatFormat
from beamvq.quant.layers import OperandSpec, QuantRecipe

log = logging.getLogger(__name__)

RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FP8_ALIGNMENT = 16

E4M3FN = FloatFormat(4, 3, "fn")
E5M2 = FloatFormat(5, 2, "ieee")


def simulated_recipe(recipe: str) -> QuantRecipe:
    """The ExMy simulation of a torchao float8 recipe (same formats, roles and scalings)."""
    if recipe == "tensorwise":
        fwd = OperandSpec(E4M3FN, "tensor")
        grad = OperandSpec(E5M2, "tensor")
        return QuantRecipe(x=fwd, w=fwd, dy_dx=grad, w_dx=fwd, dy_dw=grad, x_dw=fwd)
    row = OperandSpec(E4M3FN, "channel", scale_pow2=True)
    if recipe == "rowwise":
        return QuantRecipe(x=row, w=row, dy_dx=row, w_dx=row, dy_dw=row, x_dw=row)
    if recipe == "rowwise_with_gw_hp":
        w_dx = OperandSpec(E4M3FN, "tensor", scale_pow2=True)
        return QuantRecipe(x=row, w=row, dy_dx=row, w_dx=w_dx)
    raise ValueError(f"unknown float8 recipe {recipe!r}; choose from {RECIPES}")


def float8_unavailable_reason(device: torch.device) -> str | None:
    """Why real FP8 training cannot run on ``device`` (``None`` when it can)."""
    if device.type != "cuda":
        return f"the device is {device.type}, real FP8 GEMMs need CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} < 8.9"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'beamvq[fp8]')"
    return None


def _float8_layers(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], list[str], list[str]]:
    """(eligible, in_bottleneck, filtered) qualified names of plain ``nn.Linear`` layers."""
    accept = name_filter(include, exclude)
    eligible, skipped, filtered = [], [], []
    for name, layer, in_bottleneck in walk_layers(model, (nn.Linear,)):
        assert isinstance(layer, nn.Linear)
        aligned = layer.in_features % FP8_ALIGNMENT == 0 and layer.out_features % FP8_ALIGNMENT == 0
        if in_bottleneck:
            skipped.append(name)
        elif accept(name) and aligned:
            eligible.append(name)
        else:
            filtered.append(name)
    return eligible, skipped, filtered


def convert_torchao_float8(
    model: nn.Module,
    recipe: str = "tensorwise",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    emulate: bool = False,
) -> ConversionReport:
    """Swap eligible Linear layers to torchao ``Float8Linear`` in place.

    ``emulate=True`` is torchao's own CPU emulation of the FP8 GEMM (for testing the path).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; choose from {RECIPES}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    eligible, skipped, filtered = _float8_layers(model, include, exclude)
    chosen = set(eligible)
    convert_to_float8_training(
        model, module_filter_fn=lambda module, fqn: fqn in chosen, config=config
    )
    report = ConversionReport(f"torchao-{recipe}", eligible, skipped, filtered)
    log.info("torchao float8 conversion: %s", report.summary())
    return report


def convert_float8(
    model: nn.Module,
    device: torch.device,
    recipe: str = "tensorwise",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    simulate_conv: bool = False,
) -> ConversionReport:
    """Real FP8 (torchao) where ``device`` supports it, else the simulated recipe, with a warning.

    ``simulate_conv``: torchao has no FP8 convolution; also convert Conv layers to the simulated
    recipe, so that convolutional backbones train in (simulated) FP8 as well.
    """
    sim = simulated_recipe(recipe)
    reason = float8_unavailable_reason(device)
    if reason is None:
        report = convert_torchao_float8(model, recipe, include, exclude)
    else:
        log.warning(
            "Real FP8 training is not available (%s); simulating the torchao %s recipe (%s) "
            "instead.",
            reason,
            recipe,
            sim.describe(),
        )
        report = convert_to_quantized(
            model, sim, include, exclude, linear=True, conv=False, divisible_by=FP8_ALIGNMENT
        )._replace(backend=f"simulated-{recipe}")
    if not simulate_conv:
        return report
    conv = convert_to_quantized(model, sim, include, exclude, linear=False, conv=True)
    if conv.converted:
        log.info("Convolutions in simulated FP8 (%s): %s", recipe, conv.converted)
    return ConversionReport(
        f"{report.backend}+simulated-conv",
        report.converted + conv.converted,
        list(dict.fromkeys(report.skipped_bottleneck + conv.skipped_bottleneck)),
        list(dict.fromkeys(report.filtered + conv.filtered)),
    )
