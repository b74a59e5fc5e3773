"""ExMy quantizer: bit-exact against torch's FP8 casts and an enumeration reference."""

from __future__ import annotations

import math

import pytest
import torch

from beamvq.quant.exmy import (
    FloatFormat,
    _round_exact,
    fake_quantize,
    quantize,
    representable_values,
    round_to_format,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


def _spread(n: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    """Random float32 values over binades 2^lo .. 2^hi, both signs, plus exact ties."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g) + 0.5
    expo = torch.randint(lo, hi, (n,), generator=g).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return sign * mant * torch.exp2(expo)


def _ties(fmt: FloatFormat) -> torch.Tensor:
    """Midpoints between consecutive representable values (exact in float32)."""
    v = representable_values(fmt).float()
    mids = (v[1:] + v[:-1]) / 2
    return torch.cat([mids, -mids])


def _reference(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round to nearest, ties to the even code, from the enumerated value table (float64)."""
    values = representable_values(fmt)
    mag = x.double().abs().clamp(max=fmt.max_value)
    hi = torch.searchsorted(values, mag).clamp(max=len(values) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo = mag - values[lo]
    d_hi = values[hi] - mag
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    out = torch.where(take_hi, values[hi], values[lo])
    out = torch.copysign(out, x.double())
    return torch.where(torch.isnan(x), x.double(), out).to(x.dtype)


def test_format_constants() -> None:
    assert FloatFormat.parse("e4m3").max_value == 480.0  # the paper: no reserved codes
    assert FloatFormat.parse("e4m3fn").max_value == 448.0 == torch.finfo(torch.float8_e4m3fn).max
    assert FloatFormat.parse("e5m2", "ieee").max_value == 57344.0
    assert FloatFormat.parse("e2m1").max_value == 6.0
    assert FloatFormat.parse("e3m2").max_value == 28.0
    assert FloatFormat.parse("e2m3").max_value == 7.5
    assert FloatFormat.parse("e4m3fn").min_subnormal == 2.0**-9
    assert FloatFormat.parse("e5m2ieee").min_normal == torch.finfo(torch.float8_e5m2).tiny
    assert FloatFormat.parse("fp8_e4m3fn") == FloatFormat(4, 3, "fn")
    assert FloatFormat(2, 1).bits == 4
    assert representable_values(FloatFormat(2, 1)).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="ExMy"):
        FloatFormat.parse("int8")
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat(0, 3)
    with pytest.raises(ValueError, match="ieee"):
        FloatFormat(1, 2, "ieee")


@pytest.mark.parametrize("native", [True, False])
def test_e4m3fn_bit_exact_with_torch(native: bool) -> None:
    fmt = FloatFormat(4, 3, "fn")
    x = torch.cat(
        [
            _spread(40_000, -14, 9).clamp(-448, 448),  # includes subnormals (< 2^-6)
            _ties(fmt),
            torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-10, 3 * 2.0**-11]),
        ]
    )
    ours = round_to_format(x, fmt, native=native)
    torch_cast = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(_bits(ours), _bits(torch_cast))


@pytest.mark.parametrize("native", [True, False])
def test_e5m2_bit_exact_with_torch(native: bool) -> None:
    fmt = FloatFormat(5, 2, "ieee")
    x = torch.cat(
        [
            _spread(40_000, -20, 16).clamp(-57344, 57344),
            _ties(fmt),
            torch.tensor([0.0, -0.0, 57344.0, 2.0**-16, 2.0**-17]),
        ]
    )
    ours = round_to_format(x, fmt, native=native)
    assert torch.equal(_bits(ours), _bits(x.to(torch.float8_e5m2).float()))


