"""FourCastNet: an AFNO vision transformer for global weather forecasting.

Pathak, Subramanian, Harrington, Raja, Chattopadhyay, Mardani, Kurth, Hall, Li,
Azizzadenesheli, Hassanzadeh, Kashinath, Anandkumar, *FourCastNet: A Global Data-driven
High-resolution Weather Model using Adaptive Fourier Neural Operators* (arXiv 2202.11214);
reference ``networks/afnonet.py`` of github.com/NVlabs/FourCastNet. Token mixer: AFNO (Guibas et
al. 2021, arXiv 2111.13587), :class:`~beamvq.nn.spectral.AFNOMixing`.

Architecture (as in the reference ``AFNONet``): the ``T_in`` frames are stacked in channels; a
patch embedding (``p x p`` convolution with stride ``p``) to ``embed_dim``; a learned positional
embedding over the ``H/p x W/p`` token grid (so the grid is fixed at construction: ``height``,
``width``); ``depth`` AFNO blocks, each ``x <- x + h + AFNO(h)`` with ``h = LayerNorm(x)`` (the
reference's ``double_skip``, whose filter also adds its input), then
``x <- x + MLP(LayerNorm(x))`` (ratio 4, GELU); a bias-free linear head to ``p * p * T_out *
C_out`` values per token, unpatchified. LayerNorm eps 1e-6, truncated-normal (std 0.02) init of
linear layers and the positional embedding, as in the reference. The reference's final
``self.norm`` is never used in its forward, so it is left out (it would be an unused parameter).
Dropout and drop-path are 0 in the published configuration and are not offered.

Option (not in the paper): ``moe`` turns every block's MLP into Hunyuan-Large's mixture of
experts (arXiv 2411.02265; :mod:`beamvq.nn.moe`) at equal active parameters.

Where the latent sits: ``encode`` = patch embedding + positional embedding + the first
``encoder_depth`` AFNO blocks; ``z = (B, embed_dim, H/p, W/p)``, the token grid, channel-first.
``translate`` is the identity; ``decode`` = the remaining blocks + head.

Grid: ``H`` and ``W`` must be multiples of ``patch_size`` and equal the ``height x width`` the
model was built for (learned positional embedding); ``check_grid`` says which.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import backbone_key, non_negative, non_negative_int, positive, positive_int
from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.moe import MoEConfig, MoEFeedForward, number_moe_layers
from beamvq.nn.spectral import AFNOMixing


class AFNOBlock(nn.Module):
    """``x + h + AFNO(h)`` with ``h = LN(x)``, then ``x + MLP(LN(x))`` on ``(B, h, w, C)`` tokens.

    ``moe``: replace the MLP by a shared + top-1 mixture of experts (:mod:`beamvq.nn.moe`) with
    the same active parameters; ``None`` builds the dense MLP exactly as before.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        mlp_ratio: float,
        sparsity_threshold: float,
        hard_thresholding_fraction: float,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mixing = AFNOMixing(dim, num_blocks, sparsity_threshold, hard_thresholding_fraction)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp: nn.Module = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            if moe is None
            else MoEFeedForward(dim, hidden, moe)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        # Two skips, as the reference: AFNO2D returns filter(h) + h and the block adds x.
        x = x + h + self.mixing(h)
        return x + self.mlp(self.norm2(x))


