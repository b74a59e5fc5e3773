"""Cuboid attention of Earthformer (Gao et al., NeurIPS 2022, arXiv 2207.05833): the cuboid
decomposition (partition, merge, patterns, masks; pure functions) and cuboid self- and
cross-attention, as in the reference ``cuboid_transformer.py`` (see ``beamvq.backbones.earthformer``
for the architecture and the choices made)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from beamvq.nn.attention import (
    ExtraKeys,
    MultiHeadAttention,
    RelativePositionBias,
    attention,
    grid_coords,
    merge_heads,
    split_heads,
)

Size3 = tuple[int, int, int]


# -- cuboid decomposition (pure functions) -----------------------------------------------------
def _cuboid_axes(strategy: str) -> tuple[str, str]:
    """einops axis groups of ``(T, H, W)``: local ``(n b)`` or dilated ``(b n)`` per axis."""
    if len(strategy) != 3 or any(s not in "ld" for s in strategy):
        raise ValueError(f"cuboid strategy must be 3 letters of 'l'/'d', got {strategy!r}")
    groups = []
    for axis, s in zip("thw", strategy):
        groups.append(f"(n{axis} b{axis})" if s == "l" else f"(b{axis} n{axis})")
    return " ".join(groups), "(nt nh nw) (bt bh bw)"


def cuboid_partition(x: Tensor, cuboid: Sequence[int], strategy: str = "lll") -> Tensor:
    """Split ``(B, T, H, W, C)`` into cuboids: ``(B, num_cuboids, cuboid_volume, C)``.

    Along an axis of length ``L = n * b`` with cuboid size ``b``, ``'l'`` (local) groups the
    contiguous runs ``[j b, (j+1) b)``; ``'d'`` (dilated) groups ``{j, j + n, j + 2n, ...}``.
    Cuboids are ordered ``(t, h, w)`` row-major, and so are the tokens inside each cuboid.
    """
    bt, bh, bw = (int(c) for c in cuboid)
    _, t, h, w, _ = x.shape
    if t % bt or h % bh or w % bw:
        raise ValueError(f"cuboid_partition: grid {(t, h, w)} is not a multiple of {(bt, bh, bw)}")
    grid, cuboids = _cuboid_axes(strategy)
    return rearrange(x, f"b {grid} c -> b {cuboids} c", bt=bt, bh=bh, bw=bw)


def cuboid_merge(x: Tensor, cuboid: Sequence[int], strategy: str, grid: Sequence[int]) -> Tensor:
    """Inverse of :func:`cuboid_partition`: ``(B, n, V, C)`` back to ``(B, T, H, W, C)``."""
    bt, bh, bw = (int(c) for c in cuboid)
    t, h, w = (int(g) for g in grid)
    pattern_grid, cuboids = _cuboid_axes(strategy)
    return rearrange(
        x,
        f"b {cuboids} c -> b {pattern_grid} c",
        bt=bt,
        bh=bh,
        bw=bw,
        nt=t // bt,
        nh=h // bh,
        nw=w // bw,
    )


class CuboidPattern(NamedTuple):
    """One cuboid attention layer's decomposition: size, cyclic shift and strategy per axis."""

    size: Size3
    shift: Size3
    strategy: str


def resolve_pattern(
    extents: Sequence[int], size: Sequence[int], shift: Sequence[int], strategy: str
) -> CuboidPattern:
    """Clip a pattern to a grid (reference ``update_cuboid_size_shift_size``).

    A cuboid larger than an axis covers the whole axis; a whole-axis or dilated axis is not
    shifted (a cyclic shift would change nothing, or would break the dilation).
    """
    _cuboid_axes(strategy)
    out_size, out_shift = [], []
    for extent, c, s, st in zip(extents, size, shift, strategy):
        if c < 1 or s < 0:
            raise ValueError(f"cuboid size must be >= 1 and shift >= 0, got {size}, {shift}")
        c = min(int(c), int(extent))
        s = 0 if (st == "d" or c == extent) else int(s)
        if s >= c:
            raise ValueError(f"cuboid shift {shift} must be smaller than the cuboid size {size}")
        out_size.append(c)
        out_shift.append(s)
    return CuboidPattern(tuple(out_size), tuple(out_shift), strategy)  # type: ignore[arg-type]


