"""Quantized Linear/Conv layers (per-operand roles) and in-place model conversion."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beamvq.bottleneck import VQBottleneck as VQBottleneckClass
from beamvq.quant.convert import convert_to_quantized, is_bottleneck, revert_quantized
from beamvq.quant.exmy import FloatFormat, quantize
from beamvq.quant.layers import (
    ROLES,
    OperandSpec,
    QuantConv2d,
    QuantLinear,
    QuantRecipe,
    parse_targets,
)

# float64 "quantization" that changes nothing: the layers must then equal the float ones
IDENTITY = QuantRecipe.build("e11m52", "ieee", None, "ieee", None, "tensor")
E2M1 = OperandSpec(FloatFormat(2, 1), "block", 4)


def _grads(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


LAYERS: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.Linear(6, 4), (2, 7, 6)),
    (lambda: nn.Linear(6, 4, bias=False), (6,)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 8)),
    (
        lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect", groups=2, dilation=2),
        (3, 4, 11),
    ),
    (lambda: nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), (2, 2, 3, 5, 5)),
    (lambda: nn.Conv2d(3, 4, 3), (3, 7, 7)),  # unbatched
    (lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1), (2, 3, 6, 5)),
    (lambda: nn.ConvTranspose1d(4, 2, 3, groups=2), (2, 4, 7)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_identity_recipe_equals_float_layer(make: Callable[[], nn.Module], shape: tuple) -> None:
    torch.manual_seed(0)
    ref = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        dy = torch.randn_like(ref(x))
    y_ref, g_ref = _grads(ref, x, dy)
    quant = copy.deepcopy(ref)
    quant.zero_grad()
    report = convert_to_quantized(quant, IDENTITY)
    assert report.converted == [""] and type(quant).__name__.startswith("Quant")
    y, g = _grads(quant, x, dy)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def _only(role: str) -> QuantRecipe:
    return QuantRecipe(**{role: E2M1})


def test_each_linear_role_quantizes_its_own_operand() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    dy = torch.randn(5, 3, dtype=torch.float64)

    def q(t: torch.Tensor, dim: int) -> torch.Tensor:
        return quantize(t, E2M1.fmt, "block", 4, dim)

    expected = {
        # role: (y, grad_x, grad_w) in terms of quantized / raw operands
        "x": (q(x, -1) @ w.t(), dy @ w, dy.t() @ x),
        "w": (x @ q(w, -1).t(), dy @ w, dy.t() @ x),
        "dy_dx": (x @ w.t(), q(dy, -1) @ w, dy.t() @ x),
        "w_dx": (x @ w.t(), dy @ q(w, 0), dy.t() @ x),
        "dy_dw": (x @ w.t(), dy @ w, q(dy, 0).t() @ x),
        "x_dw": (x @ w.t(), dy @ w, dy.t() @ q(x, 0)),
    }
    for role in ROLES:
        layer = nn.Linear(8, 3, bias=False).double()
        layer.weight.data.copy_(w)
        QuantLinear.convert(layer, _only(role))
        y, (gx, gw) = _grads(layer, x, dy)
        ey, egx, egw = expected[role]
        assert torch.allclose(y, ey, atol=1e-12), role
        assert torch.allclose(gx, egx, atol=1e-12), role
        assert torch.allclose(gw, egw, atol=1e-12), role
        # the quantized operand really differs from the raw one
        assert not torch.allclose(
            torch.stack([y.sum(), gx.sum(), gw.sum()]),
            torch.stack([(x @ w.t()).sum(), (dy @ w).sum(), (dy.t() @ x).sum()]),
        )


def test_conv_roles_against_autograd_on_quantized_operands() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False).double()
    dy = torch.randn(2, 4, 6, 6, dtype=torch.float64)

    def q(t: torch.Tensor, dim: int) -> torch.Tensor:
        return quantize(t, E2M1.fmt, "block", 4, dim)

    for role, xs, ws_fwd, ws_dx, dys in [
        ("x", q(x, 1), conv.weight, conv.weight, dy),
        ("w", x, q(conv.weight, 1), conv.weight, dy),
        ("w_dx", x, conv.weight, q(conv.weight, 0), dy),
        ("dy_dx", x, conv.weight, conv.weight, q(dy, 1)),
    ]:
        layer = copy.deepcopy(conv)
        QuantConv2d.convert(layer, _only(role))
        y, (gx, gw) = _grads(layer, x, dy)
        assert torch.allclose(y, F.conv2d(xs, ws_fwd, padding=1), atol=1e-12), role
        xr = x.clone().requires_grad_()
        F.conv2d(xr, ws_dx.detach(), padding=1).backward(dys)
        assert torch.allclose(gx, xr.grad, atol=1e-12), role
    # dW roles: dW = conv_weight_grad(q(x), q(dy))
    for role in ("x_dw", "dy_dw"):
        layer = copy.deepcopy(conv)
        QuantConv2d.convert(layer, _only(role))
        _, (_, gw) = _grads(layer, x, dy)
        xs = q(x, 1) if role == "x_dw" else x
        dys = q(dy, 1) if role == "dy_dw" else dy
        wr = conv.weight.detach().clone().requires_grad_()
        F.conv2d(xs, wr, padding=1).backward(dys)
        assert torch.allclose(gw, wr.grad, atol=1e-12), role


def test_recipe_build_and_targets() -> None:
    recipe = QuantRecipe.build("e4m3", "fn", "e5m2", "ieee", ["w", "dy_dx"], "block", 16)
    assert recipe.x is None and recipe.w is not None and recipe.dy_dx is not None
    assert recipe.w.fmt == FloatFormat(4, 3, "fn") and recipe.dy_dx.fmt == FloatFormat(5, 2, "ieee")
    assert recipe.w.block_size == 16
    assert parse_targets(None) == ROLES == parse_targets(["all"])
    assert QuantRecipe().is_identity
    with pytest.raises(ValueError, match="unknown operand"):
        parse_targets(["x", "dx"])
    with pytest.raises(ValueError, match="granularity"):
        QuantRecipe.build(granularity="row")


class VQBottleneck(nn.Module):
    """Stand-in with the real class's name (conversion must skip it by class)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.bottleneck = nn.Sequential(nn.Linear(4, 4))  # skipped by name
        self.codes = VQBottleneck()  # skipped by class name
        self.head = nn.Linear(4, 2)
        self.attn = nn.MultiheadAttention(4, 1)  # out_proj is a Linear subclass: not touched


