"""Convolutional Neural Operator (CNO).

Raonić, Molinaro, De Ryck, Rohner, Bartolucci, Alaifari, Mishra, De Bézenac, *Convolutional
Neural Operators for robust and accurate learning of PDEs*, NeurIPS 2023 (arXiv 2302.01178);
reference github.com/camlab-ethz/ConvolutionalNeuralOperator (``CNO2d_simplified/CNO2d.py``,
whose layout this follows).

An operator U-Net on band-limited functions. Every block is a 3x3 convolution (optionally
batch-normalized) followed by the alias-free activation
:class:`~beamvq.nn.spectral.FilteredLeakyReLU`, which also carries the block's change of grid:

- lift: invariant CNO block ``(T_in*C_in) -> lift_project_width`` (no BatchNorm) + 3x3 conv to
  ``channel_multiplier // 2`` channels;
- per level ``l = 0 .. num_levels-1``: a ResNet of ``num_res`` residual blocks
  (conv-BN-activation-conv-BN + skip) whose output is the skip connection, then a down block
  (D) to ``channel_multiplier * 2**l`` channels on the grid halved;
- the neck: a ResNet of ``num_res_neck`` residual blocks at ``H / 2**num_levels``;
- decoder: per level an invariant block (I) on the bottleneck / skip, concatenation, an up
  block (U) doubling the grid; finally the projection (invariant CNO block + 3x3 conv) to
  ``T_out * C_out`` channels.

Time is stacked in channels (``(T, C)`` order) on input and output.

Where the latent sits: ``encode`` = lift + encoder ResNets + D blocks + neck;
``z = (B, channel_multiplier * 2**(num_levels-1), H / 2**num_levels, W / 2**num_levels)``, the
bottleneck feature map. The skip connections (ResNet outputs at every level, before their
invariant blocks) travel in ``extras`` as a tuple of tensors, batch first; they bypass the VQ
bottleneck, as in any U-Net. ``translate`` is the identity.

Choices:

- Grid: ``H`` and ``W`` must be multiples of ``2**num_levels`` (each D block halves the grid
  and each U block must land exactly on its skip's grid); ``check_grid`` says so.
- Resampling: ``"fft"`` (default) is the ideal periodic low-pass filter, exact for the periodic
  benchmarks (Navier–Stokes); the reference's CUDA kernel uses a Kaiser-windowed sinc of
  ``2 * 6`` taps with cutoff ``size / 2.0001``, which approximates the same ideal filter.
  ``"bicubic"`` is the simplified reference's antialiased bicubic interpolation, for
  non-periodic domains.
- No input/output normalization inside the model (the data module normalizes).
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import at_least, backbone_key, non_negative_int, one_of, positive_int
from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.spectral import RESAMPLING_METHODS, FilteredLeakyReLU

Size = tuple[int, int]


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class CNOBlock(nn.Module):
    """Conv 3x3 -> (BatchNorm) -> alias-free LeakyReLU onto the grid ``size``: (I), (D) or (U)."""

    def __init__(
        self, in_channels: int, out_channels: int, batch_norm: bool, resampling: str
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = _norm(out_channels, batch_norm)
        self.activation = FilteredLeakyReLU(resampling=resampling)

    def forward(self, x: Tensor, size: Size | None = None) -> Tensor:
        return self.activation(self.norm(self.conv(x)), size)


class ResidualBlock(nn.Module):
    """``x + BN(conv(σ(BN(conv(x)))))`` with σ the invariant alias-free activation."""

    def __init__(self, channels: int, batch_norm: bool, resampling: str) -> None:
        super().__init__()
        self.block = CNOBlock(channels, channels, batch_norm, resampling)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = _norm(channels, batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv(self.block(x)))


class LiftProject(nn.Module):
    """Invariant CNO block (no BatchNorm) to ``hidden`` channels, then a 3x3 conv."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, resampling: str) -> None:
        super().__init__()
        self.block = CNOBlock(in_channels, hidden, batch_norm=False, resampling=resampling)
        self.conv = nn.Conv2d(hidden, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.block(x))


def _resnet(channels: int, depth: int, batch_norm: bool, resampling: str) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels, batch_norm, resampling) for _ in range(depth)))


