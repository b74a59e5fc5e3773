"""U-Net with time stacked in channels.

Ronneberger, Fischer, Brox. "U-Net: Convolutional Networks for Biomedical Image Segmentation",
arXiv 1505.04597; used as a baseline in the FNO paper's Navier–Stokes benchmark (Li et al.,
arXiv 2010.08895: 10 input frames -> 1 frame rolled out recurrently).

Layout: the ``T_in * C_in`` time-stacked input goes through a double conv (two 3x3
conv-GroupNorm-ReLU) at ``base_width`` channels, then ``depth`` levels of 2x2 max-pooling and
a double conv doubling the width. The way up mirrors it: a 2x2 stride-2 transposed conv halving
the width, concatenation with the encoder map of the same level, a double conv; a final 1x1 conv
gives ``T_out * C_out`` channels.

Contract mapping: ``z`` is the bottleneck map ``(B, base_width * 2**depth, H / 2**depth,
W / 2**depth)``; ``extras`` is the tuple of the ``depth`` encoder maps (finest first, batch
first) that the decoder concatenates. ``translate`` is the identity. The skips bypass the VQ
bottleneck (as SimVP's does), so candidate forecasts differ through the coarse scales only.

Choices: 'same' padding (the original crops valid convolutions) so the output grid equals the
input grid; GroupNorm after each conv (the original has no normalization); He-normal (fan-out)
initialisation. ``H`` and ``W`` must be multiples of ``2**depth``.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import backbone_key, positive_int
from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.conv import DoubleConv


class UNet(Backbone):
    """Ronneberger U-Net over time-stacked channels (see module docstring)."""

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        base_width: int = 16,
        depth: int = 2,
        norm_groups: int = 8,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, type(self).__name__)
        for arg, value in (
            ("base_width", base_width),
            ("depth", depth),
            ("norm_groups", norm_groups),
        ):
            positive_int(key(arg), value)
        if base_width % norm_groups != 0:
            raise ValueError(
                f"{key('base_width')} ({base_width}) must be a multiple of norm_groups "
                f"({norm_groups})"
            )
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.latent_dim = widths[-1]
        self.inc = DoubleConv(in_steps * in_channels, widths[0], norm_groups)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(
            DoubleConv(widths[i], widths[i + 1], norm_groups) for i in range(depth)
        )
        # Decoder level i (coarsest first) maps widths[i + 1] -> widths[i].
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.up_conv = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], norm_groups) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], out_steps * out_channels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_grid(self, height: int, width: int) -> None:
        factor = 2**self.depth
        if height % factor or width % factor:
            raise divisible_grid_error(
                type(self).__name__,
                height,
                width,
                factor,
                f"{self.depth} levels of 2x2 max-pooling",
            )

    def encode(self, x: Tensor) -> Encoded:
        h = self.inc(rearrange(x, "b t c h w -> b (t c) h w"))
        skips: list[Tensor] = []
        for level in self.down:
            skips.append(h)
            h = level(self.pool(h))
        return Encoded(z=h, extras=tuple(skips))

    def decode(self, enc: Encoded) -> Tensor:
        h = enc.z
        for up, conv, skip in zip(self.up, self.up_conv, reversed(enc.extras), strict=True):
            h = conv(torch.cat([skip, up(h)], dim=1))
        y = self.out(h)
        return rearrange(y, "b (t c) h w -> b t c h w", t=self.out_steps)


__all__ = ["UNet"]
