"""Earthformer's blocks around cuboid attention (Gao et al., NeurIPS 2022, arXiv 2207.05833):
the pre-norm FFN, the cuboid self-/cross-attention blocks, patch merging, upsampling and the
per-frame convolutional stems of the reference ``cuboid_transformer.py`` (see
``beamvq.backbones.earthformer``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from beamvq.nn.attention import Mlp
from beamvq.nn.cuboid import (
    CuboidCrossAttention,
    CuboidPattern,
    CuboidSelfAttention,
    TokensAndGlobals,
    resolve_pattern,
)
from beamvq.nn.moe import MoEConfig, MoEFeedForward

Size3 = tuple[int, int, int]


class FeedForward(nn.Module):
    """Pre-norm residual GELU FFN with hidden width ``4 * dim`` (reference PositionwiseFFN).

    ``moe``: the MLP becomes a shared + top-1 mixture of experts (:mod:`beamvq.nn.moe`) with the
    same active parameters; ``None`` builds the dense MLP exactly as before.
    """

    def __init__(self, dim: int, dropout: float = 0.0, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp: nn.Module = (
            Mlp(dim, 4 * dim, dropout=dropout)
            if moe is None
            else MoEFeedForward(dim, 4 * dim, moe, dropout=dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class CuboidSelfAttentionBlock(nn.Module):
    """For each cuboid pattern: cuboid self-attention (residual) then an FFN.

    Patterns with a one-token cuboid and no global vectors are skipped (see module docstring).
    ``update_global_last=False`` builds the last layer without the global-vector update;
    ``moe`` makes every FFN a mixture of experts.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        extents: Size3,
        patterns: Sequence[CuboidPattern],
        use_global: bool,
        update_global_last: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        ffn_drop: float = 0.0,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        kept = [p for p in patterns if use_global or math.prod(p.size) > 1]
        self.attns = nn.ModuleList(
            CuboidSelfAttention(
                dim,
                num_heads,
                extents,
                p,
                use_global,
                update_global=update_global_last or i < len(kept) - 1,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
            for i, p in enumerate(kept)
        )
        self.ffns = nn.ModuleList(FeedForward(dim, ffn_drop, moe) for _ in kept)

    def forward(self, x: Tensor, global_vectors: Tensor | None = None) -> TokensAndGlobals:
        for attn, ffn in zip(self.attns, self.ffns):
            out = attn(x, global_vectors)
            x = x + out.tokens
            if out.global_vectors is not None:
                global_vectors = global_vectors + out.global_vectors
            x = ffn(x)
        return TokensAndGlobals(x, global_vectors)


class CuboidCrossAttentionBlock(nn.Module):
    """Cuboid cross-attention (residual) then an FFN (reference StackCuboidCrossAttentionBlock)."""

    def __init__(
        self,
        dim: int,
        ffn_drop: float,
        attention_layer: CuboidCrossAttention,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.attn = attention_layer
        self.ffn = FeedForward(dim, ffn_drop, moe)

    def forward(self, x: Tensor, memory: Tensor, global_vectors: Tensor | None = None) -> Tensor:
        return self.ffn(x + self.attn(x, memory, global_vectors))


class PatchMerging(nn.Module):
    """Space-to-depth by ``factor`` in H and W, LayerNorm, bias-free linear (zero-padded)."""

    def __init__(self, dim: int, out_dim: int, factor: int) -> None:
        super().__init__()
        self.factor = int(factor)
        self.norm = nn.LayerNorm(factor * factor * dim)
        self.reduction = nn.Linear(factor * factor * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, H, W, C)`` -> ``(B, T, ceil(H/f), ceil(W/f), out_dim)``."""
        f = self.factor
        x = F.pad(x, (0, 0, 0, (-x.shape[3]) % f, 0, (-x.shape[2]) % f))
        x = rearrange(x, "b t (h fh) (w fw) c -> b t h w (fh fw c)", fh=f, fw=f)
        return self.reduction(self.norm(x))


class Upsample(nn.Module):
    """Per frame nearest upsampling to ``size`` then a 3x3 conv (reference Upsample3DLayer)."""

    def __init__(self, dim: int, out_dim: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = rearrange(x, "b t h w c -> (b t) c h w")
        x = self.conv(F.interpolate(x, size=self.size, mode="nearest"))
        return rearrange(x, "(b t) c h w -> b t h w c", b=b)


def _conv_stack(in_dim: int, out_dim: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x [3x3 conv, GroupNorm (groups of 4 channels), LeakyReLU(0.1)]."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(in_dim if i == 0 else out_dim, out_dim, kernel_size=3, padding=1),
            nn.GroupNorm(max(1, out_dim // 4), out_dim),
            nn.LeakyReLU(0.1),
        ]
    return nn.Sequential(*layers)


def _per_frame(block: nn.Module, x: Tensor) -> Tensor:
    b = x.shape[0]
    y = block(rearrange(x, "b t h w c -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b t h w c", b=b)


class Stem(nn.Module):
    """Initial encoder: per stage a conv stack then a patch merge (reference stack_conv)."""

    def __init__(
        self, in_dim: int, dims: Sequence[int], downscales: Sequence[int], num_convs: int
    ) -> None:
        super().__init__()
        prev = [in_dim, *dims[:-1]]
        self.convs = nn.ModuleList(_conv_stack(p, d, num_convs) for p, d in zip(prev, dims))
        self.merges = nn.ModuleList(PatchMerging(d, d, s) for d, s in zip(dims, downscales))

    def forward(self, x: Tensor) -> Tensor:
        for conv, merge in zip(self.convs, self.merges):
            x = merge(_per_frame(conv, x))
        return x


class StemDecoder(nn.Module):
    """Final decoder mirroring the stem: per stage upsample + 3x3 conv, then a conv stack."""

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        num_convs: int,
    ) -> None:
        super().__init__()
        prev = [in_dim, *dims[:-1]]
        self.ups = nn.ModuleList(Upsample(p, p, s) for p, s in zip(prev, sizes))
        self.convs = nn.ModuleList(_conv_stack(p, d, num_convs) for p, d in zip(prev, dims))

    def forward(self, x: Tensor) -> Tensor:
        for up, conv in zip(self.ups, self.convs):
            x = _per_frame(conv, up(x))
        return x


def init_earthformer_weights(module: nn.Module) -> None:
    """Reference initialization mode "0" (see module docstring)."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# -- building the backbone (helpers of beamvq.backbones.earthformer.Earthformer.__init__) ------
def hierarchy_problems(
    enc_depth: list[int], dec_depth: list[int], dims: list[int], num_heads: int
) -> list[str]:
    """What is wrong with the encoder/decoder hierarchy's settings (empty: nothing)."""
    problems = []
    num_levels = len(enc_depth)
    if num_levels < 1 or len(dec_depth) != num_levels:
        problems.append(f"enc_depth {enc_depth} and dec_depth {dec_depth} need equal length")
    if any(d < 1 for d in enc_depth + dec_depth):
        problems.append("every enc_depth/dec_depth entry must be >= 1")
    if any(d % num_heads for d in dims):
        problems.append(f"level widths {dims} must be divisible by num_heads={num_heads}")
    return problems


def stem_problems(
    stem_dims: list[int], stem_downscales: list[int], base_units: int, downsample: int, convs: int
) -> list[str]:
    """What is wrong with the stem's and the merges' settings (empty: nothing)."""
    problems = []
    if len(stem_dims) != len(stem_downscales) or not stem_dims:
        problems.append(f"stem_dims {stem_dims} and stem_downscales need equal, >0 length")
    elif stem_dims[-1] != base_units:
        problems.append(f"the last stem_dims entry must equal base_units={base_units}")
    if any(s < 1 for s in stem_downscales) or downsample < 1 or convs < 1:
        problems.append("downsample factors and stem_convs must be >= 1")
    return problems


def grid_sizes(
    height: int, width: int, stem_downscales: list[int], downsample: int, num_levels: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Grid sizes after each stem stage (the input grid first), then per hierarchy level."""
    stem_sizes = [(height, width)]
    for s in stem_downscales:
        h, w = stem_sizes[-1]
        stem_sizes.append((-(-h // s), -(-w // s)))
    level_hw = [stem_sizes[-1]]
    for _ in range(num_levels - 1):
        h, w = level_hw[-1]
        level_hw.append((-(-h // downsample), -(-w // downsample)))
    return stem_sizes, level_hw


def layer_patterns(
    name: str,
    cuboid_sizes: Sequence[Sequence[int]] | None,
    cuboid_strategies: Sequence[str] | None,
    shift_sizes: Sequence[Sequence[int]] | None,
    extents: Size3,
) -> list[CuboidPattern]:
    """The cuboid pattern of every attention layer of a block over ``extents``."""
    if cuboid_sizes is None:
        sizes = [(extents[0], 1, 1), (1, extents[1], 1), (1, 1, extents[2])]
    else:
        sizes = [tuple(int(c) for c in s) for s in cuboid_sizes]
    strategies = list(cuboid_strategies or ["lll"] * len(sizes))
    shifts = [tuple(s) for s in shift_sizes] if shift_sizes else [(0, 0, 0)] * len(sizes)
    if not (len(strategies) == len(shifts) == len(sizes)) or any(
        len(s) != 3 for s in [*sizes, *shifts]
    ):
        raise ValueError(
            f"{name}: cuboid_sizes, cuboid_strategies and shift_sizes need one (t, h, w) "
            f"entry per attention layer; got {cuboid_sizes}, {cuboid_strategies}, "
            f"{shift_sizes}"
        )
    return [resolve_pattern(extents, *args) for args in zip(sizes, shifts, strategies)]
