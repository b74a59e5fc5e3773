"""The simulated torchao recipes, against references built from torch's own float8 casts.

Rowwise: every row of every GEMM operand (a slice along that GEMM's reduction axis) is scaled
by its own power of two, ``2^floor(log2(448 / absmax(row)))``, cast to E4M3 (OCP ``fn``) and
scaled back (torchao's ``rowwise`` recipe). The references here never call the quantizer: the
scales are computed in float64 and the rounding is ``torch.float8_e4m3fn``'s.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from beamvq.quant.exmy import FloatFormat, quantize
from beamvq.quant.fp8 import E4M3FN, simulated_recipe
from beamvq.quant.layers import QuantLinear

FP8_MAX = 448.0


def rows_reference(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Each slice along ``dim`` scaled by its own power of two, cast by torch, scaled back."""
    t64 = t.double()
    amax = t64.abs().amax(dim, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))
    # t * 2^k is exact in float32, so the only rounding is torch's float8 cast
    cast = (t * scale.float()).to(torch.float8_e4m3fn).double()
    return (cast / scale).to(t.dtype)


def _rows_of_mixed_magnitude(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    # rows from 1e-4 to 1e4: a per-tensor scale would flush the small ones
    magnitudes = torch.logspace(-4, 4, shape[0])
    return t * magnitudes.reshape(-1, *([1] * (t.dim() - 1)))


@pytest.mark.parametrize("dim", [-1, 0])
def test_rowwise_quantizer_scales_each_row_by_its_own_absmax(dim: int) -> None:
    x = _rows_of_mixed_magnitude((9, 33), seed=1)
    got = quantize(x, E4M3FN, "channel", dim=dim, scale_pow2=True)
    expected = rows_reference(x, dim)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # each row keeps its own largest magnitude up to E4M3's relative step (2^-3 / 2)
    ratio = got.abs().amax(dim) / x.abs().amax(dim)
    assert torch.all((ratio - 1).abs() <= 2.0**-4)
    # whereas one scale for the whole tensor flushes the smallest rows to zero
    tensorwise = quantize(x, E4M3FN, "tensor")
    assert (tensorwise == 0).sum() > (got == 0).sum()


def test_rowwise_quantizer_without_power_of_two_scales() -> None:
    x = _rows_of_mixed_magnitude((6, 20), seed=2)
    got = quantize(x, FloatFormat(4, 3, "fn"), "channel", dim=-1)
    scale = FP8_MAX / x.abs().amax(-1, keepdim=True)  # float32, as documented
    expected = (x * scale).to(torch.float8_e4m3fn).float() / scale
    assert torch.equal(got, expected)


def test_rowwise_linear_layer_equals_the_hand_computed_gemms() -> None:
    torch.manual_seed(0)
    x = _rows_of_mixed_magnitude((12, 16), seed=3)  # 12 tokens, K = 16
    layer = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 2, 8)[:, None])
    weight = layer.weight.detach().clone()
    dy = _rows_of_mixed_magnitude((12, 8), seed=4)
    QuantLinear.convert(layer, simulated_recipe("rowwise"))
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(dy)

    q = rows_reference
    # forward Y = X W^T, rows of X and of W along K
    y_ref = q(x, -1).double() @ q(weight, -1).double().t()
    # dX = dY W: rows of dY along the output features, columns of W along them too
    dx_ref = q(dy, -1).double() @ q(weight, 0).double()
    # dW = dY^T X: both along the tokens
    dw_ref = q(dy, 0).double().t() @ q(x, 0).double()
    for got, ref in ((y, y_ref), (xr.grad, dx_ref), (layer.weight.grad, dw_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    # and it is not the plain float GEMM
    assert not torch.allclose(y.double(), x.double() @ weight.double().t(), rtol=1e-3)


def test_rowwise_with_high_precision_weight_gradient() -> None:
    recipe = simulated_recipe("rowwise_with_gw_hp")
    assert recipe.dy_dw is None and recipe.x_dw is None  # dW stays in high precision
    assert recipe.w_dx.granularity == "tensor" and recipe.w_dx.scale_pow2
    torch.manual_seed(0)
    x = _rows_of_mixed_magnitude((10, 16), seed=5)
    layer = nn.Linear(16, 16, bias=False)
    weight = layer.weight.detach().clone()
    dy = torch.randn(10, 16)
    QuantLinear.convert(layer, recipe)
    xr = x.clone().requires_grad_()
    layer(xr).backward(dy)
    torch.testing.assert_close(layer.weight.grad, dy.t() @ x)
    # dX = rows(dY) @ W with one power-of-two scale for all of W
    w_scale = 2.0 ** math.floor(math.log2(FP8_MAX / weight.abs().max().item()))
    w_q = (weight * w_scale).to(torch.float8_e4m3fn).float() / w_scale
    dx_ref = rows_reference(dy, -1).double() @ w_q.double()
    torch.testing.assert_close(xr.grad.double(), dx_ref, rtol=1e-5, atol=1e-6)