@pytest.mark.parametrize(
    "name",
    ["e2m1", "e3m2", "e2m3", "e4m3", "e4m3fn", "e5m2ieee", "e1m2", "e3m4", "e6m1fn", "e5m10ieee"]
    + ["e2m0", "e3m0", "e4m0", "e5m0", "e6m0", "e4m0ieee", "e3m0fn"],
)
def test_matches_enumeration_reference(name: str) -> None:
    fmt = FloatFormat.parse(name)
    span = (fmt.emin - fmt.man_bits - 2, fmt.emax + 2)
    x = torch.cat(
        [
            _spread(8_000, *span, seed=len(name)),
            _ties(fmt),
            torch.tensor([0.0, -0.0, fmt.max_value, 2 * fmt.max_value, fmt.min_subnormal / 2]),
        ]
    )
    expected = _reference(x, fmt)
    for got in (round_to_format(x, fmt), _round_exact(x.double(), fmt).float()):
        assert torch.equal(_bits(got), _bits(expected))


def test_float64_inputs_use_exact_path() -> None:
    fmt = FloatFormat(3, 2)
    x = _spread(10_000, -6, 6).double()
    assert torch.equal(round_to_format(x, fmt), _reference(x, fmt))


def test_mantissa_free_format_ties_go_to_the_even_code() -> None:
    # E3M0 (bias 3): codes 0..7 are 0, 0.25, 0.5, 1, 2, 4, 8, 16. A tie 1.5 * 2^b lies between
    # codes b+3 and b+4: 1.5 (1 = code 3, 2 = code 4) -> 2; 3 (2 = code 4, 4 = code 5) -> 2;
    # 0.75 (0.5 = code 2, 1 = code 3) -> 0.5; 6 (4 = code 5, 8 = code 6) -> 8; 0.375 -> 0.5;
    # the tie between 0 and the smallest normal (0.125) -> 0
    fmt = FloatFormat(3, 0)
    x = torch.tensor([1.5, 3.0, 0.75, 6.0, 0.375, 12.0, 1.4, 1.6, 0.2, 0.125, 0.0625, -3.0])
    expected = [2.0, 2.0, 0.5, 8.0, 0.5, 8.0, 1.0, 2.0, 0.25, 0.0, 0.0, -2.0]
    assert round_to_format(x, fmt).tolist() == expected
    assert _round_exact(x.double(), fmt).tolist() == expected


@pytest.mark.parametrize("name", ["e4m3", "e4m3fn", "e5m2ieee", "e2m1"])
def test_nan_inf_and_saturation(name: str) -> None:
    fmt = FloatFormat.parse(name)
    inf = math.inf
    x = torch.tensor([math.nan, inf, -inf, 10 * fmt.max_value, -10 * fmt.max_value, 1.0])
    out = round_to_format(x, fmt)
    assert math.isnan(out[0])
    assert out[1:].tolist() == [fmt.max_value, -fmt.max_value, fmt.max_value, -fmt.max_value, 1.0]
    # scaled: NaN stays NaN, Inf saturates to the block's largest finite magnitude
    y = quantize(torch.tensor([[math.nan, inf, -inf, 2.0, -0.5]]), fmt, "channel")
    assert math.isnan(y[0, 0]) and y[0, 1:3].tolist() == [2.0, -2.0]
    assert y[0, 3] == 2.0


