"""Zarr stores as ``data.path`` (issue 14 item 7; docs/data.md "Zarr stores").

The tests write small stores in the WeatherBench 2 ERA5 layout (Rasp et al. 2024, arXiv
2308.15560): dims ``time, level, longitude, latitude`` (WB2's equiangular stores keep longitude
before latitude), ``geopotential``/``temperature`` on pressure levels in hPa plus
``2m_temperature``, latitude ascending at cell centres, 6-hourly ``datetime64`` times, zarr v2
with consolidated metadata (as WB2 publishes) or v3. The same data written as NetCDF and read by
the same datamodule must give identical arrays, statistics and batches; reading must go block by
block through xarray's lazy backend arrays. Before this change a store folder was refused with
"NetCDF file not found".
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from beamvq.cli import main
from beamvq.datamodules import reading
from beamvq.datamodules.config import (
    CacheConfig,
    DimsConfig,
    SelectionConfig,
    SplitConfig,
    WindowConfig,
)
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.scan import scan_layout

zarr = pytest.importorskip("zarr")

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ["geopotential", "temperature", "2m_temperature"]
CHANNELS = ["geopotential500", "geopotential850", "temperature500", "temperature850"]
N_TIMES, N_LAT, N_LON = 40, 16, 32
SPLITS = SplitConfig(
    train_period=("2000-01-01", "2000-01-06"),  # 24 frames
    val_period=("2000-01-07", "2000-01-08"),  # 8 frames
    test_period=("2000-01-09", "2000-01-10"),  # 8 frames
)


def wb2_dataset(seed: int = 0) -> xr.Dataset:
    """A 10-day, 11.25-degree ERA5 sample in WeatherBench 2's layout (smooth waves + noise)."""
    rng = np.random.default_rng(seed)
    res = 180.0 / N_LAT
    lat = -90.0 + res * (np.arange(N_LAT) + 0.5)  # ascending, as in WB2's equiangular stores
    lon = res * np.arange(N_LON)
    time = pd.date_range("2000-01-01", periods=N_TIMES, freq="6h")
    level = np.array([500, 850], dtype=np.int64)
    hours = np.arange(N_TIMES, dtype=np.float64)[:, None, None] * 6.0
    phase = np.deg2rad(lon)[None, :, None] * 3 - 2 * np.pi * hours / 120.0
    wave = np.cos(phase) * np.cos(np.deg2rad(lat))[None, None, :]  # (time, lon, lat)

    def field(base: np.ndarray, amplitude: float, noise: float, n_levels: int) -> np.ndarray:
        shape = (N_TIMES, n_levels, N_LON, N_LAT) if n_levels else (N_TIMES, N_LON, N_LAT)
        levels = base.reshape((1, -1, 1, 1) if n_levels else ())
        waves = wave[:, None] if n_levels else wave
        return (levels + amplitude * waves + noise * rng.standard_normal(shape)).astype("f4")

    dims4 = ("time", "level", "longitude", "latitude")
    data = {
        "geopotential": (dims4, field(np.array([5.55e4, 1.45e4]), 800.0, 30.0, 2)),
        "temperature": (dims4, field(np.array([252.0, 278.0]), 6.0, 0.5, 2)),
        "2m_temperature": (dims4[::2] + ("latitude",), field(np.array(288.0), 8.0, 0.5, 0)),
    }
    ds = xr.Dataset(
        {name: xr.Variable(dims, values) for name, (dims, values) in data.items()},
        coords={"time": time, "level": level, "latitude": lat, "longitude": lon},
    )
    ds["geopotential"].attrs = {"units": "m**2 s**-2", "long_name": "Geopotential"}
    ds["level"].attrs = {"units": "millibar", "long_name": "pressure_level"}
    ds["latitude"].attrs = {"units": "degrees_north"}
    ds["longitude"].attrs = {"units": "degrees_east"}
    return ds


