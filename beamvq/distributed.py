"""DDP helpers: share N items over the ranks, gather the results, merge them in one global order.

BeamVQ's augmented pool must be identical on every DDP rank (DESIGN.md, the augmentation
callback): each rank searches a round-robin share of the epoch's inputs, the shares are
all-gathered, and every rank keeps the same rows in the order of the items' global positions, so
a 2-rank run adds exactly what a 1-rank run adds. Pure tensor functions; the all-gather is passed
in (a Lightning strategy's public ``all_gather``), so nothing here needs a process group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "AllGather",
    "RanksDisagree",
    "Shard",
    "check_ranks_agree",
    "checksum",
    "gather_merged",
    "gather_rows",
    "map_sharded",
    "merge_gathered",
    "shard",
]

# ``pytorch_lightning`` strategies' ``all_gather``: a tensor (n, ...) of this rank -> (world, n,
# ...) with every rank's, in rank order (with more than one process)
AllGather = Callable[[Tensor], Tensor]


class Shard(NamedTuple):
    """One rank's share of N items: ``positions`` into the N (padded to the same length on every
    rank by repeating item 0) and ``valid`` marking the real ones."""

    positions: Tensor
    valid: Tensor


def shard(n: int, rank: int, world_size: int) -> Shard:
    """Round-robin share of ``n`` items for ``rank``, padded to ``ceil(n / world_size)``: every
    rank gathers tensors of the same shape (all-gather needs it)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in a world of {world_size}")
    per_rank = math.ceil(n / world_size) if n else 0
    positions = torch.arange(per_rank, dtype=torch.long) * world_size + rank
    valid = positions < n
    return Shard(torch.where(valid, positions, torch.zeros_like(positions)), valid)


def gather_rows(all_gather: AllGather, world_size: int, *tensors: Tensor) -> list[Tensor]:
    """All-gather each tensor ``(n, ...)`` and stack the ranks' rows ``(world_size × n, ...)``,
    rank by rank; with one process the tensors come back as they are. Boolean tensors travel as
    floats (not every backend gathers bool) and come back boolean."""
    if world_size == 1:
        return list(tensors)
    out = []
    for t in tensors:
        flag = t.dtype == torch.bool
        rows = rearrange(all_gather(t.float() if flag else t), "w n ... -> (w n) ...")
        out.append(rows > 0 if flag else rows)
    return out


def merge_gathered(order_key: Tensor, keep: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Keep the rows of gathered tensors where ``keep``, sorted by ``order_key``.

    After an all-gather the rows arrive rank by rank; sorting by the items' global position makes
    the result independent of the world size, so every rank adds the same samples in the same
    order (and a 2-rank run adds what a 1-rank run would).
    """
    rows = torch.nonzero(keep, as_tuple=False).flatten()
    rows = rows[torch.argsort(order_key[rows], stable=True)]
    return [t[rows] for t in tensors]


def gather_merged(
    all_gather: AllGather, world_size: int, order_key: Tensor, keep: Tensor, *tensors: Tensor
) -> list[Tensor]:
    """``gather_rows`` then ``merge_gathered``: every rank's rows where ``keep``, in the order of
    ``order_key`` (each item's global position), identical on every rank."""
    key, kept, *rows = gather_rows(all_gather, world_size, order_key, keep, *tensors)
    return merge_gathered(key, kept, *rows)


def map_sharded(
    n: int,
    rank: int,
    world_size: int,
    all_gather: AllGather,
    fn: Callable[[Tensor], Sequence[Tensor]],
) -> list[Tensor]:
    """Share ``n`` items over the ranks, let ``fn`` compute rows for this rank's ``positions``
    (one row per position, tensors on one device), and return every rank's rows in the order of
    the items (``n`` rows per tensor), identical on every rank and for every world size."""
    mine = shard(n, rank, world_size)
    rows = fn(mine.positions)
    device = rows[0].device
    key, valid = mine.positions.to(device), mine.valid.to(device)
    return gather_merged(all_gather, world_size, key, valid, *rows)


class RanksDisagree(RuntimeError):
    """DDP ranks hold different copies of what must be identical (the pool, the code bank)."""


def checksum(*tensors: Tensor) -> Tensor:
    """One float64 fingerprint of ``tensors``: sum and position-weighted sum of every value (in
    float64, so equal copies give equal sums on every rank and a changed or moved value shows)."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        if flat.numel() == 0:
            continue
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
        total += torch.stack([flat.sum(), (flat * weights).sum()])
    return total


def check_ranks_agree(
    all_gather: AllGather, world_size: int, named: dict[str, Sequence[Tensor]]
) -> dict[str, float]:
    """Checksums of each named group of tensors on this rank, compared across the ranks; raises
    ``RanksDisagree`` naming the group and every rank's checksum when they differ. Returns
    ``{name: checksum}`` (the first component) for logging. With one process nothing is gathered."""
    sums = {name: checksum(*tensors) for name, tensors in named.items()}
    if world_size > 1 and sums:
        names = list(sums)
        mine = torch.stack([sums[n] for n in names])  # (groups, 2)
        every = all_gather(mine).reshape(world_size, len(names), 2).to(torch.float64)
        for i, name in enumerate(names):
            if not torch.equal(every[:, i], every[:1, i].expand_as(every[:, i])):
                per_rank = ", ".join(
                    f"rank {r}: {every[r, i, 0].item():.17g}" for r in range(world_size)
                )
                raise RanksDisagree(
                    f"DDP ranks disagree on the {name} after the search ({per_rank}): every rank "
                    "must hold the same copy; the run stops instead of training diverging replicas"
                )
    return {name: float(s[0]) for name, s in sums.items()}
