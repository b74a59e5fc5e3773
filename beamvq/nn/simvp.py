"""SimVP building blocks shared by the SimVP-v2 and TAU backbones.

References:
- Tan, Gao, Li, Li. "SimVP: Towards Simple yet Effective Spatiotemporal Predictive Learning"
  (SimVP-v2, gated spatiotemporal attention "gSTA"), arXiv 2211.12509.
- Tan, Li, Gao, Li. "Temporal Attention Unit: Towards Efficient Spatiotemporal Predictive
  Learning" (TAU), CVPR 2023, arXiv 2206.12126.
- OpenSTL (Tan et al., NeurIPS 2023 Datasets & Benchmarks), ``openstl/models/simvp_model.py``
  and ``openstl/modules/simvp_modules.py``: the layer layout, kernel sizes and parameter counts
  followed here (``ConvSC`` encoder/decoder, ``MidMetaNet`` translator, ``GASubBlock``,
  ``TAUSubBlock``, ``MixMlp``).

Pieces:
- :class:`SimVPEncoder` / :class:`SimVPDecoder`: per-frame spatial encoder (``n_layers``
  :class:`~beamvq.nn.conv.ConvNormAct`, every second one strided) and decoder (sub-pixel
  upsampling, the first encoder layer's output added before the last decoder layer, 1x1 readout).
- :class:`MetaTranslator`: ``depth`` MetaFormer blocks over time-stacked channels
  (``T * C_hid``), the first widening to ``hidden_channels`` and the last narrowing to
  ``out_channels`` through 1x1 convolutions.
- :func:`gsta_block` / :func:`tau_block`: the two token mixers, built on
  :class:`MetaSubBlock` (BatchNorm, attention, layer scale, MixMlp, layer scale).
- :class:`TimeMix`: a learned linear map over the time axis, used when ``T_out != T_in``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from beamvq.nn.conv import ConvNormAct, DropPath, fan_out_init_

# -- spatial encoder / decoder -------------------------------------------------------------------


def downsampling_pattern(n_layers: int) -> list[bool]:
    """Which encoder layers stride by 2: the odd-numbered ones (0-based), as in OpenSTL.

    The first layer never downsamples, so its output (the skip) is at full resolution; the total
    reduction is ``2 ** (n_layers // 2)``.
    """
    return [i % 2 == 1 for i in range(n_layers)]


class SpatialEncoding(NamedTuple):
    """Output of :class:`SimVPEncoder`."""

    latent: Tensor  # (N, C_hid, H / 2**(n//2), W / 2**(n//2))
    skip: Tensor  # (N, C_hid, H, W): first layer's output, added back in the decoder


class SimVPEncoder(nn.Module):
    """Per-frame convolutional encoder: ``n_layers`` ConvNormAct (GroupNorm(2) + SiLU)."""

    def __init__(self, in_channels: int, hidden: int, n_layers: int, kernel_size: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"SimVPEncoder: n_layers must be >= 1, got {n_layers}")
        pattern = downsampling_pattern(n_layers)
        self.layers = nn.ModuleList(
            ConvNormAct(
                in_channels if i == 0 else hidden, hidden, kernel_size, stride=2 if s else 1
            )
            for i, s in enumerate(pattern)
        )

    def forward(self, x: Tensor) -> SpatialEncoding:
        skip = self.layers[0](x)
        h = skip
        for layer in self.layers[1:]:
            h = layer(h)
        return SpatialEncoding(latent=h, skip=skip)


class SimVPDecoder(nn.Module):
    """Mirror of :class:`SimVPEncoder`: sub-pixel upsampling, skip added before the last layer,
    then a 1x1 readout to ``out_channels``."""

    def __init__(self, hidden: int, out_channels: int, n_layers: int, kernel_size: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"SimVPDecoder: n_layers must be >= 1, got {n_layers}")
        pattern = downsampling_pattern(n_layers)[::-1]
        self.layers = nn.ModuleList(
            ConvNormAct(hidden, hidden, kernel_size, upsample=up) for up in pattern
        )
        self.readout = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, latent: Tensor, skip: Tensor) -> Tensor:
        h = latent
        for layer in self.layers[:-1]:
            h = layer(h)
        return self.readout(self.layers[-1](h + skip))


# -- translator blocks ---------------------------------------------------------------------------


class LargeKernelConv(nn.Module):
    """Large-kernel decomposition of a ``kernel_size`` x ``kernel_size`` depthwise conv (VAN):
    a depthwise ``(2d-1)`` conv, then a depthwise dilated conv with dilation ``d``.

    With OpenSTL's ``kernel_size=21, dilation=3``: depthwise 5x5, then depthwise 7x7 dilated by 3.
    """

    def __init__(self, dim: int, kernel_size: int = 21, dilation: int = 3) -> None:
        super().__init__()
        local_k = 2 * dilation - 1
        dilated_k = kernel_size // dilation + ((kernel_size // dilation) % 2 - 1)
        self.local = nn.Conv2d(dim, dim, local_k, padding=(local_k - 1) // 2, groups=dim)
        self.dilated = nn.Conv2d(
            dim,
            dim,
            dilated_k,
            padding=dilation * (dilated_k - 1) // 2,
            groups=dim,
            dilation=dilation,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.dilated(self.local(x))


class GatedLargeKernelAttention(nn.Module):
    """gSTA's gating unit: large-kernel conv, 1x1 to ``2 * dim``, ``sigmoid(g) * f``."""

    def __init__(self, dim: int, kernel_size: int = 21) -> None:
        super().__init__()
        self.large_kernel = LargeKernelConv(dim, kernel_size)
        self.proj = nn.Conv2d(dim, 2 * dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        f, g = self.proj(self.large_kernel(x)).chunk(2, dim=1)
        return torch.sigmoid(g) * f


class TemporalAttentionUnit(nn.Module):
    """TAU's attention: static (large-kernel conv + 1x1) times dynamic (squeeze-excitation over
    channels, which here are time-stacked frames) times the input.

    The squeeze-excitation width follows OpenSTL exactly: ``r = max(dim // 16, 4)`` and a hidden
    width of ``dim // r`` (so about 16 for wide translators).
    """

    def __init__(self, dim: int, kernel_size: int = 21, reduction: int = 16) -> None:
        super().__init__()
        self.large_kernel = LargeKernelConv(dim, kernel_size)
        self.proj = nn.Conv2d(dim, dim, 1)
        squeeze = max(dim // max(dim // reduction, 4), 1)
        self.excite = nn.Sequential(
            nn.Linear(dim, squeeze, bias=False),
            nn.ReLU(),
            nn.Linear(squeeze, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        static = self.proj(self.large_kernel(x))
        dynamic = self.excite(x.mean(dim=(-2, -1)))
        return rearrange(dynamic, "b c -> b c 1 1") * static * x


class AttentionBranch(nn.Module):
    """1x1 conv, GELU, gating unit, 1x1 conv, plus the branch's own shortcut (OpenSTL's
    ``SpatialAttention`` / ``TemporalAttention`` with ``attn_shortcut=True``)."""

    def __init__(self, dim: int, gating: nn.Module) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.gating = gating
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.gating(self.act(self.proj_in(x))))


class MixMlp(nn.Module):
    """Convolutional feed-forward: 1x1 up, depthwise 3x3, GELU, 1x1 down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class MetaSubBlock(nn.Module):
    """MetaFormer block: ``x + ls1 * attn(bn(x))``, then ``x + ls2 * mlp(bn(x))``.

    BatchNorm as in OpenSTL's ``GASubBlock`` (kept for fidelity; in eval mode, where beamvq
    forms candidates, it uses running statistics, so stacked candidates do not interact).
    Layer scales start at ``init_value`` (1e-2).
    """

    def __init__(
        self,
        dim: int,
        gating: nn.Module,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
        init_value: float = 1e-2,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = AttentionBranch(dim, gating)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = MixMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(init_value)))
        self.drop_path = DropPath(drop_path)
        fan_out_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        ls1 = rearrange(self.layer_scale_1, "c -> c 1 1")
        ls2 = rearrange(self.layer_scale_2, "c -> c 1 1")
        x = x + self.drop_path(ls1 * self.attn(self.norm1(x)))
        return x + self.drop_path(ls2 * self.mlp(self.norm2(x)))


def gsta_block(dim: int, mlp_ratio: float = 8.0, drop_path: float = 0.0) -> MetaSubBlock:
    """SimVP-v2's gated spatiotemporal attention block (OpenSTL ``GASubBlock``)."""
    return MetaSubBlock(dim, GatedLargeKernelAttention(dim), mlp_ratio, drop_path)


def tau_block(dim: int, mlp_ratio: float = 8.0, drop_path: float = 0.0) -> MetaSubBlock:
    """TAU's block: static large-kernel x dynamic squeeze-excitation (OpenSTL ``TAUSubBlock``)."""
    return MetaSubBlock(dim, TemporalAttentionUnit(dim), mlp_ratio, drop_path)


BlockFactory = Callable[[int, float, float], nn.Module]
"""``(dim, mlp_ratio, drop_path) -> block`` keeping ``(N, dim, h, w)``."""


class MetaTranslator(nn.Module):
    """OpenSTL's ``MidMetaNet``: ``depth`` blocks on ``(B, channels, h, w)`` maps.

    Block ``i`` works at width ``in_channels`` (i = 0) or ``hidden_channels``; a 1x1 conv follows
    it whenever the next width differs (``in -> hidden`` after the first, ``hidden -> out`` after
    the last). Stochastic depth rises linearly from 0 to ``drop_path`` over the blocks.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        depth: int,
        block: BlockFactory,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"MetaTranslator: depth must be >= 1, got {depth}")
        rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path]
        widths = [in_channels] + [hidden_channels] * (depth - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(block(widths[i], mlp_ratio, rates[i]))
            if widths[i] != widths[i + 1]:
                layers.append(nn.Conv2d(widths[i], widths[i + 1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TimeMix(nn.Module):
    """Learned linear map from ``in_steps`` to ``out_steps`` along dim 1 of ``(B, T, ...)``.

    Initialised to copy the last input step into every output step (persistence), so a fresh
    model starts from the most recent frame's features.
    """

    def __init__(self, in_steps: int, out_steps: int) -> None:
        super().__init__()
        weight = torch.zeros(out_steps, in_steps)
        weight[:, -1] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        return einsum(x, self.weight, "b t ..., s t -> b s ...")


__all__ = [
    "AttentionBranch",
    "BlockFactory",
    "GatedLargeKernelAttention",
    "LargeKernelConv",
    "MetaSubBlock",
    "MetaTranslator",
    "MixMlp",
    "SimVPDecoder",
    "SimVPEncoder",
    "SpatialEncoding",
    "TemporalAttentionUnit",
    "TimeMix",
    "downsampling_pattern",
    "gsta_block",
    "tau_block",
]
