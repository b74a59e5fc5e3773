"""Low-precision training for beamvq: ExMy fake quantization, real FP8, activation offload.

Importing this package registers the Lightning strategy names ``fp8_offload``,
``fp8_offload_ddp`` and ``fp8_offload_ddp_spawn`` (see :mod:`beamvq.quant.plugin`).
References: Scaling Laws for Floating-Point Quantization Training (arXiv 2501.02423) for the
formats and the law, MEMO (arXiv 2407.12117) for the offload.
"""

from beamvq.quant.config import QuantConfig
from beamvq.quant.convert import ConversionReport, convert_to_quantized, revert_quantized
from beamvq.quant.exmy import FloatFormat, fake_quantize, quantize, round_to_format
from beamvq.quant.fp8 import convert_float8, simulated_recipe
from beamvq.quant.layers import OperandSpec, QuantLinear, QuantRecipe
from beamvq.quant.offload import ActivationOffload, OffloadStats
from beamvq.quant.plugin import (
    FP8OffloadDDPStrategy,
    FP8OffloadStrategy,
    QuantPrecision,
    QuantStatsLogger,
    register_strategies,
)

register_strategies()

__all__ = [
    "ActivationOffload",
    "ConversionReport",
    "FP8OffloadDDPStrategy",
    "FP8OffloadStrategy",
    "FloatFormat",
    "OffloadStats",
    "OperandSpec",
    "QuantConfig",
    "QuantLinear",
    "QuantPrecision",
    "QuantRecipe",
    "QuantStatsLogger",
    "convert_float8",
    "convert_to_quantized",
    "fake_quantize",
    "quantize",
    "register_strategies",
    "revert_quantized",
    "round_to_format",
    "simulated_recipe",
]
