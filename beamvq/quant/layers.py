"""Linear and convolution layers that fake-quantize chosen GEMM operands.

A layer computes ``Y = X W``; training needs three GEMMs and six operands (Scaling Laws for
Floating-Point Quantization Training, arXiv 2501.02423, Fig. 1):

======  =============================  ===============
role    GEMM                           reduction axis
======  =============================  ===============
x       forward  Y  = X  W             input features
w       forward  Y  = X  W             input features
dy_dx   backward dX = dY W^T           output features
w_dx    backward dX = dY W^T           output features
dy_dw   backward dW = X^T dY           tokens
x_dw    backward dW = X^T dY           tokens
======  =============================  ===============

Every role has its own optional :class:`OperandSpec` (format, scaling granularity, block
size), so the paper's settings (e.g. W in both uses and X for dW) and hardware FP8 recipes
(E4M3 for X/W, E5M2 for dY) are both expressible. A custom autograd function quantizes the
operands of each GEMM and computes it in the layer's precision; bias and its gradient stay in
high precision, as in torchao's float8 training.

Channel and block scales run along each operand's reduction axis (per-row scaling of the GEMM
operand, MX-style blocks along K). For convolutions the channel axis stands in for the
reduction axis in every role (the true reduction of dW also runs over batch and space); with
``"tensor"`` or ``"none"`` scaling the axis does not matter.

Conversion (:mod:`beamvq.quant.convert`) swaps the class of an existing ``nn.Linear`` /
``nn.ConvNd`` / ``nn.ConvTransposeNd`` in place, so parameters, hooks and every reference to
the module stay valid; the recipe is a plain attribute, not part of the ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from beamvq.quant.exmy import GRANULARITIES, FloatFormat, quantize

ROLES: tuple[str, ...] = ("x", "w", "dy_dx", "w_dx", "dy_dw", "x_dw")
GRAD_ROLES: tuple[str, ...] = ("dy_dx", "dy_dw")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized."""

    fmt: FloatFormat
    granularity: str = "tensor"
    block_size: int = 32
    scale_pow2: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def __call__(self, t: Tensor, dim: int) -> Tensor:
        return quantize(t, self.fmt, self.granularity, self.block_size, dim, self.scale_pow2)

    def describe(self) -> str:
        scaling = self.granularity
        if self.granularity == "block":
            scaling = f"block{self.block_size}"
        return f"{self.fmt.name}/{scaling}{'/pow2' if self.scale_pow2 else ''}"


@dataclass(frozen=True)
class QuantRecipe:
    """Which of the six GEMM operands are quantized, and how (``None``: kept in full precision)."""

    x: OperandSpec | None = None
    w: OperandSpec | None = None
    dy_dx: OperandSpec | None = None
    w_dx: OperandSpec | None = None
    dy_dw: OperandSpec | None = None
    x_dw: OperandSpec | None = None

    @classmethod
    def build(
        cls,
        fmt: str = "e4m3",
        special: str = "fn",
        grad_fmt: str | None = "e5m2",
        grad_special: str = "ieee",
        targets: Sequence[str] | None = None,
        granularity: str = "tensor",
        block_size: int = 32,
        scale_pow2: bool = False,
    ) -> QuantRecipe:
        """One format for X/W operands, one (``grad_fmt``, default ``fmt``) for dY operands.

        ``targets``: role names from :data:`ROLES`, or ``"all"``; ``None`` means all six.
        """
        roles = parse_targets(targets)
        main = FloatFormat.parse(fmt, special)
        grad = FloatFormat.parse(grad_fmt, grad_special) if grad_fmt is not None else main
        specs: dict[str, OperandSpec] = {}
        for role in roles:
            specs[role] = OperandSpec(
                grad if role in GRAD_ROLES else main, granularity, block_size, scale_pow2
            )
        return cls(**specs)

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def shared(self, role_a: str, role_b: str, same_dim: bool) -> bool:
        """Whether ``role_b`` can reuse ``role_a``'s quantized tensor (same spec and scales)."""
        spec = getattr(self, role_a)
        return (
            spec is not None
            and spec == getattr(self, role_b)
            and (same_dim or spec.granularity in ("tensor", "none"))
        )

    def apply(self, role: str, t: Tensor, dim: int) -> Tensor:
        spec: OperandSpec | None = getattr(self, role)
        return t if spec is None else spec(t, dim)

    def describe(self) -> str:
        parts = [
            f"{f.name}={getattr(self, f.name).describe()}"
            for f in fields(self)
            if getattr(self, f.name) is not None
        ]
        return ", ".join(parts) if parts else "identity"