class FourCastNet(Backbone):
    """AFNO transformer on a fixed ``height x width`` grid; ``z`` is the token grid.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        height, width: the grid (needed by the learned positional embedding).
        patch_size: side of the square patches (8 in the paper).
        embed_dim: token width, also the latent width ``D`` (768 in the paper).
        depth: number of AFNO blocks (12 in the paper).
        encoder_depth: how many of them ``encode`` runs (0 .. ``depth``).
        num_blocks: diagonal blocks of the AFNO channel MLP (8 in the paper).
        mlp_ratio: hidden width of each block's MLP over ``embed_dim`` (4).
        sparsity_threshold: soft-shrinkage λ of AFNO (0.01).
        hard_thresholding_fraction: fraction of Fourier modes AFNO keeps per axis (1.0).
        moe: every block's MLP becomes a mixture of experts (Hunyuan-Large's shared expert +
            top-1 specialized experts with recycle routing; :class:`~beamvq.nn.moe.MoEConfig`);
            ``None`` (default) is the published dense MLP.
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
        patch_size: int = 4,
        embed_dim: int = 64,
        depth: int = 4,
        encoder_depth: int = 2,
        num_blocks: int = 8,
        mlp_ratio: float = 4.0,
        sparsity_threshold: float = 0.01,
        hard_thresholding_fraction: float = 1.0,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, "FourCastNet")
        for arg, value in (
            ("height", height), ("width", width), ("patch_size", patch_size),
            ("embed_dim", embed_dim), ("depth", depth), ("num_blocks", num_blocks),
        ):  # fmt: skip
            positive_int(key(arg), value)
        non_negative_int(key("encoder_depth"), encoder_depth)
        if not encoder_depth <= depth:
            raise ValueError(
                f"{key('encoder_depth')} must be in [0, depth={depth}], got {encoder_depth}"
            )
        if embed_dim % num_blocks:
            raise ValueError(
                f"{key('embed_dim')} ({embed_dim}) must be a multiple of num_blocks ({num_blocks})"
            )
        positive(key("mlp_ratio"), mlp_ratio)
        non_negative(key("sparsity_threshold"), sparsity_threshold)
        positive(key("hard_thresholding_fraction"), hard_thresholding_fraction)
        if hard_thresholding_fraction > 1:
            raise ValueError(
                f"{key('hard_thresholding_fraction')} must be in (0, 1], got "
                f"{hard_thresholding_fraction}"
            )
        self.patch_size = patch_size
        self.height = height
        self.width = width
        if height < 1 or width < 1 or height % patch_size or width % patch_size:
            raise divisible_grid_error(
                type(self).__name__, height, width, patch_size, f"patch_size={patch_size}"
            )
        self.latent_dim = embed_dim
        self.encoder_depth = encoder_depth
        tokens_h, tokens_w = height // patch_size, width // patch_size
        self.patch_embed = nn.Conv2d(
            in_steps * in_channels, embed_dim, kernel_size=patch_size, stride=patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens_h, tokens_w, embed_dim))
        self.blocks = nn.ModuleList(
            AFNOBlock(
                embed_dim,
                num_blocks,
                mlp_ratio,
                sparsity_threshold,
                hard_thresholding_fraction,
                moe,
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(embed_dim, out_steps * out_channels * patch_size**2, bias=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        number_moe_layers(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The reference's init: truncated normal linear weights, zero biases, unit LayerNorms.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_grid(self, height: int, width: int) -> None:
        name = type(self).__name__
        if height % self.patch_size or width % self.patch_size:
            raise divisible_grid_error(
                name, height, width, self.patch_size, f"patch_size={self.patch_size}"
            )
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"{name}: grid {height}x{width} is not allowed: this model was built for "
                f"{self.height}x{self.width} (its positional embedding is learned per token); "
                f"build it with height={height}, width={width} to use that grid"
            )

    def encode(self, x: Tensor) -> Encoded:
        tokens = self.patch_embed(rearrange(x, "b t c h w -> b (t c) h w"))
        tokens = rearrange(tokens, "b d h w -> b h w d") + self.pos_embed
        for block in self.blocks[: self.encoder_depth]:
            tokens = block(tokens)
        return Encoded(z=rearrange(tokens, "b h w d -> b d h w"))

    def decode(self, enc: Encoded) -> Tensor:
        tokens = rearrange(enc.z, "b d h w -> b h w d")
        for block in self.blocks[self.encoder_depth :]:
            tokens = block(tokens)
        return rearrange(
            self.head(tokens),
            "b h w (p1 p2 t c) -> b t c (h p1) (w p2)",
            p1=self.patch_size,
            p2=self.patch_size,
            t=self.out_steps,
            c=self.out_channels,
        )


__all__ = ["AFNOBlock", "FourCastNet"]
