"""The memory-mapped cache for archives larger than RAM gives exactly the in-memory windows."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DataLoader

import beamvq.datamodules.reading as reading
from beamvq.datamodules.config import (
    CacheConfig,
    LoaderConfig,
    QualityConfig,
    SelectionConfig,
    SplitConfig,
    WindowConfig,
)
from beamvq.datamodules.era5 import generate_era5_like, pack_encoding, write_era5_like
from beamvq.datamodules.io import write_netcdf
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.windows import (
    MemmapWindowDataset,
    WindowBatch,
    WindowDataset,
    collate_windows,
)

SMALL = dict(n_times=32, resolution_deg=22.5, levels=(500.0, 850.0))


def _dm(path: str, **kwargs: object) -> NetCDFDataModule:
    args: dict = dict(
        variables=["z", "t", "t2m"],
        selection=SelectionConfig(levels=[500, 850]),
        windows=WindowConfig(in_steps=2, out_steps=2),
        loader=LoaderConfig(batch_size=4),
        splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
    )
    args.update(kwargs)
    return NetCDFDataModule(path=path, **args)


@pytest.fixture(scope="module")
def era5_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_era5_like(tmp_path_factory.mktemp("era5") / "era5.nc", **SMALL))


def _all_items(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(ds[i].x, ds[i].y) for i in range(len(ds))])
    return torch.stack(xs), torch.stack(ys)


def test_cache_matches_memory(tmp_path: Path, era5_file: str) -> None:
    mem = _dm(era5_file)
    mem.setup()
    cached = _dm(era5_file, cache=CacheConfig(above_mb=0, dir=str(tmp_path / "cache")))
    cached.prepare_data()
    cached.setup()
    assert cached.array is None and cached.cache_file is not None
    assert cached.cache_file.parent.parent == tmp_path / "cache"
    for split in ("train", "val", "test"):
        a, b = mem.dataset(split), cached.dataset(split)
        assert isinstance(a, WindowDataset) and isinstance(b, MemmapWindowDataset)
        xa, ya = _all_items(a)
        xb, yb = _all_items(b)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    np.testing.assert_array_equal(mem.normalization.mean, cached.normalization.mean)
    np.testing.assert_array_equal(mem.normalization.std, cached.normalization.std)
    np.testing.assert_allclose(mem.climatology, cached.climatology, rtol=1e-6)
    assert "memory-mapped cache" in cached.check()
    # the .npy is the (sample, time, channel, y, x) array itself
    arr = np.load(cached.cache_file, mmap_mode="r")
    assert arr.shape == (1, 32, 5, 8, 16) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, mem.array)


def test_conversion_runs_once_and_follows_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(write_era5_like(tmp_path / "e.nc", **SMALL))
    calls = []
    original = NetCDFDataModule.read_into

    def counting(self: NetCDFDataModule, out: np.ndarray) -> reading.FrameStats:
        calls.append(out.shape)
        return original(self, out)

    monkeypatch.setattr(NetCDFDataModule, "read_into", counting)
    cache = CacheConfig(above_mb=0, dir=str(tmp_path / "cache"))
    for _ in range(2):
        dm = _dm(path, cache=cache)
        dm.prepare_data()
        dm.setup()
    assert len(calls) == 1
    first = dm.cache_file
    # a different selection is a different entry
    dm = _dm(path, cache=cache, selection=SelectionConfig(levels=[500, 850], lat_range=(0, 90)))
    dm.setup()
    assert len(calls) == 2 and dm.cache_file != first
    # a rewritten file (new size/mtime) is converted again, never read stale
    write_era5_like(path, **(SMALL | dict(seed=1)))
    dm = _dm(path, cache=cache)
    dm.setup()
    assert len(calls) == 3 and dm.cache_file != first
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary folder left


def test_streaming_in_small_blocks(
    tmp_path: Path, era5_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _dm(era5_file)
    ref.setup()
    # three frames per read: many blocks per file and variable
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", 3 * 8 * 16 * 4)
    small = _dm(era5_file, cache=CacheConfig(above_mb=0, dir=str(tmp_path)))
    small.setup()
    np.testing.assert_array_equal(np.load(small.cache_file), ref.array)
    np.testing.assert_allclose(small.normalization.std, ref.normalization.std, rtol=1e-6)


def test_workers_open_the_map_lazily(tmp_path: Path, era5_file: str) -> None:
    dm = _dm(
        era5_file,
        cache=CacheConfig(above_mb=0, dir=str(tmp_path)),
        loader=LoaderConfig(batch_size=4, num_workers=2),
    )
    dm.setup()
    ds = dm.dataset("train")
    assert ds._array is None  # nothing mapped until an item is read
    first = ds[0]
    assert ds._array is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._array is None  # what a worker receives holds no open map
    torch.testing.assert_close(clone[0].x, first.x)
    serial = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_windows))
    parallel = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_windows))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a.x, b.x)
        torch.testing.assert_close(a.index, b.index)


def test_fill_policy_on_the_cache(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    t2m = ds["t2m"].values.copy()
    t2m[3, 0, :4] = np.nan
    ds["t2m"] = (ds["t2m"].dims, t2m, ds["t2m"].attrs)
    for name in ds.data_vars:
        ds[name].encoding = pack_encoding(ds[name].values)
    path = str(write_netcdf(ds, tmp_path / "holes.nc"))
    dm = _dm(
        path,
        cache=CacheConfig(above_mb=0, dir=str(tmp_path / "c")),
        quality=QualityConfig(max_nan_fraction=0.01),
        splits=SplitConfig(fractions=(1, 0, 0)),
    )
    dm.setup()
    assert np.isnan(np.load(dm.cache_file)).sum() == 4  # the cache keeps the file's values
    item = dm.dataset("train")[2]  # window of frames 2..5 holds frame 3 at input position 1
    assert torch.isfinite(item.x).all() and torch.isfinite(item.y).all()
    torch.testing.assert_close(
        item.x[1, 4, 0, :4], torch.full((4,), float(dm.normalization.mean[4]))
    )


def test_multi_node_settings_and_bad_cache_dir(tmp_path: Path, era5_file: str) -> None:
    assert _dm(era5_file).prepare_data_per_node is False  # shared cache: global rank 0 converts
    assert _dm(era5_file, cache=CacheConfig(per_node=True)).prepare_data_per_node is True
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dm = _dm(era5_file, cache=CacheConfig(above_mb=0, dir=str(blocker)))
    with pytest.raises(OSError, match=r"data.cache.dir: cannot create the cache folder .*a_file"):
        dm.setup()


def test_cache_threshold_decides(era5_file: str, tmp_path: Path) -> None:
    # the sample is 32 * 5 * 8 * 16 * 4 bytes = 80 KiB
    below = _dm(era5_file, cache=CacheConfig(above_mb=0.1, dir=str(tmp_path)))
    below.setup()
    above = _dm(era5_file, cache=CacheConfig(above_mb=0.05, dir=str(tmp_path)))
    above.setup()
    assert below.array is not None and above.array is None
    with xr.open_dataset(era5_file) as ds:
        assert ds.sizes["time"] == 32


def test_batched_gather_matches_items(tmp_path: Path, era5_file: str) -> None:
    for kwargs in ({}, {"cache": CacheConfig(above_mb=0, dir=str(tmp_path))}):
        dm = _dm(era5_file, **kwargs)
        dm.setup()
        ds = dm.dataset("train")
        picked = [5, 0, 3]
        gathered = ds.__getitems__(picked)
        assert isinstance(gathered, WindowBatch) and len(gathered) == 3
        batch = collate_windows(gathered)
        for j, i in enumerate(picked):
            item = ds[i]
            torch.testing.assert_close(batch.x[j], item.x, rtol=0, atol=0)
            torch.testing.assert_close(batch.y[j], item.y, rtol=0, atol=0)
        assert batch.index.tolist() == picked and batch.weight.tolist() == [1.0, 1.0, 1.0]
        assert batch.x.is_contiguous() and batch.y.is_contiguous()
        # a DataLoader built elsewhere, with PyTorch's default collate, gets the same batch
        plain = next(iter(DataLoader(ds, batch_size=4)))
        ours = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_windows)))
        for a, b in zip(plain, ours):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # the datamodule's loaders use the pass-through collate; the pool falls back to per item
        assert dm.train_dataloader().collate_fn is collate_windows
        dm.pool.add(
            batch.x[:2],
            batch.y[:2],
            torch.tensor([1.0, 2.0]),
            torch.zeros(2, dtype=torch.long),
            batch.index[:2],
        )
        mixed = list(dm.train_dataloader())
        assert sum(int((b.index == -1).sum()) for b in mixed) == 2
