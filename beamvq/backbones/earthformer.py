"""Earthformer: a hierarchical encoder-decoder of cuboid attention.

Gao, Shi, Wang, Zhu, Wang, Li, Yeung, *Earthformer: Exploring Space-Time Transformers for Earth
System Forecasting*, NeurIPS 2022 (arXiv 2207.05833); reference code
``src/earthformer/cuboid_transformer/cuboid_transformer.py`` of
github.com/amazon-science/earth-forecasting-transformer (``CuboidTransformerModel``), SEVIR
configuration ``scripts/cuboid_transformer/sevir/cfg_sevir.yaml``.

Architecture (internally channel-last ``(B, T, H, W, C)`` as in the reference):

1. **Stem** (reference ``InitialStackPatchMergingEncoder``): per frame, for each stage
   ``stem_convs`` x [3x3 conv, GroupNorm (groups of 4 channels), LeakyReLU(0.1)] then a patch
   merge by ``stem_downscales[k]`` (space-to-depth, LayerNorm, bias-free linear) to
   ``stem_dims[k]`` channels; the last stage width is ``base_units``. A learned ``t+h+w``
   position embedding is added.
2. **Encoder**: per level ``i`` (width ``base_units * downsample**i``), ``enc_depth[i]`` cuboid
   attention blocks, then a patch merge by ``downsample`` (and a linear map of the global
   vectors to the next width). A block runs, for each cuboid pattern, cuboid self-attention and
   a pre-norm GELU FFN, each residual.
3. **Cuboid self-attention**: LayerNorm, zero-pad to multiples of the cuboid size, cyclic shift,
   split ``(T, H, W)`` into non-overlapping cuboids (``'l'`` local: contiguous blocks; ``'d'``
   dilated: every ``n``-th element along the axis), multi-head attention inside each cuboid with
   a learned relative position bias, merge back, unshift, crop. With global vectors, every token
   also attends to the ``num_global_vectors`` global vectors (own query projection, one softmax
   with the cuboid's keys) and the global vectors attend to all tokens and to each other (the
   paper's global vectors, reference ``separate_global_qkv=True, use_global_self_attn=True``).
   The default pattern is the paper's SEVIR choice ``axial``: cuboids ``(T,1,1), (1,H,1),
   (1,1,W)``.
4. **Decoder**: initial queries for the ``T_out`` future steps are the learned ``t+h+w``
   position embedding of a zero tensor through a linear map (reference ``z_init_method='zeros'``),
   at the top level. From the top level down: cuboid cross-attention to that level's encoder
   state (each decoder cuboid ``(T_out, kh, kw)`` attends to the memory cuboid
   ``(T_in, kh, kw)`` at the same place, ``cross_1x1`` by default) and cuboid self-attention
   blocks (the top level starts with cross-attention, reference ``dec_use_first_self_attn=False``),
   then nearest upsampling + 3x3 conv to the next level. A mirrored stem (nearest upsampling +
   conv stacks) returns to the input grid and a linear map gives ``C_out``.

The BeamVQ split: ``encode`` = stem + encoder hierarchy; ``z`` = the top (coarsest) encoder
state, channel-first ``(B, D, T_in, h, w)`` with ``D = base_units * downsample**(L-1)``;
``extras`` = a dict of batch-first tensors: ``memory_i`` ``(B, T_in, h_i, w_i, C_i)`` for the
lower levels ``i < L-1`` and ``global_i`` ``(B, G, C_i)`` for every level (absent when
``num_global_vectors = 0``). ``translate`` is the identity; ``decode`` is the decoder (it reads
``z`` as the top level's memory).

Choices the paper/reference leave open or that we make differently:

- Padding (grid not a multiple of a cuboid or merge size) is zeros, as the SEVIR configuration;
  inside cuboid attention padded positions are also masked out as keys and global vectors attend
  only to real tokens (the reference's ``'ignore'`` mode), so results do not depend on padding.
  Any grid works; the model is built for one ``height x width`` because the position embeddings
  and the axial cuboids are sized from it, and ``check_grid`` rejects any other.
- Cuboid sizes larger than an axis are clipped to it (reference ``update_cuboid_size``), so the
  same pattern serves every level. An attention layer whose cuboid holds a single token and that
  has no global vectors would only apply a linear map (its query/key weights get no gradient), so
  it is not built, together with its FFN (e.g. the temporal axis of the decoder when
  ``out_steps = 1``). Likewise a cross-attention with a single memory key per query and no
  global vectors (``in_steps = 1`` with ``1 x 1`` cross cuboids) is built as its value path
  ``proj(W_v m)``, which is what the attention computes there.
- ``dec_global_vectors=True`` lets the decoder's cross-attention also attend to each level's
  encoder global vectors (reference ``use_dec_cross_global``). With ``False`` (the SEVIR
  configuration) nothing reads the global vectors after the top level's last attention layer,
  so that layer's global update (5 linear maps) is not built; the reference builds it unused.
- Cross-attention's relative time offset is the true one between a future step ``T_in + t`` and
  a past step ``t'``; the reference indexes both from 0. The table has the reference's size
  ``2 (T_in + T_out) - 1`` either way.
- Option (not in the paper): ``moe`` turns every FFN into Hunyuan-Large's mixture of experts
  (arXiv 2411.02265; :mod:`beamvq.nn.moe`) at equal active parameters.
- Not implemented (off in the SEVIR configuration): an FFN on the global vectors, global
  vectors in the decoder's self-attention, hierarchical decoder position embeddings, gated FFN,
  gradient checkpointing.
- Initialization as the reference's mode ``"0"``: linear layers He-normal by fan-in (linear
  gain), convolutions He-normal by fan-out (leaky-ReLU gain 0.1), zero biases,
  ``trunc_normal(0.02)`` for embeddings, bias tables and the initial global vectors.

Parameter count at the paper's SEVIR preset (``configs/backbones/earthformer_paper.yaml``):
8,200,661. The reference architecture counts 459,008 more (8,659,669): the unused top-level
global update described above. The reference package, built at that configuration, reports
8,659,677 (see ``docs/backbones.md`` for the 8-parameter difference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import check_earthformer_arguments
from beamvq.backbones.base import Backbone, Encoded
from beamvq.nn.attention import (
    AxialPositionEmbedding,
)
from beamvq.nn.cuboid import (
    CuboidCrossAttention,
    CuboidPattern,
    CuboidSelfAttention,
    cuboid_merge,
    cuboid_partition,
    resolve_pattern,
)
from beamvq.nn.cuboid_blocks import (
    CuboidCrossAttentionBlock,
    CuboidSelfAttentionBlock,
    PatchMerging,
    Stem,
    StemDecoder,
    Upsample,
    grid_sizes,
    hierarchy_problems,
    init_earthformer_weights,
    layer_patterns,
    stem_problems,
)
from beamvq.nn.moe import MoEConfig, number_moe_layers

Size3 = tuple[int, int, int]


# ``layer_patterns`` with the settings bound: a block's extents -> its layers' patterns
Patterns = Callable[[Size3], list[CuboidPattern]]


# -- the backbone ------------------------------------------------------------------------------
class Earthformer(Backbone):
    """Earthformer (cuboid-attention encoder-decoder); ``z`` is the top encoder state.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        height, width: the grid the model is built for (learned position embeddings and axial
            cuboids are sized from it); any size is allowed (zero padding inside).
        base_units: width of the first hierarchy level (and last stem stage).
        num_heads: attention heads (every level width must be divisible by it).
        enc_depth, dec_depth: cuboid attention blocks per hierarchy level (same length ``L``).
        num_global_vectors: number of global vectors (0 disables them).
        downsample: patch-merge factor in H and W between levels; level ``i`` has width
            ``base_units * downsample**i``.
        stem_dims: widths of the stem stages (last = ``base_units``); default all
            ``base_units``.
        stem_downscales: downsampling factor of each stem stage (1 = none).
        stem_convs: 3x3 convs per stem stage (and per mirrored decoder stage), >= 1.
        cuboid_sizes: ``(t, h, w)`` cuboid per self-attention layer of every block (encoder and
            decoder); sizes larger than an axis cover the axis. ``None`` = the paper's ``axial``
            pattern ``(T,1,1), (1,H,1), (1,1,W)``.
        cuboid_strategies: per layer, 3 letters ``'l'`` (local) / ``'d'`` (dilated) for
            ``(t, h, w)``; default all local.
        shift_sizes: per layer, cyclic shift ``(t, h, w)`` (Swin-style); default none.
        cross_cuboid_hw: ``(kh, kw)`` of the decoder's cross-attention cuboids (``(1, 1)`` is
            the paper's ``cross_1x1``).
        dec_global_vectors: the decoder's cross-attention also attends to the encoder's global
            vectors.
        attn_drop, proj_drop, ffn_drop: dropout on attention probabilities, after attention
            projections, and in the FFNs (0.1 each in the paper's SEVIR run).
        moe: every FFN becomes a mixture of experts (Hunyuan-Large's shared expert + top-1
            specialized experts with recycle routing; :class:`~beamvq.nn.moe.MoEConfig`);
            ``None`` (default) is the published dense FFN.
    """

    grid_args = ("height", "width")  # built for one grid (learned position embeddings)

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        height: int,
        width: int,
        base_units: int = 32,
        num_heads: int = 4,
        enc_depth: Sequence[int] = (1, 1),
        dec_depth: Sequence[int] = (1, 1),
        num_global_vectors: int = 8,
        downsample: int = 2,
        stem_dims: Sequence[int] | None = None,
        stem_downscales: Sequence[int] = (2,),
        stem_convs: int = 2,
        cuboid_sizes: Sequence[Sequence[int]] | None = None,
        cuboid_strategies: Sequence[str] | None = None,
        shift_sizes: Sequence[Sequence[int]] | None = None,
        cross_cuboid_hw: Sequence[int] = (1, 1),
        dec_global_vectors: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        ffn_drop: float = 0.0,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        name = type(self).__name__
        rates = {"attn_drop": attn_drop, "proj_drop": proj_drop, "ffn_drop": ffn_drop}
        check_earthformer_arguments(
            name, height, width, base_units, num_heads, enc_depth, dec_depth,
            num_global_vectors, downsample, stem_dims, stem_downscales, stem_convs,
            cuboid_sizes, shift_sizes, cross_cuboid_hw, rates,
        )  # fmt: skip
        self.height, self.width = int(height), int(width)
        enc_depth, dec_depth = [int(d) for d in enc_depth], [int(d) for d in dec_depth]
        stem_downscales = [int(s) for s in stem_downscales]
        stem_dims = [base_units] * len(stem_downscales) if stem_dims is None else list(stem_dims)
        num_levels = len(enc_depth)
        dims = [base_units * downsample**i for i in range(num_levels)]
        problems = []
        if self.height < 1 or self.width < 1:
            problems.append(f"height and width must be >= 1, got {height}x{width}")
        problems += hierarchy_problems(enc_depth, dec_depth, dims, num_heads)
        problems += stem_problems(stem_dims, stem_downscales, base_units, downsample, stem_convs)
        if num_global_vectors < 0:
            problems.append("num_global_vectors must be >= 0")
        if problems:
            raise ValueError(f"{name}: " + "; ".join(problems))

        self.latent_dim = dims[-1]
        self.num_global_vectors = int(num_global_vectors)
        use_global = self.num_global_vectors > 0
        self.dec_global_vectors = bool(dec_global_vectors) and use_global
        stem_sizes, level_hw = grid_sizes(
            self.height, self.width, stem_downscales, downsample, num_levels
        )
        self.level_hw = level_hw
        patterns = partial(layer_patterns, name, cuboid_sizes, cuboid_strategies, shift_sizes)
        drops = {"attn_drop": attn_drop, "proj_drop": proj_drop, "ffn_drop": ffn_drop, "moe": moe}

        # Stem, encoder and decoder (in this order: it is the order of the random init).
        self.stem = Stem(in_channels, stem_dims, stem_downscales, stem_convs)
        self.enc_pos_embed = AxialPositionEmbedding(base_units, (in_steps, *level_hw[0]))
        if use_global:
            self.init_global_vectors = nn.Parameter(torch.zeros(num_global_vectors, base_units))
            nn.init.trunc_normal_(self.init_global_vectors, std=0.02)
        self._build_encoder(dims, num_heads, enc_depth, downsample, patterns, drops)
        self._build_decoder(dims, num_heads, dec_depth, cross_cuboid_hw, patterns, drops)
        self.stem_decoder = StemDecoder(base_units, stem_dims[::-1], stem_sizes[-2::-1], stem_convs)
        self.head = nn.Linear(stem_dims[0], out_channels)
        for module in self.modules():
            init_earthformer_weights(module)
        number_moe_layers(self)

    def _build_encoder(
        self,
        dims: list[int],
        num_heads: int,
        enc_depth: list[int],
        downsample: int,
        patterns: Patterns,
        drops: dict[str, Any],
    ) -> None:
        """The encoder's levels of self-attention blocks, patch merges and global merges."""
        num_levels, level_hw = len(dims), self.level_hw
        use_global = self.num_global_vectors > 0
        self.encoder = nn.ModuleList()
        for i in range(num_levels):
            extents = (self.in_steps, *level_hw[i])
            top = i == num_levels - 1
            self.encoder.append(
                nn.ModuleList(
                    CuboidSelfAttentionBlock(
                        dims[i],
                        num_heads,
                        extents,
                        patterns(extents),
                        use_global,
                        # Nothing reads the top level's final global vectors unless the decoder does.
                        update_global_last=not (top and j == enc_depth[i] - 1)
                        or self.dec_global_vectors,
                        **drops,
                    )
                    for j in range(enc_depth[i])
                )
            )
        self.merges = nn.ModuleList(
            PatchMerging(dims[i], dims[i + 1], downsample) for i in range(num_levels - 1)
        )
        self.global_merges = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1]) for i in range(num_levels - 1) if use_global
        )

    def _build_decoder(
        self,
        dims: list[int],
        num_heads: int,
        dec_depth: list[int],
        cross_cuboid_hw: Sequence[int],
        patterns: Patterns,
        drops: dict[str, Any],
    ) -> None:
        """The initial queries, the decoder's levels of self- and cross-attention blocks, and
        the upsamplings between them."""
        num_levels, level_hw = len(dims), self.level_hw
        in_steps, out_steps = self.in_steps, self.out_steps
        attn_drop, proj_drop = drops["attn_drop"], drops["proj_drop"]
        ffn_drop, moe = drops["ffn_drop"], drops["moe"]
        top_hw = level_hw[-1]
        self.dec_pos_embed = AxialPositionEmbedding(dims[-1], (out_steps, *top_hw))
        self.query_proj = nn.Linear(dims[-1], dims[-1])
        self.dec_self = nn.ModuleList()
        self.dec_cross = nn.ModuleList()
        for i in range(num_levels):
            extents = (out_steps, *level_hw[i])
            # The top level starts with cross-attention (reference dec_use_first_self_attn=False).
            n_self = dec_depth[i] - 1 if i == num_levels - 1 else dec_depth[i]
            self.dec_self.append(
                nn.ModuleList(
                    CuboidSelfAttentionBlock(
                        dims[i], num_heads, extents, patterns(extents), False, **drops
                    )
                    for _ in range(n_self)
                )
            )
            self.dec_cross.append(
                nn.ModuleList(
                    CuboidCrossAttentionBlock(
                        dims[i],
                        ffn_drop,
                        CuboidCrossAttention(
                            dims[i],
                            num_heads,
                            out_steps,
                            in_steps,
                            level_hw[i],
                            cross_cuboid_hw,
                            self.dec_global_vectors,
                            attn_drop,
                            proj_drop,
                        ),
                        moe,
                    )
                    for _ in range(dec_depth[i])
                )
            )
        self.dec_ups = nn.ModuleList(
            Upsample(dims[i + 1], dims[i], level_hw[i]) for i in range(num_levels - 1)
        )

    # -- contract ---------------------------------------------------------------------------
    def check_grid(self, height: int, width: int) -> None:
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"{type(self).__name__}: grid {height}x{width} is not allowed: this model was "
                f"built for {self.height}x{self.width} (its learned position embeddings and axial "
                f"cuboids are sized from the grid); build it with height={height}, width={width}"
            )

    def encode(self, x: Tensor) -> Encoded:
        """``(B, T_in, C_in, H, W)`` -> ``z: (B, D, T_in, h, w)`` plus memory/global extras."""
        self.check_input(x)
        x = self.enc_pos_embed(self.stem(rearrange(x, "b t c h w -> b t h w c")))
        g = None
        if self.num_global_vectors:
            g = self.init_global_vectors.expand(x.shape[0], -1, -1)
        extras: dict[str, Tensor] = {}
        num_levels = len(self.encoder)
        for i, blocks in enumerate(self.encoder):
            for block in blocks:
                x, g = block(x, g)
            if g is not None:
                extras[f"global_{i}"] = g
            if i < num_levels - 1:
                extras[f"memory_{i}"] = x
                x = self.merges[i](x)
                if g is not None:
                    g = self.global_merges[i](g)
        return Encoded(rearrange(x, "b t h w c -> b c t h w"), extras)

    def decode(self, enc: Encoded) -> Tensor:
        """``Encoded`` -> ``(B, T_out, C_out, H, W)``."""
        top = rearrange(enc.z, "b c t h w -> b t h w c")
        extras = enc.extras
        num_levels = len(self.dec_cross)
        zeros = top.new_zeros(1, self.out_steps, *self.level_hw[-1], self.latent_dim)
        x = self.query_proj(self.dec_pos_embed(zeros)).expand(top.shape[0], -1, -1, -1, -1)
        for i in range(num_levels - 1, -1, -1):
            memory = top if i == num_levels - 1 else extras[f"memory_{i}"]
            g = extras[f"global_{i}"] if self.dec_global_vectors else None
            selfs, crosses = self.dec_self[i], self.dec_cross[i]
            if i == num_levels - 1:
                x = crosses[0](x, memory, g)
                for block, cross in zip(selfs, crosses[1:]):
                    x = cross(block(x).tokens, memory, g)
            else:
                for block, cross in zip(selfs, crosses):
                    x = cross(block(x).tokens, memory, g)
            if i > 0:
                x = self.dec_ups[i - 1](x)
        y = self.head(self.stem_decoder(x))
        return rearrange(y, "b t h w c -> b t c h w")


# the cuboid parts, re-exported where they were defined before the split into beamvq/nn/
__all__ = [
    "CuboidCrossAttention",
    "CuboidPattern",
    "CuboidSelfAttention",
    "CuboidSelfAttentionBlock",
    "Earthformer",
    "cuboid_merge",
    "cuboid_partition",
    "resolve_pattern",
]
