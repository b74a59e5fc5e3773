"""ResNet baseline: a full-resolution residual CNN with time stacked in channels.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", arXiv 1512.03385 (the
basic block), used as in the ResNet baseline of the FNO paper (Li et al., "Fourier Neural
Operator for Parametric Partial Differential Equations", arXiv 2010.08895, Navier–Stokes
benchmark: "18 layers of 2-d convolution with residual connections", 266,641 parameters, 10
input frames -> 1 frame rolled out recurrently).

Layout: the ``T_in * C_in`` time-stacked input is lifted by a 3x3 conv + GroupNorm + ReLU to
``width`` channels, followed by ``n_blocks`` basic blocks (conv-norm-ReLU-conv-norm + identity,
ReLU), and a 3x3 projection conv to ``T_out * C_out`` channels. ``n_blocks = 8`` gives the FNO
paper's 18 conv layers.

Choices the references leave open:
- Full resolution throughout (no strided stem), as in the FNO baseline: any grid size works.
- The contract split: ``encode`` = lift + the first ``n_blocks // 2`` blocks, so ``z`` is the
  ``(B, width, H, W)`` feature map (one ``width``-vector per pixel is quantized); ``translate``
  is the identity; ``decode`` = the remaining blocks + projection. No skip bypasses ``z``, so
  ``extras`` is ``None``.
- GroupNorm instead of BatchNorm (batch-independent, see :mod:`beamvq.nn.conv`), He-normal
  (fan-out) initialisation of the convolutions.
"""

from __future__ import annotations

from functools import partial

from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import backbone_key, odd_int, positive_int
from beamvq.backbones.base import Backbone, Encoded
from beamvq.nn.conv import ResidualBlock


class ResNet(Backbone):
    """Full-resolution residual CNN over time-stacked channels (see module docstring)."""

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        width: int = 32,
        n_blocks: int = 4,
        kernel_size: int = 3,
        norm_groups: int = 8,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, type(self).__name__)
        for arg, value in (("width", width), ("n_blocks", n_blocks), ("norm_groups", norm_groups)):
            positive_int(key(arg), value)
        odd_int(key("kernel_size"), kernel_size)
        if width % norm_groups != 0:
            raise ValueError(
                f"{key('width')} ({width}) must be a multiple of norm_groups ({norm_groups})"
            )
        self.latent_dim = width
        pad = kernel_size // 2
        self.lift = nn.Sequential(
            nn.Conv2d(in_steps * in_channels, width, kernel_size, padding=pad, bias=False),
            nn.GroupNorm(norm_groups, width),
            nn.ReLU(),
        )
        n_enc = n_blocks // 2
        self.encoder_blocks = nn.Sequential(
            *(ResidualBlock(width, kernel_size, norm_groups) for _ in range(n_enc))
        )
        self.decoder_blocks = nn.Sequential(
            *(ResidualBlock(width, kernel_size, norm_groups) for _ in range(n_blocks - n_enc))
        )
        self.project = nn.Conv2d(width, out_steps * out_channels, kernel_size, padding=pad)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x: Tensor) -> Encoded:
        stacked = rearrange(x, "b t c h w -> b (t c) h w")
        return Encoded(z=self.encoder_blocks(self.lift(stacked)))

    def decode(self, enc: Encoded) -> Tensor:
        y = self.project(self.decoder_blocks(enc.z))
        return rearrange(y, "b (t c) h w -> b t c h w", t=self.out_steps)


__all__ = ["ResNet"]
