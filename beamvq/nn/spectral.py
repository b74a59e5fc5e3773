"""Spectral building blocks shared by the FNO, CNO and FourCastNet backbones.

- :class:`SpectralConv2d`: the Fourier layer's kernel integral of the Fourier Neural Operator
  (Li et al. 2021, arXiv 2010.08895; reference ``fourier_2d_time.py`` of
  github.com/neuraloperator/neuraloperator): FFT, a learned complex linear map on the lowest
  ``modes1 x modes2`` modes, inverse FFT. Every higher mode is dropped.
- :func:`fourier_resample` and :class:`FilteredLeakyReLU`: the band-limited up/down sampling and
  the alias-free activation of the Convolutional Neural Operator (Raonić et al. 2023,
  arXiv 2302.01178; reference github.com/camlab-ethz/ConvolutionalNeuralOperator), after the
  alias-free activations of StyleGAN3 (Karras et al. 2021): upsample, apply the pointwise
  nonlinearity on the finer grid, low-pass filter and resample to the output grid.
- :class:`AFNOMixing`: the Adaptive Fourier Neural Operator token mixer (Guibas et al. 2021,
  arXiv 2111.13587) as used by FourCastNet (Pathak et al. 2022, arXiv 2202.11214; reference
  ``networks/afnonet.py`` of github.com/NVlabs/FourCastNet): FFT over the token grid, a
  block-diagonal complex two-layer MLP shared by all modes, soft-shrinkage, mode truncation,
  inverse FFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class SpectralConv2d(nn.Module):
    """2-D Fourier layer ``K``: ``irfft2(R · rfft2(x))`` restricted to the lowest modes.

    ``R`` holds one complex ``(in, out)`` matrix per kept mode. As in the reference there are
    two weight tensors: ``weights1`` for the non-negative frequencies along the first spatial
    axis (rows ``0 .. modes1-1``) and ``weights2`` for the negative ones (the last ``modes1``
    rows); along the second axis the real FFT only stores frequencies ``0 .. W//2``, of which the
    first ``modes2`` are kept.

    The complex weights are stored as real tensors with a trailing axis of 2 (real, imaginary),
    as in the reference code of the paper, so :func:`beamvq.backbones.base.count_parameters`
    counts each complex weight as 2 real numbers, which is how the FNO paper counts (414,517
    for FNO-2D). Real storage also keeps every optimizer, gradient clipper and precision plugin
    on real tensors.

    On a grid too coarse for the requested modes (``2 * modes1 > H`` or ``modes2 > W // 2 + 1``)
    the layer uses every mode the grid has (``min(modes1, H // 2)``, ``min(modes2, W // 2 + 1)``):
    those are all the modes that exist there, which is what lets an FNO trained at 64x64 run at
    16x16. The weights of modes that do not exist on that grid then get zero gradient.

    The FFTs run in float32 whatever the input dtype (half-precision FFTs only accept powers of
    two on CUDA), and the result is cast back to the input dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, modes1: int, modes2: int) -> None:
        super().__init__()
        if min(in_channels, out_channels, modes1, modes2) < 1:
            raise ValueError(
                "SpectralConv2d: in_channels, out_channels, modes1 and modes2 must be >= 1, got "
                f"{in_channels}, {out_channels}, {modes1}, {modes2}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.modes1 = modes1
        self.modes2 = modes2
        # The reference's initialization: uniform [0, 1/(in*out)) for real and imaginary parts.
        scale = 1.0 / (in_channels * out_channels)
        shape = (in_channels, out_channels, modes1, modes2, 2)
        self.weights1 = nn.Parameter(scale * torch.rand(shape))
        self.weights2 = nn.Parameter(scale * torch.rand(shape))

    def kept_modes(self, height: int, width: int) -> tuple[int, int]:
        """The ``(modes1, modes2)`` actually used on a ``height x width`` grid."""
        return min(self.modes1, height // 2), min(self.modes2, width // 2 + 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``."""
        batch, _, height, width = x.shape
        m1, m2 = self.kept_modes(height, width)
        x_ft = torch.fft.rfft2(x.float())
        out_ft = x_ft.new_zeros(batch, self.out_channels, height, width // 2 + 1)
        if m1 > 0 and m2 > 0:
            w1 = torch.view_as_complex(self.weights1.float()[:, :, :m1, :m2].contiguous())
            # weights2 row j belongs to frequency j - modes1 (rows -modes1 .. -1), so a coarse
            # grid takes its last m1 rows: the same frequencies as on the full grid.
            w2 = torch.view_as_complex(
                self.weights2.float()[:, :, self.modes1 - m1 :, :m2].contiguous()
            )
            out_ft[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w1)
            out_ft[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], w2)
        return torch.fft.irfft2(out_ft, s=(height, width)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"modes1={self.modes1}, modes2={self.modes2}"
        )


def band_limit(size: int) -> int:
    """Highest frequency ``|k|`` kept on a grid of ``size`` points: ``(size - 1) // 2``.

    Strictly below the Nyquist frequency ``size / 2``: the Nyquist mode of an even grid cannot
    be told apart from its alias, so it is dropped, as the CNO reference does with its cutoff
    ``size / 2.0001``.
    """
    return (size - 1) // 2


def fourier_resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Band-limited (sinc) resampling of a periodic field ``(..., H, W)`` to ``(..., *size)``.

    Keeps the frequencies ``|k| <= band_limit`` of the smaller of the input and output grid on
    each axis and drops every other one, so downsampling is an ideal low-pass filter (no
    aliasing) and upsampling is exact trigonometric interpolation (no new frequencies). The
    field is treated as periodic; on non-periodic data the boundary jump rings (Gibbs), which
    is why :class:`FilteredLeakyReLU` also offers bicubic resampling. Runs in float32 and
    returns the input dtype.
    """
    height, width = x.shape[-2], x.shape[-1]
    out_h, out_w = int(size[0]), int(size[1])
    # "forward" normalization makes the coefficients amplitudes, independent of the grid size.
    x_ft = torch.fft.rfft2(x.float(), norm="forward")
    k1 = min(band_limit(height), band_limit(out_h))
    k2 = min(band_limit(width), band_limit(out_w))
    out_ft = x_ft.new_zeros(*x.shape[:-2], out_h, out_w // 2 + 1)
    out_ft[..., : k1 + 1, : k2 + 1] = x_ft[..., : k1 + 1, : k2 + 1]
    if k1 > 0:
        out_ft[..., out_h - k1 :, : k2 + 1] = x_ft[..., height - k1 :, : k2 + 1]
    return torch.fft.irfft2(out_ft, s=(out_h, out_w), norm="forward").to(x.dtype)


RESAMPLING_METHODS = ("fft", "bicubic")


class FilteredLeakyReLU(nn.Module):
    """CNO's alias-free activation from a grid ``(H, W)`` to an output grid ``size``.

    ``x -> resample(LeakyReLU(resample(x, 2 * max(in, out))), out)`` per axis: the
    nonlinearity runs on a grid twice as fine as the finer of the two grids (the reference's
    ``lrelu_upsampling = 2``), so the frequencies it creates up to twice the band survive
    instead of folding back, and the final resampling low-passes to the output grid. The same
    rule serves the invariant (``out = in``), down (``out = in / 2``) and up (``out = 2 in``)
    blocks; for an up block the reference CUDA filter likewise filters at the output cutoff.

    ``resampling="fft"`` uses :func:`fourier_resample` (ideal periodic filter: the output has
    no energy at or above the output grid's Nyquist frequency). ``"bicubic"`` uses
    ``F.interpolate(mode="bicubic", antialias=True)`` as the reference's simplified CNO2d does:
    approximately band-limited, but with no periodic wrap-around, for non-periodic domains.
    """

    def __init__(self, negative_slope: float = 0.01, resampling: str = "fft") -> None:
        super().__init__()
        if resampling not in RESAMPLING_METHODS:
            raise ValueError(
                f"FilteredLeakyReLU: resampling must be one of {RESAMPLING_METHODS}, "
                f"got {resampling!r}"
            )
        self.negative_slope = negative_slope
        self.resampling = resampling

    def resample(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.resampling == "fft":
            return fourier_resample(x, size)
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, *size)``; ``size`` defaults to ``(H, W)``."""
        height, width = x.shape[-2], x.shape[-1]
        out = (height, width) if size is None else (int(size[0]), int(size[1]))
        fine = (2 * max(height, out[0]), 2 * max(width, out[1]))
        x = F.leaky_relu(self.resample(x, fine), self.negative_slope)
        return self.resample(x, out)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, resampling={self.resampling!r}"


class AFNOMixing(nn.Module):
    """AFNO spectral token mixing on a channel-last token grid ``(B, H, W, C)``.

    ``X = rfft2(x)`` (orthonormal) over ``(H, W)``; the ``C`` channels are split into
    ``num_blocks`` blocks and each mode goes through the same block-diagonal complex MLP
    ``W2 · ReLU(W1 · X + b1) + b2`` (ReLU applied to real and imaginary parts separately, as in
    the reference); ``softshrink(λ)`` on the real and imaginary parts makes the spectrum sparse;
    modes outside the kept fraction are zeroed; ``irfft2`` back.

    Returns only the mixed field. The reference's ``AFNO2D.forward`` also adds its input
    (``return x + bias``); that skip is the block's job here (see ``AFNOBlock``).

    Hard thresholding keeps the modes with ``|k_h| <= floor(fraction * (H // 2))`` and
    ``k_w <= floor(fraction * (W // 2))``: a low-pass box, the intent stated by Guibas et al.
    (FourCastNet's index slice ``[total - kept : total + kept, :kept]`` on the unshifted spectrum
    keeps only the first ``H // 2 + 1`` columns even at fraction 1, i.e. drops the high zonal
    modes of a wide grid; we do not reproduce that). ``fraction = 1`` keeps every mode.

    With identity ``W1, W2``, zero biases and ``λ = 0`` the output is
    ``irfft2(ReLU(Re X) + i ReLU(Im X))``: the identity on fields whose Fourier coefficients
    all have non-negative real and imaginary parts.

    The FFTs and the spectral MLP run in float32; the output has the input dtype.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int = 8,
        sparsity_threshold: float = 0.01,
        hard_thresholding_fraction: float = 1.0,
        hidden_size_factor: int = 1,
    ) -> None:
        super().__init__()
        if dim < 1 or num_blocks < 1 or dim % num_blocks:
            raise ValueError(
                f"AFNOMixing: dim ({dim}) must be a positive multiple of num_blocks ({num_blocks})"
            )
        if not 0.0 < hard_thresholding_fraction <= 1.0:
            raise ValueError(
                "AFNOMixing: hard_thresholding_fraction must be in (0, 1], got "
                f"{hard_thresholding_fraction}"
            )
        if sparsity_threshold < 0 or hidden_size_factor < 1:
            raise ValueError(
                "AFNOMixing: sparsity_threshold >= 0 and hidden_size_factor >= 1 required, got "
                f"{sparsity_threshold}, {hidden_size_factor}"
            )
        self.dim = dim
        self.num_blocks = num_blocks
        self.block_size = dim // num_blocks
        self.sparsity_threshold = sparsity_threshold
        self.hard_thresholding_fraction = hard_thresholding_fraction
        hidden = self.block_size * hidden_size_factor
        # Index 0 holds the real part, index 1 the imaginary part (reference layout and init).
        scale = 0.02
        self.w1 = nn.Parameter(scale * torch.randn(2, num_blocks, self.block_size, hidden))
        self.b1 = nn.Parameter(scale * torch.randn(2, num_blocks, hidden))
        self.w2 = nn.Parameter(scale * torch.randn(2, num_blocks, hidden, self.block_size))
        self.b2 = nn.Parameter(scale * torch.randn(2, num_blocks, self.block_size))

    def kept_mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """Boolean ``(H, W // 2 + 1)`` mask of the modes hard thresholding keeps."""
        k1 = torch.fft.fftfreq(height, d=1.0 / height, device=device).abs()
        k2 = torch.fft.rfftfreq(width, d=1.0 / width, device=device)
        keep1 = k1 <= int(self.hard_thresholding_fraction * (height // 2))
        keep2 = k2 <= int(self.hard_thresholding_fraction * (width // 2))
        return keep1[:, None] & keep2[None, :]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        _, height, width, _ = x.shape
        x_ft = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")
        x_ft = rearrange(x_ft, "b h w (n c) -> b h w n c", n=self.num_blocks)
        w1, b1, w2, b2 = (p.float() for p in (self.w1, self.b1, self.w2, self.b2))

        def mul(a: Tensor, w: Tensor) -> Tensor:
            return torch.einsum("bhwni,nio->bhwno", a, w)

        re, im = x_ft.real, x_ft.imag
        h_re = F.relu(mul(re, w1[0]) - mul(im, w1[1]) + b1[0])
        h_im = F.relu(mul(im, w1[0]) + mul(re, w1[1]) + b1[1])
        o_re = mul(h_re, w2[0]) - mul(h_im, w2[1]) + b2[0]
        o_im = mul(h_im, w2[0]) + mul(h_re, w2[1]) + b2[1]
        out = F.softshrink(torch.stack((o_re, o_im), dim=-1), lambd=self.sparsity_threshold)
        mask = self.kept_mask(height, width, x.device)
        out = out * rearrange(mask, "h w -> 1 h w 1 1 1").to(out.dtype)
        out = rearrange(torch.view_as_complex(out.contiguous()), "b h w n c -> b h w (n c)")
        return torch.fft.irfft2(out, s=(height, width), dim=(1, 2), norm="ortho").to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_blocks={self.num_blocks}, "
            f"sparsity_threshold={self.sparsity_threshold}, "
            f"hard_thresholding_fraction={self.hard_thresholding_fraction}"
        )


__all__ = [
    "AFNOMixing",
    "RESAMPLING_METHODS",
    "FilteredLeakyReLU",
    "SpectralConv2d",
    "band_limit",
    "fourier_resample",
]
