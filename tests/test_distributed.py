"""beamvq.distributed: round-robin shards padded to one shape, gathered rows merged in the items'
global order, so any world size gives the single-rank result; checked by hand, over simulated
ranks, and across two real gloo processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beamvq.distributed import gather_merged, gather_rows, map_sharded, merge_gathered, shard


def test_shard_by_hand() -> None:
    # 5 items over 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a pad (item 0, invalid)
    a, b = shard(5, 0, 2), shard(5, 1, 2)
    assert a.positions.tolist() == [0, 2, 4] and a.valid.tolist() == [True, True, True]
    assert b.positions.tolist() == [1, 3, 0] and b.valid.tolist() == [True, True, False]
    assert shard(0, 0, 3).positions.numel() == 0
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard(5, 2, 2)


def test_merge_gathered_by_hand() -> None:
    # rows as two ranks gather them: keys 0, 2, 4 | 1, 3, 0 (pad); keep drops key 2 and the pad
    key = torch.tensor([0, 2, 4, 1, 3, 0])
    keep = torch.tensor([True, False, True, True, True, False])
    values = torch.tensor([10.0, 12.0, 14.0, 11.0, 13.0, 10.0])
    (out,) = merge_gathered(key, keep, values)
    assert out.tolist() == [10.0, 11.0, 13.0, 14.0]


def simulated_all_gather(per_rank: list[list[torch.Tensor]], slot: list[int]):  # type: ignore[no-untyped-def]
    """What ``strategy.all_gather`` returns on every rank: the ranks' tensors stacked, in rank
    order (the call number picks the tensor)."""

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        i = slot[0]
        slot[0] += 1
        assert torch.equal(per_rank[0][i].to(t.dtype), t)  # rank 0 hands its own tensor
        return torch.stack([ranks[i].to(t.dtype) for ranks in per_rank])

    return all_gather


@pytest.mark.parametrize("n", [0, 1, 7, 8])
def test_sharded_rows_merge_to_the_single_rank_result(n: int) -> None:
    values = torch.arange(n, dtype=torch.float32) * 10 + 1
    accept = (torch.arange(n) % 3) != 1
    expected = values[accept]
    for world in (1, 2, 3):
        shards = [shard(n, rank, world) for rank in range(world)]
        assert len({len(s.positions) for s in shards}) == 1  # every rank gathers one shape
        per_rank = [
            [s.positions, accept[s.positions] & s.valid, values[s.positions]] for s in shards
        ]
        gather = simulated_all_gather(per_rank, [0])
        key, keep, vals = per_rank[0]
        (out,) = gather_merged(gather, world, key, keep, vals)
        assert torch.equal(out, expected)


def test_gather_rows_keeps_bool_and_passes_one_process_through() -> None:
    flags = torch.tensor([True, False])
    same = gather_rows(lambda t: pytest.fail("no gather with one process"), 1, flags)
    assert same[0] is flags
    per_rank = [[flags], [torch.tensor([False, True])]]
    (rows,) = gather_rows(lambda t: torch.stack([r[0].float() for r in per_rank]), 2, flags)
    assert rows.dtype == torch.bool and rows.tolist() == [True, False, False, True]


# -- two real processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:

        def all_gather(t: torch.Tensor) -> torch.Tensor:
            # what pytorch_lightning's DDP strategy.all_gather returns: the ranks' tensors stacked
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.stack(parts)

        items = torch.arange(7, dtype=torch.float32)

        def rows(at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = items[at]
            return x * x, (x % 2 == 0)  # a value and a bool per item

        squares, even = map_sharded(7, rank, world, all_gather, rows)
        torch.save({"squares": squares, "even": even}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_the_single_rank_rows(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = map_sharded(7, 0, 1, lambda t: pytest.fail("no gather"), lambda at: (at.float() ** 2, at % 2 == 0))  # fmt: skip
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["squares"], single[0])
        assert got["squares"].tolist() == [0.0, 1.0, 4.0, 9.0, 16.0, 25.0, 36.0]
        assert torch.equal(got["even"], single[1]) and got["even"].dtype == torch.bool