def write_store(
    ds: xr.Dataset, path: Path, zarr_format: int = 2, consolidated: bool | None = None
) -> Path:
    """WB2 publishes zarr v2 with consolidated metadata (the default here); time chunks of 4."""
    encoding = {name: {"chunks": (4, *ds[name].shape[1:])} for name in ds.data_vars}
    consolidated = zarr_format == 2 if consolidated is None else consolidated
    with warnings.catch_warnings():  # zarr: consolidated v3 metadata are not in the v3 spec yet
        warnings.simplefilter("ignore", UserWarning)
        ds.to_zarr(
            path, zarr_format=zarr_format, consolidated=consolidated, encoding=encoding, mode="w"
        )
    return path


def datamodule(path: str | list[str], **kwargs: object) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=path,
        variables=VARIABLES,
        windows=WindowConfig(in_steps=4, out_steps=4),
        selection=SelectionConfig(levels=[500, 850], time_step="6h"),
        splits=SPLITS,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same data as NetCDF, as zarr stores v2 (consolidated), v3 and v3 consolidated, and as
    two v2 stores split in time."""
    folder = tmp_path_factory.mktemp("zarr_input")
    ds = wb2_dataset()
    ds.to_netcdf(folder / "era5.nc")
    return {
        "nc": folder / "era5.nc",
        "v2": write_store(ds, folder / "era5_wb2.zarr", 2),
        "v3": write_store(ds, folder / "era5_v3.zarr", 3),
        "v3_consolidated": write_store(ds, folder / "era5_v3c.zarr", 3, consolidated=True),
        "part0": write_store(ds.isel(time=slice(0, 20)), folder / "parts" / "era5_a.zarr"),
        "part1": write_store(ds.isel(time=slice(20, None)), folder / "parts" / "era5_b.zarr"),
    }


def batches(dm: NetCDFDataModule) -> list:
    return [next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))]


def assert_same_data(zarr_dm: NetCDFDataModule, nc_dm: NetCDFDataModule) -> None:
    """Identical arrays, labels, statistics, splits and batches."""
    assert zarr_dm.channel_names == nc_dm.channel_names == [*CHANNELS, "2m_temperature"]
    assert zarr_dm.grid == nc_dm.grid == (N_LAT, N_LON)
    np.testing.assert_array_equal(zarr_dm.latitude, nc_dm.latitude)
    for name in ("time", "latitude", "longitude"):
        np.testing.assert_array_equal(zarr_dm.coords[name].values, nc_dm.coords[name].values)
    assert zarr_dm.time_step == nc_dm.time_step == np.timedelta64(6, "h")
    np.testing.assert_array_equal(zarr_dm.normalization.mean, nc_dm.normalization.mean)
    np.testing.assert_array_equal(zarr_dm.normalization.std, nc_dm.normalization.std)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(zarr_dm.plan.starts[split], nc_dm.plan.starts[split])
    for got, want in zip(batches(zarr_dm), batches(nc_dm)):
        assert got.x.shape == (1, 4, 5, N_LAT, N_LON) and got.y.shape == (1, 4, 5, N_LAT, N_LON)
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)


@pytest.mark.parametrize("store", ["v2", "v3", "v3_consolidated"])
def test_a_store_reads_as_the_same_data_written_as_netcdf(
    sources: dict[str, Path], store: str
) -> None:
    zarr_dm, nc_dm = datamodule(str(sources[store])), datamodule(str(sources["nc"]))
    zarr_dm.setup("fit")
    nc_dm.setup("fit")
    assert zarr_dm.cache_file is None and zarr_dm.array.shape == (1, N_TIMES, 5, N_LAT, N_LON)
    np.testing.assert_array_equal(zarr_dm.array, nc_dm.array)
    # and the values are the store's, (longitude, latitude) turned to (y, x) = (lat, lon)
    src = wb2_dataset()
    want = src["temperature"].sel(level=850).isel(time=13).transpose("latitude", "longitude")
    np.testing.assert_array_equal(zarr_dm.array[0, 13, 3], want.values)
    assert zarr_dm.latitude[0] == pytest.approx(-84.375) and zarr_dm.latitude[-1] > 0
    assert zarr_dm.var_attrs["geopotential500"]["units"] == "m**2 s**-2"
    assert_same_data(zarr_dm, nc_dm)


def test_a_glob_of_stores_joins_along_time_into_the_cache(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    pattern = str(sources["part0"].parent / "era5_*.zarr")
    # the stores listed in reverse order with a trailing slash: sorted by time, one store each
    listed = [f"{sources['part1']}/", str(sources["part0"])]
    nc_dm = datamodule(str(sources["nc"]))
    nc_dm.setup("fit")
    for path in (pattern, listed):
        dm = datamodule(path, cache=CacheConfig(above_mb=0, dir=str(tmp_path / "cache")))
        dm.prepare_data()
        dm.setup("fit")
        assert [Path(f.path).name for f in dm.layout().files] == ["era5_a.zarr", "era5_b.zarr"]
        assert dm.array is None and dm.cache_file is not None
        np.testing.assert_array_equal(np.load(dm.cache_file, mmap_mode="r"), nc_dm.array)
        assert_same_data(dm, nc_dm)


class ReadSpy:
    """Records (variable, read method, shape) of every data-variable read from a zarr array,
    whichever public read method xarray calls (``a[key]``, ``a.oindex[key]``...; the outermost
    call counts once)."""

    METHODS = (
        "__getitem__",
        "get_basic_selection",
        "get_orthogonal_selection",
        "get_coordinate_selection",
        "get_mask_selection",
        "get_block_selection",
    )

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, str, tuple[int, ...]]] = []
        self.depth = 0
        for method in self.METHODS:
            if hasattr(zarr.Array, method):
                wrapped = self._wrap(method, getattr(zarr.Array, method))
                monkeypatch.setattr(zarr.Array, method, wrapped)

    def _wrap(self, method: str, original: object) -> object:
        def read(array: object, *args: object, **kwargs: object) -> object:
            self.depth += 1
            try:
                out = original(array, *args, **kwargs)  # type: ignore[operator]
            finally:
                self.depth -= 1
            name = str(array.name).strip("/")  # type: ignore[attr-defined]
            if self.depth == 0 and name in VARIABLES:
                self.reads.append((name, method, np.shape(out)))
            return out

        return read


def test_opening_reads_no_data_and_reading_goes_block_by_block(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ReadSpy(monkeypatch)
    lay = scan_layout(
        str(sources["v2"]), VARIABLES, SelectionConfig(levels=[500, 850]), DimsConfig(), "test"
    )
    assert lay.shape == (1, N_TIMES, 5, N_LAT, N_LON)
    assert spy.reads == []  # the metadata scan touched no data variable
    # blocks of 8 frames: each channel is read in 5 slice reads of (8, lon, lat), never whole,
    # and never as a point-by-point (vectorized) selection
    monkeypatch.setattr(reading, "READ_BLOCK_BYTES", 8 * 4 * N_LAT * N_LON)
    out = np.empty(lay.shape, np.float32)
    reading.read_into(lay, out)
    assert len(spy.reads) == 5 * 5
    assert {shape for _, _, shape in spy.reads} == {(8, N_LON, N_LAT)}
    assert {method for _, method, _ in spy.reads} <= {"__getitem__", "get_basic_selection"}
    names = [name for name, _, _ in spy.reads[::5]]
    assert names == ["geopotential"] * 2 + ["temperature"] * 2 + ["2m_temperature"]
    want = wb2_dataset()["2m_temperature"].transpose("time", "latitude", "longitude")
    np.testing.assert_array_equal(out[0, :, 4], want.values)


def test_a_store_without_zarr_installed_names_the_extra(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` now raises ImportError
    dm = datamodule(str(sources["v2"]))
    message = rf"data.path {sources['v2']} is a zarr store; install the zarr extra: pip install 'beamvq\[zarr\]'"
    with pytest.raises(ImportError, match=message):
        dm.setup("fit")


def test_bad_stores_are_refused_naming_them(tmp_path: Path, sources: dict[str, Path]) -> None:
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / ".zgroup").write_text("not json")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    folder = tmp_path / "plain"
    folder.mkdir()
    cases = [
        (broken, ValueError, rf"{broken}: cannot read the folder as a zarr store"),
        (empty, ValueError, rf"{empty}: cannot read the folder as a zarr store"),
        (folder, ValueError, rf"data.path: {folder} is a folder but not a zarr store"),
        (tmp_path / "none.zarr", FileNotFoundError, "data.path: zarr store not found: .*none.zarr"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            datamodule(str(path)).setup("fit")
    # a variable the store lacks: the store and what it has are named
    dm = NetCDFDataModule(path=str(sources["v2"]), variables=["z"])
    with pytest.raises(ValueError, match=rf"{sources['v2']}: variable\(s\) \['z'\] not in"):
        dm.setup("fit")


def test_fit_and_predict_on_a_store_from_the_cli(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--config", str(ROOT / "configs" / "data" / "era5_like.yaml"),
            "--data.init_args.path", str(sources["v2"]),
            "--data.init_args.generator", "null",
            "--data.init_args.variables", f"[{', '.join(VARIABLES)}]",
            "--data.init_args.splits.train_period", "[2000-01-01, 2000-01-06]",
            "--data.init_args.splits.val_period", "[2000-01-07, 2000-01-08]",
            "--data.init_args.splits.test_period", "[2000-01-09, 2000-01-10]",
            "--data.init_args.loader.batch_size", "4",
            "--model.backbone.init_args.hid_s", "8",
            "--model.backbone.init_args.hid_t", "16",
            "--model.bottleneck.init_args.codebook_size", "16",
            "--trainer.fast_dev_run", "true",
            "--trainer.logger", "false",
            "--trainer.callbacks", "null",
        ]
    )  # fmt: skip
    dm = cli.datamodule
    assert dm.channel_names == [*CHANNELS, "2m_temperature"] and dm.latitude[0] < 0
    metrics = cli.trainer.callback_metrics
    assert "val/loss" in metrics and np.isfinite(float(metrics["val/loss"]))
    np.testing.assert_allclose(cli.model.normalizer.mean.numpy(), dm.normalization.mean)
    np.testing.assert_allclose(cli.model.lat_deg.numpy(), dm.latitude)
    # predict: the test split's one window, forecast in physical units (geopotential ~ 1e4)
    (pred,) = cli.trainer.predict(cli.model, datamodule=dm)
    assert pred.forecast.shape == (1, 4, 5, N_LAT, N_LON) and torch.isfinite(pred.forecast).all()
    assert pred.members is not None and pred.members.shape == (1, 4, 4, 5, N_LAT, N_LON)
    assert float(pred.forecast[:, :, 0].mean()) > 1e3


def test_rewriting_a_store_in_place_changes_its_cache_key(tmp_path: Path) -> None:
    from beamvq.datamodules.cache import cache_key

    store = tmp_path / "s.zarr"
    xr.Dataset({"v": (("time", "x"), np.zeros((4, 3)))}).to_zarr(store, mode="w")
    times = np.arange(4)
    before = cache_key([(str(store), times)], {})
    assert cache_key([(str(store), times)], {}) == before
    # a region write: the same chunk files rewritten inside the store
    new = xr.Dataset({"v": (("time", "x"), np.ones((4, 3)))})
    import time

    time.sleep(0.01)
    new.to_zarr(store, mode="r+", region={"time": slice(0, 4), "x": slice(0, 3)})
    assert cache_key([(str(store), times)], {}) != before