def parse_targets(targets: Sequence[str] | None) -> tuple[str, ...]:
    """Validate operand role names; ``None`` or ``["all"]`` select all six."""
    if targets is None:
        return ROLES
    names = [targets] if isinstance(targets, str) else list(targets)
    if names == ["all"]:
        return ROLES
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise ValueError(f"unknown operand targets {unknown}; choose from {ROLES} or 'all'")
    return tuple(r for r in ROLES if r in names)


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, recipe: QuantRecipe
    ) -> Tensor:
        ctx.recipe = recipe
        ctx.has_bias = bias is not None
        x_q = recipe.apply("x", x, -1)
        # backward quantizes the raw operands for its own GEMMs, unless the forward's quantized
        # X is identical to what dW needs (same spec, scales independent of the axis)
        ctx.reuse_x = recipe.shared("x", "x_dw", same_dim=False)
        ctx.save_for_backward(x_q if ctx.reuse_x else x, weight)
        return F.linear(x_q, recipe.apply("w", weight, -1), bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        recipe: QuantRecipe = ctx.recipe
        grad_x = grad_w = grad_b = None
        dy_dx = recipe.apply("dy_dx", dy, -1)
        if ctx.needs_input_grad[0]:
            w_q = recipe.apply("w_dx", weight, 0).to(dy.dtype)
            grad_x = (dy_dx @ w_q).to(x.dtype)
        dy_rows = rearrange(dy, "... o -> (...) o")
        if ctx.needs_input_grad[1]:
            x_rows = rearrange(x, "... i -> (...) i").to(dy.dtype)
            if recipe.shared("dy_dx", "dy_dw", same_dim=False):
                dy_q = rearrange(dy_dx, "... o -> (...) o")
            else:
                dy_q = recipe.apply("dy_dw", dy_rows, 0)
            x_q = x_rows if ctx.reuse_x else recipe.apply("x_dw", x_rows, 0)
            grad_w = (dy_q.t() @ x_q).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy_rows.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


class _QuantConvFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        recipe: QuantRecipe,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        transposed: bool,
        output_padding: list[int],
        groups: int,
    ) -> Tensor:
        ctx.recipe = recipe
        ctx.conv = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        x_q = recipe.apply("x", x, 1)
        # every activation/gradient role scales along the channel axis: dW can reuse X's
        ctx.reuse_x = recipe.shared("x", "x_dw", same_dim=True)
        ctx.save_for_backward(x_q if ctx.reuse_x else x, weight)
        # weight layout: (out, in/g, k...) for conv, (in, out/g, k...) for transposed conv;
        # its input-channel axis is the forward reduction axis
        w_q = recipe.apply("w", weight, 0 if transposed else 1)
        return torch.ops.aten.convolution(
            x_q, w_q, bias, stride, padding, dilation, transposed, output_padding, groups
        )

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        recipe: QuantRecipe = ctx.recipe
        stride, padding, dilation, transposed, output_padding, groups = ctx.conv
        grad_x = grad_w = grad_b = None
        common = (stride, padding, dilation, transposed, output_padding, groups)
        dy_dx = recipe.apply("dy_dx", dy, 1)
        if ctx.needs_input_grad[0]:
            w_q = recipe.apply("w_dx", weight, 1 if transposed else 0).to(dy.dtype)
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                dy_dx, x.to(dy.dtype), w_q, None, *common, [True, False, False]
            )
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dy_q = dy_dx if recipe.shared("dy_dx", "dy_dw", same_dim=True) else None
            if dy_q is None:
                dy_q = recipe.apply("dy_dw", dy, 1)
            x_q = x if ctx.reuse_x else recipe.apply("x_dw", x, 1)
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                dy_q, x_q.to(dy.dtype), weight.to(dy.dtype), None, *common, [False, True, False]
            )
            grad_w = grad_w.to(weight.dtype)
        if ctx.bias_sizes is not None and ctx.needs_input_grad[2]:
            grad_b = dy.sum(dim=[d for d in range(dy.dim()) if d != 1]).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose GEMM operands are fake-quantized by ``recipe``."""

    recipe: QuantRecipe

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        recipe: QuantRecipe | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else QuantRecipe()

    @classmethod
    def convert(cls, module: nn.Linear, recipe: QuantRecipe) -> QuantLinear:
        """Turn ``module`` itself into a :class:`QuantLinear` (same object, same parameters)."""
        module.__class__ = cls
        module.recipe = recipe
        return module  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        if self.recipe.is_identity:
            return F.linear(input, self.weight, self.bias)
        return _QuantLinearFn.apply(input, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe=({self.recipe.describe()})"


class _QuantConvMixin:
    """Shared by the six quantized convolution classes; ``_spatial`` and ``_transposed``."""

    _spatial: int
    _transposed: bool
    recipe: QuantRecipe

    @classmethod
    def convert(cls, module: nn.modules.conv._ConvNd, recipe: QuantRecipe) -> nn.Module:
        """Turn ``module`` itself into the quantized class (same object, same parameters)."""
        module.__class__ = cls
        module.recipe = recipe  # type: ignore[attr-defined]
        return module

    def _quant_conv(self, input: Tensor, output_padding: Sequence[int]) -> Tensor:
        conv: nn.modules.conv._ConvNd = self  # type: ignore[assignment]
        batched = input.dim() == self._spatial + 2
        x = input if batched else input.unsqueeze(0)
        padding = list(conv.padding) if not isinstance(conv.padding, str) else None
        if conv.padding_mode != "zeros" or padding is None:
            # non-zero padding modes and 'same'/'valid' strings: pad explicitly (possibly
            # asymmetric for 'same' with even kernels), as nn.ConvNd does
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = [0] * self._spatial
        y = _QuantConvFn.apply(
            x,
            conv.weight,
            conv.bias,
            self.recipe,
            list(conv.stride),
            padding,
            list(conv.dilation),
            self._transposed,
            list(output_padding),
            conv.groups,
        )
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe=({self.recipe.describe()})"  # type: ignore[misc]


class _QuantConvForward(_QuantConvMixin):
    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.recipe.is_identity:
            return super()._conv_forward(input, weight, bias)  # type: ignore[misc]
        return self._quant_conv(input, [0] * self._spatial)


class _QuantConvTransposeForward(_QuantConvMixin):
    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.recipe.is_identity:
            return super().forward(input, output_size)  # type: ignore[misc]
        conv: nn.modules.conv._ConvTransposeNd = self  # type: ignore[assignment]
        if conv.padding_mode != "zeros":
            raise ValueError(f"only 'zeros' padding is supported for {type(self).__name__}")
        output_padding = conv._output_padding(
            input,
            output_size,
            list(conv.stride),
            list(conv.padding),  # type: ignore[arg-type]
            list(conv.kernel_size),
            self._spatial,
            list(conv.dilation),
        )
        return self._quant_conv(input, output_padding)


class QuantConv1d(_QuantConvForward, nn.Conv1d):
    _spatial, _transposed = 1, False


class QuantConv2d(_QuantConvForward, nn.Conv2d):
    _spatial, _transposed = 2, False


class QuantConv3d(_QuantConvForward, nn.Conv3d):
    _spatial, _transposed = 3, False


class QuantConvTranspose1d(_QuantConvTransposeForward, nn.ConvTranspose1d):
    _spatial, _transposed = 1, True


class QuantConvTranspose2d(_QuantConvTransposeForward, nn.ConvTranspose2d):
    _spatial, _transposed = 2, True


class QuantConvTranspose3d(_QuantConvTransposeForward, nn.ConvTranspose3d):
    _spatial, _transposed = 3, True


# exact float classes that conversion swaps (subclasses may change forward semantics)
QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}
