"""ExMy floating-point fake quantization with tensor, channel and block scaling.

Implements the number formats of *Scaling Laws for Floating-Point Quantization Training*
(Sun et al., arXiv 2501.02423): sign + ``E`` exponent bits + ``M`` mantissa bits, IEEE-style
with subnormals (bias ``2^(E-1) - 1``, smallest normal exponent ``1 - bias``), round to nearest
with ties to even, saturating at the largest finite value. Values are scaled before the cast by
``S = FPmax / max|x|`` over a block: the whole tensor, one row/channel, or ``B`` consecutive
elements along the GEMM reduction axis (as in the paper and in MX-style block formats), then
divided by ``S`` again, so the result is a float tensor carrying the quantization error
("quantize, then compute in higher precision").

Which bit patterns are reserved is explicit (``special``), because the paper and the hardware
formats disagree:

``"none"``  no codes reserved (the paper's simulation): E4M3 max 480, E2M1 max 6.
``"ieee"``  the all-ones exponent is reserved for Inf/NaN: E5M2 max 57344 (``torch.float8_e5m2``).
``"fn"``    finite-only OCP style: only the all-ones mantissa at the largest exponent is NaN:
            E4M3 max 448 (``torch.float8_e4m3fn``).

Defined behaviour for non-finite inputs: NaN stays NaN; +-Inf saturates to +-FPmax (divided by
the block scale, i.e. the largest finite magnitude of its block). Scales ignore non-finite
values, and a block whose finite values are all zero gets scale 1 (no 0/0).

The rounding is exact arithmetic on powers of two (``frexp`` + an exactly built ``2^k``), so
with ``granularity="none"`` the result equals torch's own ``float8_e4m3fn`` / ``float8_e5m2``
casts bit for bit within their range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

Special = Literal["none", "ieee", "fn"]
Granularity = Literal["none", "tensor", "channel", "block"]

SPECIALS: tuple[str, ...] = ("none", "ieee", "fn")
GRANULARITIES: tuple[str, ...] = ("none", "tensor", "channel", "block")

_FORMAT_RE = re.compile(r"^(?:fp\d+_)?e(\d+)m(\d+)(fn|ieee)?$")


@dataclass(frozen=True)
class FloatFormat:
    """An ExMy floating-point format: ``exp_bits`` E >= 1, ``man_bits`` M >= 0, reserved codes."""

    exp_bits: int
    man_bits: int
    special: str = "none"

    def __post_init__(self) -> None:
        if self.exp_bits < 1:
            raise ValueError(f"exp_bits must be >= 1, got {self.exp_bits}")
        if self.man_bits < 0:
            raise ValueError(f"man_bits must be >= 0, got {self.man_bits}")
        if self.special not in SPECIALS:
            raise ValueError(f"special must be one of {SPECIALS}, got {self.special!r}")
        # float64 holds every intermediate exactly up to these limits (E11M52 is float64 itself)
        if self.exp_bits > 11 or self.man_bits > 52:
            raise ValueError(f"E{self.exp_bits}M{self.man_bits} exceeds float64 (E <= 11, M <= 52)")
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("special='ieee' reserves the all-ones exponent: needs exp_bits >= 2")
        if self.special == "fn" and self.exp_bits == 1 and self.man_bits == 0:
            raise ValueError("E1M0 with special='fn' has no finite non-zero value")

    @classmethod
    def parse(cls, name: str, special: str = "none") -> FloatFormat:
        """``"e4m3"`` (with ``special``), ``"e4m3fn"``, ``"e5m2ieee"`` or ``"fp8_e4m3fn"``."""
        match = _FORMAT_RE.match(name.strip().lower())
        if match is None:
            raise ValueError(f"format {name!r} is not ExMy, e.g. 'e4m3', 'e4m3fn', 'e2m1'")
        exp_bits, man_bits, suffix = int(match[1]), int(match[2]), match[3]
        return cls(exp_bits, man_bits, suffix if suffix is not None else special)

    @property
    def name(self) -> str:
        suffix = "" if self.special == "none" else self.special
        return f"e{self.exp_bits}m{self.man_bits}{suffix}"

    @property
    def bits(self) -> int:
        """Total bits including the sign."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade."""
        top_code = 2**self.exp_bits - 1
        if self.special == "ieee":
            top_code -= 1
        elif self.special == "fn" and self.man_bits == 0:
            # the only code of the top binade is NaN
            top_code -= 1
        return top_code - self.bias

    @property
    def max_value(self) -> float:
        if self.special == "fn" and self.man_bits > 0:
            # all-ones mantissa at the top exponent is NaN: one step below the full binade
            return 2.0**self.emax * (2.0 - 2.0 ** (1 - self.man_bits))
        return 2.0**self.emax * (2.0 - 2.0 ** (-self.man_bits))

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def work_dtype(self) -> torch.dtype:
        """float32 when all values and steps of the format are normal float32 numbers."""
        fits = self.emin - self.man_bits >= -126 and self.emax <= 127 and self.man_bits <= 23
        return torch.float32 if fits else torch.float64


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """Exactly ``2**k`` for integer ``k`` (normal and subnormal range), built from the bits.

    ``torch.exp2`` / ``ldexp`` go through ``pow`` whose exactness is not guaranteed on every
    backend; the bit pattern is.
    """
    if dtype == torch.float32:
        k = k.to(torch.int32)
        normal = torch.bitwise_left_shift((k + 127).clamp(min=1), 23)
        sub = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(min=0, max=22))
        return torch.where(k >= -126, normal, sub).view(torch.float32)
    k = k.to(torch.int64)
    normal = torch.bitwise_left_shift((k + 1023).clamp(min=1), 52)
    sub = torch.bitwise_left_shift(torch.ones_like(k), (k + 1074).clamp(min=0, max=51))
    return torch.where(k >= -1022, normal, sub).view(torch.float64)