class CNO(Backbone):
    """CNO operator U-Net; ``z`` is the bottleneck feature map after the neck ResNet.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        num_levels: number of (D) and of (U) blocks; the grid shrinks by ``2**num_levels``.
        channel_multiplier: ``d_e`` of the paper; level ``l`` has ``d_e * 2**l`` channels, the
            lifted field ``d_e // 2``.
        num_res: residual blocks per level on the skip path (``N_res``).
        num_res_neck: residual blocks in the bottleneck (``N_res_neck``).
        lift_project_width: hidden width of the lift and projection blocks (64 in the reference).
        batch_norm: BatchNorm in every block except lift and projection (reference default).
        resampling: ``"fft"`` (periodic, ideal filter) or ``"bicubic"`` (antialiased).
    """

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        num_levels: int = 3,
        channel_multiplier: int = 16,
        num_res: int = 1,
        num_res_neck: int = 2,
        lift_project_width: int = 32,
        batch_norm: bool = True,
        resampling: str = "fft",
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, "CNO")
        positive_int(key("num_levels"), num_levels)
        at_least(key("channel_multiplier"), channel_multiplier, 2)
        positive_int(key("lift_project_width"), lift_project_width)
        non_negative_int(key("num_res"), num_res)
        non_negative_int(key("num_res_neck"), num_res_neck)
        one_of(key("resampling"), resampling, RESAMPLING_METHODS)
        self.num_levels = num_levels
        # Channel plan of the reference: the lifted field has d_e / 2 channels, level l d_e 2^l.
        enc = [channel_multiplier // 2] + [channel_multiplier * 2**i for i in range(num_levels)]
        self.latent_dim = enc[-1]
        args = {"batch_norm": batch_norm, "resampling": resampling}

        self.lift = LiftProject(in_steps * in_channels, lift_project_width, enc[0], resampling)
        self.skip_resnets = nn.ModuleList(
            _resnet(enc[i], num_res, **args) for i in range(num_levels)
        )
        self.down = nn.ModuleList(CNOBlock(enc[i], enc[i + 1], **args) for i in range(num_levels))
        self.neck = _resnet(enc[-1], num_res_neck, **args)
        # invariant[l] processes level l's skip (l < num_levels) or the bottleneck (l = num_levels).
        self.invariant = nn.ModuleList(CNOBlock(c, c, **args) for c in enc)
        # up[j] goes from level num_levels - j to num_levels - j - 1; from j >= 1 its input is
        # the previous up block's output concatenated with the skip of the same level.
        self.up = nn.ModuleList(
            CNOBlock(enc[num_levels - j] * (1 if j == 0 else 2), enc[num_levels - j - 1], **args)
            for j in range(num_levels)
        )
        self.project = LiftProject(
            2 * enc[0], lift_project_width, out_steps * out_channels, resampling
        )

    def check_grid(self, height: int, width: int) -> None:
        factor = 2**self.num_levels
        if height % factor or width % factor:
            raise divisible_grid_error(
                type(self).__name__,
                height,
                width,
                factor,
                f"{self.num_levels} down blocks each halve the grid",
            )

    def encode(self, x: Tensor) -> Encoded:
        h = self.lift(rearrange(x, "b t c h w -> b (t c) h w"))
        skips = []
        for resnet, down in zip(self.skip_resnets, self.down):
            skips.append(resnet(h))
            h = down(h, (h.shape[-2] // 2, h.shape[-1] // 2))
        return Encoded(z=self.neck(h), extras=tuple(skips))

    def decode(self, enc: Encoded) -> Tensor:
        skips: tuple[Tensor, ...] = enc.extras
        h = self.invariant[self.num_levels](enc.z)
        for j, up in enumerate(self.up):
            level = self.num_levels - j
            if j > 0:
                h = torch.cat((h, self.invariant[level](skips[level])), dim=1)
            target = skips[level - 1].shape[-2:]
            h = up(h, (int(target[0]), int(target[1])))
        h = torch.cat((h, self.invariant[0](skips[0])), dim=1)
        y = self.project(h)
        return rearrange(y, "b (t c) h w -> b t c h w", t=self.out_steps, c=self.out_channels)


__all__ = ["CNO", "CNOBlock", "LiftProject", "ResidualBlock"]
