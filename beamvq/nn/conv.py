"""Convolutional building blocks shared by the SimVP-v2, TAU, ResNet and U-Net backbones.

- :class:`ConvNormAct` is OpenSTL's ``BasicConv2d``/``ConvSC`` (SimVP, Gao et al. 2022,
  arXiv 2206.05099; Tan et al. 2022, arXiv 2211.12509): a convolution that may downsample by a
  stride of 2 or upsample by a sub-pixel ``PixelShuffle(2)`` (Shi et al. 2016, arXiv 1609.05158),
  followed by GroupNorm and an activation.
- :class:`ResidualBlock` is the "basic block" of He et al. 2016 (arXiv 1512.03385):
  conv-norm-ReLU-conv-norm plus the identity, then ReLU.
- :class:`DoubleConv` is the two 3x3 conv-norm-ReLU layers of every U-Net level (Ronneberger et
  al. 2015, arXiv 1505.04597).
- :class:`DropPath` is stochastic depth (Huang et al. 2016, arXiv 1603.09382) for residual
  branches.

GroupNorm rather than BatchNorm in these blocks: beamvq stacks K candidates of one sample along
the batch, and a normalization that mixes batch statistics would let candidates influence each
other in training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_groups(channels: int, groups: int, where: str) -> None:
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"{where}: GroupNorm needs the channel count ({channels}) to be a multiple of the "
            f"number of groups ({groups})"
        )


class ConvNormAct(nn.Module):
    """Convolution (optionally strided or sub-pixel upsampling) + GroupNorm + activation.

    ``stride=2`` halves the grid (padding ``(k - stride + 1) // 2`` as in OpenSTL, so an even
    size ``n`` becomes ``n / 2``); ``upsample=True`` produces ``4 * out_channels`` maps and
    rearranges them with ``PixelShuffle(2)``, doubling the grid without checkerboard artefacts.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        upsample: bool = False,
        norm_groups: int = 2,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ConvNormAct: stride must be 1 or 2, got {stride}")
        if upsample and stride != 1:
            raise ValueError("ConvNormAct: upsample and stride=2 exclude each other")
        _check_groups(out_channels, norm_groups, "ConvNormAct")
        padding = (kernel_size - stride + 1) // 2
        if upsample:
            self.conv: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels * 4, kernel_size, padding=padding),
                nn.PixelShuffle(2),
            )
        else:
            self.conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding
            )
        self.norm = nn.GroupNorm(norm_groups, out_channels)
        self.act = activation()
        # OpenSTL's BasicConv2d initialisation (truncated normal, std 0.02, zero bias).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """He et al. (2016) basic block: ``relu(x + norm(conv(relu(norm(conv(x))))))``.

    Channels and grid are preserved; the identity shortcut needs no projection.
    """

    def __init__(self, channels: int, kernel_size: int = 3, norm_groups: int = 8) -> None:
        super().__init__()
        _check_groups(channels, norm_groups, "ResidualBlock")
        pad = kernel_size // 2
        # Bias-free convolutions: the following norm has its own shift.
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(norm_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups, channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(x + self.norm2(self.conv2(h)))


class DoubleConv(nn.Module):
    """The U-Net level: two (3x3 conv, GroupNorm, ReLU) layers, 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 8) -> None:
        super().__init__()
        _check_groups(out_channels, norm_groups, "DoubleConv")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(norm_groups, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(norm_groups, out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample in training, rescale the rest."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def fan_out_init_(module: nn.Module) -> None:
    """He-normal init by fan-out for every ``Conv2d`` under ``module`` (VAN / OpenSTL MetaFormer
    blocks), zero biases; ``Linear`` layers get a truncated normal with std 0.02."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = ["ConvNormAct", "DoubleConv", "DropPath", "ResidualBlock", "fan_out_init_"]