# formats that torch casts to natively; with a saturating clamp first they round exactly like
# the generic code (tests pin this), at a fraction of the memory passes
_NATIVE: dict[tuple[int, int, str], torch.dtype] = {
    (4, 3, "fn"): torch.float8_e4m3fn,
    (5, 2, "ieee"): torch.float8_e5m2,
    (5, 10, "ieee"): torch.float16,
    (8, 7, "ieee"): torch.bfloat16,
}
_HALF_OR_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def round_to_format(x: Tensor, fmt: FloatFormat, native: bool = True) -> Tensor:
    """Cast ``x`` to ``fmt`` elementwise (no scaling): RNE, subnormals, saturating, NaN kept.

    Returns a tensor of ``x.dtype`` whose values are all representable in ``fmt``. ``native``
    lets formats that torch has as dtypes (E4M3 fn, E5M2, fp16, bf16) use torch's cast.
    """
    key = (fmt.exp_bits, fmt.man_bits, fmt.special)
    if native and key in _NATIVE and x.dtype in _HALF_OR_SINGLE:
        # clamp in float32: FPmax of E5M2/bf16 is no fp16 number (a clamp in fp16 raises)
        return x.float().clamp_(-fmt.max_value, fmt.max_value).to(_NATIVE[key]).to(x.dtype)
    if x.dtype in _HALF_OR_SINGLE and fmt.work_dtype == torch.float32:
        return _round_float32(x.float(), fmt).to(x.dtype)
    return _round_exact(x, fmt)


def _round_float32(x: Tensor, fmt: FloatFormat) -> Tensor:
    """Bit-level float32 version: the step is built from the (clamped) exponent bits."""
    # saturate first: every value above FPmax (and +-Inf) becomes FPmax; NaN passes clamp
    mag = x.abs().clamp_(max=fmt.max_value)
    # biased float32 exponent of |x| (0 for float32 subnormals, 255 for NaN), kept at or above
    # the format's smallest normal exponent so that subnormals share its step 2^(emin - M)
    biased = torch.bitwise_right_shift(mag.view(torch.int32), 23)
    biased.clamp_(min=fmt.emin + 127).sub_(fmt.man_bits)
    step = torch.bitwise_left_shift(biased, 23).view(torch.float32)
    # mag / step is exact (division by a power of two, result < 2^(M+1)); round_ is RNE
    return _round_ratio(mag.div_(step), biased, fmt, -127).mul_(step).copysign_(x)


