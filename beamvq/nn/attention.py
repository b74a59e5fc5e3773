"""Attention building blocks shared by the transformer backbones.

- :func:`attention`: scaled dot-product attention over token sets with any leading batch dims,
  an additive bias (relative position bias), a boolean mask, and optional *extra keys* that
  carry their own query projection and share the softmax with the ordinary keys. The extra
  keys are the "global vectors" of Earthformer (Gao et al., NeurIPS 2022, arXiv 2207.05833)
  and the global tokens of Longformer/BigBird: each token attends jointly to its own set and to
  a few global tokens.
- :class:`MultiHeadAttention`: self- or cross-attention (Vaswani et al. 2017) built on it.
- :class:`RelativePositionBias`: a learned per-head bias indexed by the integer offset between a
  query and a key position on an n-d grid (Swin Transformer, Liu et al. 2021; Earthformer's
  cuboid attention uses the 3-d ``(t, h, w)`` form).
- :class:`AxialPositionEmbedding`: learned absolute position embedding, the sum of one table per
  axis (Earthformer's ``t+h+w`` embedding).
- :class:`Mlp`: the transformer feed-forward network with GELU.
- :class:`DropPath`: stochastic depth (Huang et al. 2016) on residual branches, re-exported from
  :mod:`beamvq.nn.conv` so transformer backbones find every block here.

Tensors are channel-last here: tokens ``(..., L, C)``, per-head tensors ``(..., heads, L, d)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from beamvq.nn.conv import DropPath


class ExtraKeys(NamedTuple):
    """Keys/values appended to every token set, with an optional separate query projection.

    Shapes ``(..., heads, G, d)`` broadcastable to the main keys' leading dims. ``q`` (same
    shape as the main query) scores the extra keys; ``None`` scores them with the main query.
    """

    k: Tensor
    v: Tensor
    q: Tensor | None = None


def _masked_scores(scores: Tensor, bias: Tensor | None, mask: Tensor | None) -> Tensor:
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    extra: ExtraKeys | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(q kᵀ / √d + bias) v`` over per-head tensors ``(..., heads, L, d)``.

    Args:
        q: queries ``(..., heads, Lq, d)``; k, v: ``(..., heads, Lk, d)`` (leading dims broadcast).
        bias: additive, broadcastable to ``(..., heads, Lq, Lk)``; applies to the main keys only.
        mask: boolean, ``True`` = may attend, broadcastable to ``(..., heads, Lq, Lk)``. Every
            query must keep at least one key (main or extra), or its row is NaN.
        extra: keys/values sharing the softmax with ``k`` (see :class:`ExtraKeys`); never masked.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
    """
    scale = q.shape[-1] ** -0.5
    if extra is None:
        attn_mask = bias
        if mask is not None:
            # One additive mask for the fused kernel: -inf where masked, the bias elsewhere.
            base = bias if bias is not None else q.new_zeros(())
            attn_mask = torch.where(mask, base, float("-inf"))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )
    # Two key groups scored by (possibly) different queries but normalized together, so the
    # explicit form is used: the fused kernel has no notion of per-group queries.
    scores = _masked_scores(torch.matmul(q, k.transpose(-2, -1)) * scale, bias, mask)
    q_extra = q if extra.q is None else extra.q
    extra_scores = torch.matmul(q_extra, extra.k.transpose(-2, -1)) * scale
    shape = torch.broadcast_shapes(scores.shape[:-1], extra_scores.shape[:-1])
    both = torch.cat(
        (
            scores.expand(*shape, scores.shape[-1]),
            extra_scores.expand(*shape, extra_scores.shape[-1]),
        ),
        dim=-1,
    )
    probs = F.dropout(torch.softmax(both, dim=-1), p=dropout_p, training=dropout_p > 0)
    n_main = scores.shape[-1]
    return torch.matmul(probs[..., :n_main], v) + torch.matmul(probs[..., n_main:], extra.v)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(..., L, heads * d)`` -> ``(..., heads, L, d)``."""
    return rearrange(x, "... l (h d) -> ... h l d", h=num_heads)


def merge_heads(x: Tensor) -> Tensor:
    """``(..., heads, L, d)`` -> ``(..., L, heads * d)``."""
    return rearrange(x, "... h l d -> ... l (h d)")


class MultiHeadAttention(nn.Module):
    """Multi-head attention over token sets ``(..., L, C)`` with any leading batch dims.

    Self-attention when ``context`` is ``None``, cross-attention otherwise. Queries come from
    ``q_proj(x)``, keys and values from ``kv_proj(context)``; the output goes through ``proj``.

    Args:
        dim: token width (divisible by ``num_heads``).
        num_heads: number of heads.
        context_dim: width of the context tokens (default ``dim``).
        qkv_bias: bias in the query/key/value projections.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: dim {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.attn_drop = float(attn_drop)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def heads(self, x: Tensor) -> Tensor:
        """Split the last dim of ``(..., L, dim)`` into this module's heads."""
        return split_heads(x, self.num_heads)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        extra: ExtraKeys | None = None,
    ) -> Tensor:
        """``x: (..., Lq, dim)``, ``context: (..., Lk, context_dim)`` -> ``(..., Lq, dim)``.

        ``bias``/``mask`` broadcast to ``(..., heads, Lq, Lk)``; ``extra`` holds per-head keys
        (e.g. global vectors) that every query also attends to (see :func:`attention`).
        """
        context = x if context is None else context
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        out = attention(
            self.heads(self.q_proj(x)),
            self.heads(k),
            self.heads(v),
            bias=bias,
            mask=mask,
            extra=extra,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(merge_heads(out)))