def test_conversion_in_place_skips_bottleneck_and_filters() -> None:
    model = Toy()
    params = {n: p for n, p in model.named_parameters()}
    state_keys = set(model.state_dict())
    alias = model.backbone[0]
    report = convert_to_quantized(model, QuantRecipe.build(), exclude=[r"^head$"])
    assert report.converted == ["backbone.0", "backbone.2"]
    assert report.skipped_bottleneck == ["bottleneck.0", "codes.proj"]
    assert report.filtered == ["head"]
    assert isinstance(model.backbone[0], QuantConv2d) and alias is model.backbone[0]
    assert type(model.bottleneck[0]) is nn.Linear and type(model.codes.proj) is nn.Linear
    assert type(model.head) is nn.Linear
    assert type(model.attn.out_proj) is not QuantLinear
    # same parameter objects (optimizers keep working), same checkpoint keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(model.state_dict()) == state_keys
    # idempotent; include filter
    again = convert_to_quantized(model, QuantRecipe.build(), include=[r"backbone\.2"])
    assert again.converted == ["backbone.2"] and "backbone.0" in again.filtered
    assert revert_quantized(model) == ["backbone.0", "backbone.2"]
    assert type(model.backbone[0]) is nn.Conv2d


def test_real_bottleneck_class_is_recognised() -> None:
    cls = VQBottleneckClass
    fake = cls.__new__(cls)
    assert is_bottleneck(fake, "anything")
    assert is_bottleneck(nn.Linear(2, 2), "model.bottleneck.inner")
    assert not is_bottleneck(nn.Linear(2, 2), "model.backbone.inner")