def _round_exact(x: Tensor, fmt: FloatFormat) -> Tensor:
    """frexp version in the format's work dtype (float64 for wide formats and inputs)."""
    work = torch.float64 if x.dtype == torch.float64 else fmt.work_dtype
    xw = x.to(work) if x.dtype != work else x
    mag = xw.abs().clamp(max=fmt.max_value)
    _, exponent = torch.frexp(mag)
    # frexp: mag = m * 2^exponent with m in [0.5, 1), so floor(log2 mag) = exponent - 1;
    # below the normal range the step stays at the subnormal step 2^(emin - M)
    binade = (exponent - 1).clamp(min=fmt.emin)
    step = _pow2(binade - fmt.man_bits, work)
    rounded = _round_ratio(mag / step, binade, fmt, 0) * step
    out = torch.copysign(rounded, xw)
    return out.to(x.dtype) if out.dtype != x.dtype else out


def _round_ratio(ratio: Tensor, exponent: Tensor, fmt: FloatFormat, offset: int) -> Tensor:
    """Round ``|x| / step`` (a fresh tensor, rounded in place) to nearest, ties to the even code.

    With ``M >= 1`` the codes of one binade are consecutive multiples of its step, so rounding
    ``|x| / step`` half to even is ties-to-even on the codes. With ``M = 0`` a binade holds one
    value ``2^b`` (code ``b + bias``): the tie ``1.5 * 2^b`` lies between codes ``b + bias`` and
    ``b + bias + 1``, and ``round(1.5) = 2`` would always take the upper one. ``exponent +
    offset`` is ``b``, the exponent of the step (the tie between 0 and the smallest normal,
    ``0.5``, already rounds to 0 = code 0).
    """
    if fmt.man_bits > 0:
        return ratio.round_()
    lower_is_even = torch.remainder(exponent + (offset + fmt.bias), 2) == 0
    tie_down = (ratio == 1.5) & lower_is_even
    return ratio.round_().masked_fill_(tie_down, 1.0)


def _finite_abs(x: Tensor) -> Tensor:
    return x.abs().nan_to_num_(nan=0.0, posinf=0.0)