def grid_coords(sizes: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Integer coordinates of every point of a grid, row-major: ``(prod(sizes), len(sizes))``."""
    axes = [torch.arange(int(s), device=device) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


class RelativePositionBias(nn.Module):
    """Learned per-head bias ``B[q - k]`` for integer offsets on an n-d grid.

    The table holds every offset ``-(e-1) .. e-1`` per axis, ``prod(2 e - 1)`` rows of
    ``num_heads``, initialized ``trunc_normal(std=0.02)`` as in Swin/Earthformer.

    Args:
        extents: per axis, the largest ``|offset| + 1`` that will be looked up.
        num_heads: one bias per head.
    """

    def __init__(self, extents: Sequence[int], num_heads: int) -> None:
        super().__init__()
        self.extents = tuple(int(e) for e in extents)
        if any(e < 1 for e in self.extents):
            raise ValueError(f"RelativePositionBias: extents must be >= 1, got {self.extents}")
        rows = 1
        for e in self.extents:
            rows *= 2 * e - 1
        self.table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        # Row-major strides over the (2e-1)-sized offset axes.
        strides = [1] * len(self.extents)
        for i in range(len(self.extents) - 2, -1, -1):
            strides[i] = strides[i + 1] * (2 * self.extents[i + 1] - 1)
        self.register_buffer("strides", torch.tensor(strides), persistent=False)
        self.register_buffer("offsets", torch.tensor(self.extents) - 1, persistent=False)

    def check(self, q_coords: Tensor, k_coords: Tensor) -> None:
        """Raise if an offset between the coordinates falls outside the table's extents."""
        delta = q_coords[:, None, :] - k_coords[None, :, :] + self.offsets.to(q_coords.device)
        if bool(((delta < 0) | (delta > 2 * self.offsets.to(delta.device))).any()):
            raise ValueError(
                f"RelativePositionBias: an offset exceeds the table's extents {self.extents}"
            )

    def forward(self, q_coords: Tensor, k_coords: Tensor) -> Tensor:
        """``q_coords: (Lq, n)``, ``k_coords: (Lk, n)`` integer -> bias ``(heads, Lq, Lk)``.

        The range check runs here only on CPU: on an accelerator it would synchronize the device
        at every call. Layers whose coordinates are fixed call :meth:`check` once when built.
        """
        if q_coords.device.type == "cpu":
            self.check(q_coords, k_coords)
        delta = q_coords[:, None, :] - k_coords[None, :, :] + self.offsets
        index = (delta * self.strides).sum(-1)
        return rearrange(self.table[index], "lq lk h -> h lq lk")


class AxialPositionEmbedding(nn.Module):
    """Learned absolute position embedding: one table per axis, summed (``t+h+w``).

    Args:
        dim: embedding width (the token width).
        sizes: the grid size per axis, e.g. ``(T, H, W)``.
    """

    def __init__(self, dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.tables = nn.ModuleList(nn.Embedding(s, dim) for s in self.sizes)
        for table in self.tables:
            nn.init.trunc_normal_(table.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, *sizes, dim)`` -> ``x`` plus the embedding of every position."""
        grid = tuple(x.shape[1:-1])
        if grid != self.sizes:
            raise ValueError(f"AxialPositionEmbedding: built for grid {self.sizes}, got {grid}")
        n = len(self.sizes)
        out = x
        for axis, table in enumerate(self.tables):
            shape = [1] * n + [table.embedding_dim]
            shape[axis] = self.sizes[axis]
            out = out + table.weight.view(1, *shape)
        return out


class Mlp(nn.Module):
    """Transformer feed-forward network: ``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(
        self, dim: int, hidden_dim: int, out_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


__all__ = [
    "AxialPositionEmbedding",
    "DropPath",
    "ExtraKeys",
    "Mlp",
    "MultiHeadAttention",
    "RelativePositionBias",
    "attention",
    "grid_coords",
    "merge_heads",
    "split_heads",
]