def test_tensor_channel_block_scaling() -> None:
    fmt = FloatFormat(2, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, generator=g) * torch.tensor([1e-3, 1.0, 1e3, 7.0])[:, None]
    x[3] = 0.0  # an all-zero row / block

    tensor = quantize(x, fmt, "tensor")
    scale = fmt.max_value / x.abs().max()
    assert torch.equal(tensor, round_to_format(x * scale, fmt) / scale)

    chan = quantize(x, fmt, "channel", dim=-1)
    for r in range(4):
        s = fmt.max_value / x[r].abs().max() if x[r].abs().max() > 0 else torch.tensor(1.0)
        assert torch.equal(chan[r], round_to_format(x[r] * s, fmt) / s)
    # each row keeps its own maximum magnitude, tiny rows are not flushed to zero
    assert torch.allclose(chan.abs().amax(1), x.abs().amax(1), rtol=1e-6)
    assert torch.equal(chan[3], torch.zeros(10))

    block = quantize(x, fmt, "block", block_size=4, dim=-1)  # blocks of 4, 4, 2
    for r in range(4):
        for start in (0, 4, 8):
            seg = x[r, start : start + 4]
            amax = seg.abs().max()
            s = fmt.max_value / amax if amax > 0 else torch.tensor(1.0)
            assert torch.equal(block[r, start : start + 4], round_to_format(seg * s, fmt) / s)
    assert not torch.isnan(block).any()

    # blocks along dim 0 equal blocks of the transposed tensor along its last dim
    assert torch.equal(quantize(x, fmt, "block", 3, dim=0), quantize(x.t(), fmt, "block", 3).t())


def test_power_of_two_scale_is_exact() -> None:
    fmt = FloatFormat(4, 3, "fn")
    x = torch.randn(64) * 3.7
    out = quantize(x, fmt, "tensor", scale_pow2=True)
    scale = 2.0 ** math.floor(math.log2(fmt.max_value / x.abs().max().item()))
    # x * S and q / S are exact for a power-of-two S
    assert torch.equal(out, round_to_format(x * scale, fmt) / scale)
    assert (out * scale).abs().max() <= fmt.max_value


def test_fake_quantize_straight_through() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    y = fake_quantize(x, FloatFormat(2, 1), "block", 4)
    assert torch.equal(y, quantize(x.detach(), FloatFormat(2, 1), "block", 4))
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(3, 8))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize(
    "dtype,name",
    [(torch.bfloat16, "e4m3fn"), (torch.float16, "e4m3fn"), (torch.bfloat16, "e2m1")]
    # formats whose largest value is no fp16 number: x * S must not be formed in fp16
    + [(torch.float16, "e5m2"), (torch.float16, "e8m7ieee"), (torch.float16, "e6m2")],
)
def test_half_inputs_are_scaled_in_float32(dtype: torch.dtype, name: str, granularity: str) -> None:
    fmt = FloatFormat.parse(name)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 64, generator=g) * 3.0).to(dtype)
    got = quantize(x, fmt, granularity, block_size=16)
    assert got.dtype == dtype and torch.isfinite(got).all()
    # reference: x * S and q / S in float32 (as for float32 inputs), rounding by enumeration,
    # one cast to the input dtype at the end
    xf = x.float()
    if granularity == "block":
        xf = xf.reshape(16, 4, 16)
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(-1, keepdim=True)
    scale = fmt.max_value / amax
    ref = (_reference(xf * scale, fmt) / scale).reshape(16, 64).to(dtype)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shift", [100, 123, 130, 140])
def test_tiny_blocks_are_quantized_like_their_normal_copies(granularity: str, shift: int) -> None:
    # values with few significant bits, so that x * 2^-shift is exact even as a float32
    # subnormal; scaling by a power of two commutes with scaled quantization
    fmt = FloatFormat(4, 3, "fn")
    g = torch.Generator().manual_seed(shift)
    normal = torch.randint(-(2**8), 2**8, (4, 32), generator=g).float() / 2**8
    tiny = normal * 2.0**-shift
    assert torch.equal(tiny.double() * 2.0**shift, normal.double())
    got = quantize(tiny, fmt, granularity, block_size=8)
    expected = quantize(normal, fmt, granularity, block_size=8) * 2.0**-shift
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert (got != 0).sum() >= 0.9 * (tiny != 0).sum()
    # and in float64, where the scale of blocks below about 1e-306 overflowed the same way
    tiny64 = normal.double() * 2.0**-1000
    got64 = quantize(tiny64, fmt, granularity, block_size=8)
    expected64 = quantize(normal.double(), fmt, granularity, block_size=8) * 2.0**-1000
    assert torch.equal(got64, expected64)