class Scales(NamedTuple):
    """``x * S`` as ``(x * pre) * scale``: ``pre`` is an exact power of two, 1 unless needed.

    ``S = FPmax / amax`` overflows the work dtype for blocks with ``amax`` below about
    ``FPmax / 3.4e38`` (about 1e-36 for E4M3 in float32); such a block is first scaled by
    ``pre = 2^-e`` (``e`` the binary exponent of its ``amax``, capped so that ``pre`` is finite),
    which is exact, and then by the finite ``FPmax / (amax * pre)``. For every other block
    ``pre = 1`` and ``scale`` is exactly ``FPmax / amax`` as before.
    """

    pre: Tensor
    scale: Tensor

    def apply(self, x: Tensor, fmt: FloatFormat) -> Tensor:
        """Quantize ``x`` (already in the work dtype) with these scales and scale back."""
        return round_to_format(x * self.pre * self.scale, fmt) / self.scale / self.pre


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half and single inputs (``x * S`` is never rounded to fp16/bf16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scales(amax: Tensor, fmt: FloatFormat, scale_pow2: bool, work: torch.dtype) -> Scales:
    amax = amax.to(work)
    scale = fmt.max_value / amax
    tiny = (amax > 0) & ~torch.isfinite(scale)
    # frexp in float64 sees float32 subnormals as normal numbers: e = floor(log2 amax) + 1
    _, exponent = torch.frexp(amax.double())
    cap = 126 if work == torch.float32 else 1022
    pre = torch.where(tiny, _pow2((-exponent).clamp(max=cap), work), torch.ones_like(amax))
    scale = torch.where(tiny, fmt.max_value / (amax * pre), scale)
    # an all-zero (or all non-finite) block needs no scaling; avoid inf/NaN scales (a format
    # with FPmax near the work dtype's maximum can still overflow: it keeps scale 1)
    scale = torch.where((amax > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    if scale_pow2:
        # round down so amax * S stays <= FPmax; power-of-two scales make x * S exact
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return Scales(pre, scale)


def quantize(
    x: Tensor,
    fmt: FloatFormat,
    granularity: str = "tensor",
    block_size: int = 32,
    dim: int = -1,
    scale_pow2: bool = False,
) -> Tensor:
    """Fake-quantize ``x`` to ``fmt`` with scaling (no autograd; see :func:`fake_quantize`).

    ``granularity``: ``"none"`` (plain cast, scale 1), ``"tensor"`` (one scale), ``"channel"``
    (one scale per slice along ``dim``, i.e. per row of the GEMM operand whose reduction axis
    is ``dim``), ``"block"`` (one scale per ``block_size`` consecutive elements along ``dim``;
    the last block may be shorter).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "none" or x.numel() == 0:
        return round_to_format(x, fmt)
    work = _work_dtype(x)
    if granularity == "tensor":
        scales = _scales(_finite_abs(x).amax(), fmt, scale_pow2, work)
        return scales.apply(x.to(work), fmt).to(x.dtype)
    if x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one dim")
    moved = x.movedim(dim, -1).to(work)
    if granularity == "channel":
        amax = _finite_abs(moved).amax(dim=-1, keepdim=True)
        out = _scales(amax, fmt, scale_pow2, work).apply(moved, fmt)
        return out.to(x.dtype).movedim(-1, dim)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    length = moved.shape[-1]
    pad = (-length) % block_size
    # zero padding does not change any block's max|x|
    padded = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
    blocks = rearrange(padded, "... (nb b) -> ... nb b", b=block_size)
    amax = _finite_abs(blocks).amax(dim=-1, keepdim=True)
    out = _scales(amax, fmt, scale_pow2, work).apply(blocks, fmt)
    out = rearrange(out, "... nb b -> ... (nb b)")[..., :length]
    return out.to(x.dtype).movedim(-1, dim)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize in forward, pass the gradient straight through in backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        fmt: FloatFormat,
        granularity: str,
        block_size: int,
        dim: int,
        scale_pow2: bool,
    ) -> Tensor:
        return quantize(x, fmt, granularity, block_size, dim, scale_pow2)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None, None, None, None]:
        return grad, None, None, None, None, None


def fake_quantize(
    x: Tensor,
    fmt: FloatFormat,
    granularity: str = "tensor",
    block_size: int = 32,
    dim: int = -1,
    scale_pow2: bool = False,
) -> Tensor:
    """:func:`quantize` with a straight-through gradient (d out / d x = identity)."""
    return _FakeQuantizeSTE.apply(x, fmt, granularity, block_size, dim, scale_pow2)


def representable_values(fmt: FloatFormat) -> Tensor:
    """All non-negative finite values of ``fmt`` in code order (float64), enumerated from bits.

    Independent of :func:`round_to_format` (no frexp, no rounding): used as the reference
    in tests and to inspect small formats.
    """
    if fmt.exp_bits + fmt.man_bits > 16:
        raise ValueError("enumeration is meant for formats of at most 17 bits")
    values = []
    top_code = 2**fmt.exp_bits - 1
    for e_code in range(top_code + 1):
        for m_code in range(2**fmt.man_bits):
            if fmt.special == "ieee" and e_code == top_code:
                continue
            if fmt.special == "fn" and e_code == top_code and m_code == 2**fmt.man_bits - 1:
                continue
            frac = m_code / 2**fmt.man_bits
            if e_code == 0:
                values.append(2.0**fmt.emin * frac)
            else:
                values.append(2.0 ** (e_code - fmt.bias) * (1.0 + frac))
    return torch.tensor(values, dtype=torch.float64)
