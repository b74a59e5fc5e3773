"""BeamVQ's augmented pool: the cap, each eviction policy, sources, checkpoints, the dataset view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beamvq.datamodules.config import PoolConfig
from beamvq.datamodules.pool import AugmentedPool
from beamvq.protocols import SOURCE_KINDS, AxisInfo, ChannelInfo, DataInfo, Pool

T_IN, T_OUT, C, H, W = 2, 3, 1, 2, 2


def _add(
    pool: AugmentedPool, scores: list[float], tag: int, kind: int = 0, first_index: int = 0
) -> int:
    """Add ``len(scores)`` samples; sample j's input is filled with ``tag + j`` (its identity),
    its pseudo-target with ``-(tag + j)``, its source index is ``first_index + j``."""
    n = len(scores)
    ident = torch.arange(tag, tag + n, dtype=torch.float32)
    x = ident[:, None, None, None, None].expand(n, T_IN, C, H, W).clone()
    y = -ident[:, None, None, None, None].expand(n, T_OUT, C, H, W).clone()
    return pool.add(
        x,
        y,
        torch.tensor(scores),
        torch.full((n,), kind, dtype=torch.long),
        torch.arange(first_index, first_index + n),
    )


def _tags(pool: AugmentedPool) -> list[int]:
    """The identity of every sample in the pool, in pool order."""
    return [int(v) for v in pool.samples().x[:, 0, 0, 0, 0]]


def test_oldest_keeps_the_newest_n() -> None:
    pool = AugmentedPool(capacity=3, policy="oldest", weight=0.5)
    assert isinstance(pool, Pool) and pool.size == 0
    assert _add(pool, [5.0, 1.0], tag=10) == 2
    assert _tags(pool) == [10, 11] and pool.samples().age.tolist() == [0, 1]
    # 5 samples for 3 places: the two oldest go, all three new ones stay
    assert _add(pool, [9.0, 9.0, 9.0], tag=20) == 3
    assert _tags(pool) == [20, 21, 22] and pool.samples().age.tolist() == [2, 3, 4]
    # one more: the oldest of the pool goes, whatever its score
    assert _add(pool, [-100.0], tag=30) == 1
    assert _tags(pool) == [21, 22, 30] and pool.samples().age.tolist() == [3, 4, 5]
    assert pool.samples().score.tolist() == [9.0, 9.0, -100.0]
    # more new samples than places: only the newest of them are kept
    assert _add(pool, [0.0] * 5, tag=40) == 3
    assert _tags(pool) == [42, 43, 44] and pool.samples().age.tolist() == [8, 9, 10]


def test_worst_keeps_the_best_scores_new_samples_included() -> None:
    pool = AugmentedPool(capacity=3, policy="worst", weight=0.5)
    assert _add(pool, [0.5, 0.9, 0.1], tag=0) == 3
    # scores 0.5 0.9 0.1 | 0.7 0.2: the best three are 0.9, 0.7, 0.5, kept in order of addition
    assert _add(pool, [0.7, 0.2], tag=10) == 1
    assert _tags(pool) == [0, 1, 10]
    assert pool.samples().score.tolist() == pytest.approx([0.5, 0.9, 0.7])
    assert pool.samples().age.tolist() == [0, 1, 3]
    # a new sample worse than all: nothing added, the pool unchanged
    assert _add(pool, [0.05], tag=20) == 0
    assert _tags(pool) == [0, 1, 10] and pool.samples().age.tolist() == [0, 1, 3]
    # two better ones push out the two worst (0.5 and 0.7)
    assert _add(pool, [2.0, 1.0], tag=30) == 2
    assert _tags(pool) == [1, 30, 31]
    assert pool.samples().score.tolist() == pytest.approx([0.9, 2.0, 1.0])


def test_worst_ties_keep_the_newer_sample() -> None:
    pool = AugmentedPool(capacity=2, policy="worst", weight=0.5)
    assert _add(pool, [1.0, 1.0], tag=0) == 2
    # three equal scores for two places: the oldest goes
    assert _add(pool, [1.0], tag=10) == 1
    assert _tags(pool) == [1, 10] and pool.samples().age.tolist() == [1, 2]
    # a better score and a tie: the better one and the newest of the tied stay
    assert _add(pool, [3.0, 1.0], tag=20) == 2
    assert _tags(pool) == [20, 21] and pool.samples().age.tolist() == [3, 4]
    # ties among the new samples only, the pool's better: the newest tied new one is kept
    pool = AugmentedPool(capacity=2, policy="worst", weight=0.5)
    _add(pool, [5.0], tag=0)
    assert _add(pool, [2.0, 2.0, 2.0], tag=10) == 1
    assert _tags(pool) == [0, 12]


def test_capacity_zero_keeps_nothing_and_empty_add() -> None:
    pool = AugmentedPool(capacity=0, policy="worst", weight=0.5)
    assert _add(pool, [1.0, 2.0], tag=0) == 0 and pool.size == 0
    pool = AugmentedPool(capacity=4)
    assert _add(pool, [], tag=0) == 0 and pool.size == 0
    # the running age counts every sample ever offered, kept or not
    zero = AugmentedPool(capacity=0)
    _add(zero, [1.0, 2.0], tag=0)
    assert zero.state_dict()["pool_counter"] == 2


def test_sources_follow_their_samples_through_eviction() -> None:
    pool = AugmentedPool(capacity=3, policy="worst", weight=0.5)
    _add(pool, [0.3, 0.8], tag=0, kind=0, first_index=100)  # two training windows 100, 101
    _add(pool, [0.9, 0.1], tag=10, kind=1, first_index=7)  # two unlabelled inputs 7, 8
    s = pool.samples()
    # 0.1 (unlabelled input 8) is dropped
    assert _tags(pool) == [0, 1, 10]
    assert s.source_kind.tolist() == [0, 0, 1]
    assert s.source_index.tolist() == [100, 101, 7]
    assert [SOURCE_KINDS[k] for k in s.source_kind.tolist()] == ["window", "window", "unlabelled"]
    # each sample still carries its own pseudo-target
    np.testing.assert_array_equal(s.y[:, 0, 0, 0, 0].numpy(), [-0.0, -1.0, -10.0])
    assert s.x.dtype == torch.float32 and s.source_index.dtype == torch.long


def test_add_checks_its_arguments() -> None:
    pool = AugmentedPool(capacity=4)
    x = torch.zeros(2, T_IN, C, H, W)
    y = torch.zeros(2, T_OUT, C, H, W)
    kind = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="score has 3 rows, x has 2"):
        pool.add(x, y, torch.zeros(3), kind, torch.arange(2))
    with pytest.raises(ValueError, match="source_index has 1 rows, x has 2"):
        pool.add(x, y, torch.zeros(2), kind, torch.arange(1))
    with pytest.raises(ValueError, match=r"source_kind must index \('window', 'unlabelled', "):
        pool.add(x, y, torch.zeros(2), torch.tensor([0, len(SOURCE_KINDS)]), torch.arange(2))
    assert pool.size == 0


def test_state_dict_round_trip_keeps_sources_and_the_counter() -> None:
    pool = AugmentedPool(capacity=3, policy="worst", weight=0.25)
    _add(pool, [0.3, 0.8, 0.5], tag=0, kind=0, first_index=40)
    _add(pool, [0.9], tag=10, kind=1, first_index=3)
    state = pool.state_dict()
    assert set(state) == {
        "pool_x", "pool_y", "pool_score", "pool_age",
        "pool_source_kind", "pool_source_index", "pool_counter",
    }  # fmt: skip
    assert state["pool_counter"] == 4
    restored = AugmentedPool(capacity=3, policy="worst", weight=0.25)
    restored.load_state_dict(state)
    for name, a, b in zip(pool.samples()._fields, pool.samples(), restored.samples()):
        assert torch.equal(a, b), name
    assert restored.samples().source_kind.tolist() == [0, 0, 1]
    assert restored.samples().source_index.tolist() == [41, 42, 3]
    # the restored pool goes on numbering where the saved one stopped
    _add(restored, [5.0], tag=20)
    assert restored.samples().age.tolist() == [1, 3, 4]  # 0.5 (age 2) made way for 5.0


def test_loading_a_state_saved_before_sources_were_recorded() -> None:
    pool = AugmentedPool(capacity=4)
    _add(pool, [0.1, 0.2], tag=0, kind=1, first_index=9)
    state = pool.state_dict()
    del state["pool_source_kind"], state["pool_source_index"]
    old = AugmentedPool(capacity=4)
    old.load_state_dict(state)
    assert old.size == 2 and _tags(old) == [0, 1]
    # unknown sources: kind "window" with index -1, which matches no window
    assert old.samples().source_kind.tolist() == [0, 0]
    assert old.samples().source_index.tolist() == [-1, -1]


def test_dataset_items_carry_the_pool_weight() -> None:
    pool = AugmentedPool(capacity=4, weight=0.25)
    _add(pool, [0.1, 0.2], tag=3)
    ds = pool.dataset()
    assert len(ds) == 2
    item = ds[1]
    assert torch.equal(item.x, torch.full((T_IN, C, H, W), 4.0))
    assert torch.equal(item.y, torch.full((T_OUT, C, H, W), -4.0))
    assert float(item.weight) == 0.25 and int(item.index) == -1


def _info() -> DataInfo:
    attrs = {"units": "s-1", "long_name": "vorticity", "history": "dropped"}
    return DataInfo(
        path="ns.nc",
        channels=(ChannelInfo("w", "w", None, attrs),),
        time=AxisInfo("time", np.arange(10.0), {}),
        time_step=1.0,
        y=AxisInfo("y", np.array([0.0, 0.5]), {"units": "m"}),
        x=AxisInfo("x", np.array([1.0, 2.0]), {"units": "m"}),
        latitude=None,
        in_steps=T_IN,
        target_steps=T_OUT,
    )


def test_to_dataset_contents() -> None:
    pool = AugmentedPool(capacity=2, policy="worst")
    with pytest.raises(ValueError, match="the augmented pool is empty"):
        pool.to_dataset(_info())
    _add(pool, [0.4, 0.1, 0.7], tag=5, kind=0, first_index=20)
    ds = pool.to_dataset(_info())
    assert ds["w_input"].dims == ("pool", "input_time", "y", "x")
    assert ds["w_pseudo_target"].dims == ("pool", "lead_time", "y", "x")
    np.testing.assert_array_equal(ds["w_input"].values[:, :, 0, 0], [[5.0, 5.0], [7.0, 7.0]])
    np.testing.assert_array_equal(ds["w_pseudo_target"].values[:, 0, 1, 1], [-5.0, -7.0])
    np.testing.assert_allclose(ds["score"].values, [0.4, 0.7])
    np.testing.assert_array_equal(ds["age"].values, [0, 2])
    np.testing.assert_array_equal(ds["source_kind"].values, [0, 0])
    np.testing.assert_array_equal(ds["source_index"].values, [20, 22])
    np.testing.assert_array_equal(ds["input_time"].values, [-1, 0])
    np.testing.assert_array_equal(ds["lead_time"].values, [1, 2, 3])
    np.testing.assert_array_equal(ds["y"].values, [0.0, 0.5])
    assert ds["x"].attrs == {"units": "m"}
    # only the CF attributes of the channel travel
    assert ds["w_input"].attrs == {"units": "s-1", "long_name": "vorticity"}
    assert "0: window; 1: unlabelled" in ds["source_kind"].attrs["long_name"]
    assert "ns.nc" in ds.attrs["source"]


def test_settings_name_their_yaml_key() -> None:
    with pytest.raises(ValueError, match="data.pool.capacity must be >= 0, got -1"):
        PoolConfig(capacity=-1)
    with pytest.raises(ValueError, match=r"data.pool.policy must be one of \('oldest', 'worst'\)"):
        AugmentedPool(capacity=4, policy="random")
    with pytest.raises(ValueError, match="data.pool.weight must be >= 0, got -0.5"):
        AugmentedPool(weight=-0.5)
    pool = AugmentedPool.from_config(PoolConfig(capacity=7, policy="oldest", weight=0.125))
    assert (pool.capacity, pool.policy, pool.weight) == (7, "oldest", 0.125)


def test_a_share_sets_the_capacity_from_the_training_windows(tmp_path) -> None:
    from beamvq.datamodules.config import LoaderConfig, WindowConfig
    from beamvq.datamodules.netcdf import NetCDFDataModule
    from beamvq.datamodules.synthetic import write_navier_stokes

    path = write_navier_stokes(tmp_path / "ns.nc", n_trajectories=6, resolution=16, n_frames=12)
    dm = NetCDFDataModule(
        str(path), ["vorticity"], windows=WindowConfig(in_steps=2, out_steps=2),
        loader=LoaderConfig(batch_size=2), pool=PoolConfig(capacity=5, share=0.3),
    )  # fmt: skip
    dm.setup("fit")
    windows = len(dm.dataset("train"))
    assert windows > 10 and dm.pool.capacity == round(0.3 * windows)
    # the capacity is applied by the pool's policy: never more than the share's count
    x = torch.zeros(windows, 2, 1, 16, 16)
    scores = torch.arange(windows, dtype=torch.float32)
    kept = dm.pool.add(x, x, scores, torch.zeros(windows, dtype=torch.long), torch.arange(windows))
    assert dm.pool.size == kept == round(0.3 * windows)
    # without a share the capacity stays the given one
    plain = AugmentedPool.from_config(PoolConfig(capacity=5))
    plain.fit_to_training(1000)
    assert plain.capacity == 5
    with pytest.raises(ValueError, match="data.pool.share"):
        PoolConfig(share=0.0)