def _pads(extents: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    return tuple((-int(e)) % int(c) for e, c in zip(extents, size))


def _region_ids(length: int, size: int, shift: int) -> Tensor:
    """Swin's shifted-window regions along one (padded, already rolled) axis: 0, 1 or 2.

    After rolling by ``-shift`` the last cuboid holds positions that were far apart; tokens
    may attend only within their own region.
    """
    ids = torch.zeros(length, dtype=torch.long)
    if shift > 0:
        ids[length - size : length - shift] = 1
        ids[length - shift :] = 2
    return ids


def cuboid_attention_mask(extents: Sequence[int], pattern: CuboidPattern) -> Tensor | None:
    """``(num_cuboids, V, V)`` boolean mask (``True`` = may attend), ``None`` when all may.

    Masks padded keys and, with a cyclic shift, keys from another shifted-window region. Every
    token keeps itself, so no row is empty (padded queries are cropped afterwards anyway).
    """
    pads = _pads(extents, pattern.size)
    if not any(pads) and not any(pattern.shift):
        return None
    padded = [e + p for e, p in zip(extents, pads)]
    real = F.pad(torch.ones(*extents), (0, pads[2], 0, pads[1], 0, pads[0]))
    ids = [
        _region_ids(length, size, shift)
        for length, size, shift in zip(padded, pattern.size, pattern.shift)
    ]
    region = ids[0].view(-1, 1, 1) * 9 + ids[1].view(1, -1, 1) * 3 + ids[2].view(1, 1, -1)
    # The region ids are defined on the rolled grid; the validity map must be rolled like x.
    real = torch.roll(real, shifts=tuple(-s for s in pattern.shift), dims=(0, 1, 2))
    stacked = torch.stack((real, region.float()), dim=-1)[None]
    cub = cuboid_partition(stacked, pattern.size, pattern.strategy)[0]  # (n, V, 2)
    key_real = cub[..., 0] > 0.5
    same_region = cub[..., 1][:, :, None] == cub[..., 1][:, None, :]
    eye = torch.eye(cub.shape[1], dtype=torch.bool)
    return (same_region & key_real[:, None, :]) | eye


# -- layers ------------------------------------------------------------------------------------
class TokensAndGlobals(NamedTuple):
    """Tokens ``(B, T, H, W, C)`` and global vectors ``(B, G, C)`` (``None`` when unused)."""

    tokens: Tensor
    global_vectors: Tensor | None


class CuboidSelfAttention(nn.Module):
    """Cuboid self-attention with optional global vectors; returns the residual updates.

    Args:
        dim, num_heads: token width and heads.
        extents: the ``(T, H, W)`` grid this layer runs on.
        pattern: cuboid size/shift/strategy, already clipped to ``extents``.
        use_global: tokens attend to the global vectors too.
        update_global: the global vectors attend to all tokens and to each other (an update is
            returned); requires ``use_global``.
        attn_drop, proj_drop: dropout on attention probabilities and after the projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        extents: Size3,
        pattern: CuboidPattern,
        use_global: bool,
        update_global: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.extents = tuple(extents)
        self.pattern = pattern
        self.pads = _pads(extents, pattern.size)
        self.use_global = use_global
        self.update_global = use_global and update_global
        self.attn_drop = float(attn_drop)
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.rel_bias = RelativePositionBias(pattern.size, num_heads)
        self.register_buffer("coords", grid_coords(pattern.size), persistent=False)
        self.rel_bias.check(self.coords, self.coords)
        self.register_buffer("mask", cuboid_attention_mask(extents, pattern), persistent=False)
        if use_global:
            self.global_norm = nn.LayerNorm(dim)
            # Local-to-global: a separate query for the global keys (reference l2g_*).
            self.l2g_q = nn.Linear(dim, dim, bias=False)
            self.l2g_kv = nn.Linear(dim, 2 * dim, bias=False)
        if self.update_global:
            # Global-to-local and global-to-global (reference g2l_*, g2g_*).
            self.g2l_q = nn.Linear(dim, dim, bias=False)
            self.g2l_k = nn.Linear(dim, dim, bias=False)
            self.g2l_v = nn.Linear(dim, dim, bias=False)
            self.g2g_qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.global_proj = nn.Linear(dim, dim)
            self.global_proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, global_vectors: Tensor | None = None) -> TokensAndGlobals:
        """``x: (B, T, H, W, C)``, ``global_vectors: (B, G, C)`` -> updates of both."""
        if self.use_global and global_vectors is None:
            raise ValueError("CuboidSelfAttention: built with global vectors, none given")
        xn = self.norm(x)
        pt, ph, pw = self.pads
        shift = self.pattern.shift
        padded = F.pad(xn, (0, 0, 0, pw, 0, ph, 0, pt))
        if any(shift):
            padded = torch.roll(padded, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        cub = cuboid_partition(padded, self.pattern.size, self.pattern.strategy)  # (B, n, V, C)
        extra = None
        gn = None
        if self.use_global:
            gn = self.global_norm(global_vectors)
            gk, gv = self.l2g_kv(gn).chunk(2, dim=-1)
            extra = ExtraKeys(
                k=split_heads(gk, self.num_heads)[:, None],  # broadcast over cuboids
                v=split_heads(gv, self.num_heads)[:, None],
                q=split_heads(self.l2g_q(cub), self.num_heads),
            )
        bias = self.rel_bias(self.coords, self.coords)  # (heads, V, V)
        mask = None if self.mask is None else self.mask[:, None]  # (n, 1, V, V)
        out = self.attn(cub, bias=bias, mask=mask, extra=extra)
        out = cuboid_merge(out, self.pattern.size, self.pattern.strategy, padded.shape[1:4])
        if any(shift):
            out = torch.roll(out, shifts=tuple(shift), dims=(1, 2, 3))
        t, h, w = self.extents
        out = out[:, :t, :h, :w]
        new_global = None
        if self.update_global:
            tokens = rearrange(xn, "b t h w c -> b (t h w) c")
            gq, gk, gv = self.g2g_qkv(gn).chunk(3, dim=-1)
            heads = self.num_heads
            g_out = attention(
                split_heads(self.g2l_q(gn), heads),
                split_heads(self.g2l_k(tokens), heads),
                split_heads(self.g2l_v(tokens), heads),
                extra=ExtraKeys(
                    k=split_heads(gk, heads), v=split_heads(gv, heads), q=split_heads(gq, heads)
                ),
                dropout_p=self.attn_drop if self.training else 0.0,
            )
            new_global = self.global_proj_drop(self.global_proj(merge_heads(g_out)))
        return TokensAndGlobals(out, new_global)


class CuboidCrossAttention(nn.Module):
    """Decoder-to-memory cuboid cross-attention; returns the residual update of ``x``.

    Both tensors are cut into the same ``(h/kh) x (w/kw)`` columns: the decoder cuboid
    ``(T_x, kh, kw)`` attends to the memory cuboid ``(T_mem, kh, kw)`` at the same place (local
    strategy, no shift, one temporal cuboid: the reference's ``cross_KxK`` patterns). Relative
    position bias over (time offset, dh, dw); decoder step ``t`` sits at time ``T_mem + t``.

    Args:
        dim, num_heads: token width and heads.
        steps_x, steps_mem: ``T_x`` (decoder steps) and ``T_mem`` (memory steps).
        extents_hw: the ``(H, W)`` grid of both tensors.
        cuboid_hw: ``(kh, kw)``, clipped to the grid.
        use_global: also attend to the memory's global vectors.
        attn_drop, proj_drop: dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        steps_x: int,
        steps_mem: int,
        extents_hw: tuple[int, int],
        cuboid_hw: Sequence[int],
        use_global: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        h, w = extents_hw
        kh, kw = min(int(cuboid_hw[0]), h), min(int(cuboid_hw[1]), w)
        self.extents_hw = (h, w)
        self.steps = (steps_x, steps_mem)
        self.cuboid_hw = (kh, kw)
        self.pads = _pads((h, w), (kh, kw))
        self.use_global = use_global
        # One memory key per query and no global keys: the softmax weight is 1 whatever the
        # query, so only the value path exists (query, norm and bias would get no gradient).
        self.single_key = steps_mem * kh * kw == 1 and not use_global
        if self.single_key:
            self.value = nn.Linear(dim, dim, bias=False)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)
            return
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.rel_bias = RelativePositionBias((steps_x + steps_mem, kh, kw), num_heads)
        q_coords = grid_coords((steps_x, kh, kw)) + torch.tensor([steps_mem, 0, 0])
        self.register_buffer("q_coords", q_coords, persistent=False)
        self.register_buffer("k_coords", grid_coords((steps_mem, kh, kw)), persistent=False)
        self.rel_bias.check(self.q_coords, self.k_coords)
        key_mask = None
        if any(self.pads):
            real = F.pad(
                torch.ones(1, steps_mem, h, w, 1), (0, 0, 0, self.pads[1], 0, self.pads[0])
            )
            key_mask = cuboid_partition(real, (steps_mem, kh, kw))[0, :, None, None, :, 0] > 0.5
        self.register_buffer("key_mask", key_mask, persistent=False)  # (n, 1, 1, Vm)
        if use_global:
            self.l2g_q = nn.Linear(dim, dim, bias=False)
            self.l2g_kv = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, memory: Tensor, global_vectors: Tensor | None = None) -> Tensor:
        """``x: (B, T_x, H, W, C)``, ``memory: (B, T_mem, H, W, C)`` -> update of ``x``."""
        if self.use_global and global_vectors is None:
            raise ValueError("CuboidCrossAttention: built with global vectors, none given")
        if self.single_key:
            update = self.proj_drop(self.proj(self.value(memory)))  # (B, 1, H, W, C)
            return update.expand(-1, x.shape[1], -1, -1, -1)
        ph, pw = self.pads
        steps_x, steps_mem = self.steps
        kh, kw = self.cuboid_hw
        xq = cuboid_partition(F.pad(self.norm(x), (0, 0, 0, pw, 0, ph)), (steps_x, kh, kw))
        mem = cuboid_partition(F.pad(memory, (0, 0, 0, pw, 0, ph)), (steps_mem, kh, kw))
        extra = None
        if self.use_global:
            gk, gv = self.l2g_kv(global_vectors).chunk(2, dim=-1)
            extra = ExtraKeys(
                k=split_heads(gk, self.num_heads)[:, None],
                v=split_heads(gv, self.num_heads)[:, None],
                q=split_heads(self.l2g_q(xq), self.num_heads),
            )
        bias = self.rel_bias(self.q_coords, self.k_coords)
        out = self.attn(xq, mem, bias=bias, mask=self.key_mask, extra=extra)
        h, w = self.extents_hw
        grid = (steps_x, h + ph, w + pw)
        return cuboid_merge(out, (steps_x, kh, kw), "lll", grid)[:, :, :h, :w]
