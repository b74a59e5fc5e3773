"""The NetCDF datamodule reads what the field produces (ERA5, CDS, WeatherBench, simulations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from beamvq.datamodules.config import (
    DimsConfig,
    LoaderConfig,
    QualityConfig,
    SelectionConfig,
    SplitConfig,
    WindowConfig,
)
from beamvq.datamodules.era5 import generate_era5_like, pack_encoding, write_era5_like
from beamvq.datamodules.io import write_netcdf
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import NavierStokesGenerator

# a tiny ERA5-like sample: 8 x 16 grid, 40 six-hourly steps (10 days)
SMALL = dict(n_times=40, resolution_deg=22.5, levels=(500.0, 850.0))
LEVELS = [500, 850]
ONE_SERIES = SplitConfig(fractions=(1, 0, 0))


def _dm(path: str | list[str], **kwargs: object) -> NetCDFDataModule:
    args: dict = dict(
        variables=["z", "t", "t2m"],
        selection=SelectionConfig(levels=LEVELS),
        windows=WindowConfig(in_steps=2, out_steps=2),
        loader=LoaderConfig(batch_size=4),
    )
    args.update(kwargs)
    dm = NetCDFDataModule(path=path, **args)
    dm.setup()
    return dm


def _frames(dm: NetCDFDataModule) -> np.ndarray:
    assert dm.array is not None
    return dm.array


@pytest.fixture(scope="module")
def era5_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_era5_like(tmp_path_factory.mktemp("era5") / "era5.nc", **SMALL)


def test_era5_packed_levels_and_descending_latitude(era5_file: Path) -> None:
    raw = xr.open_dataset(era5_file, mask_and_scale=False)
    assert raw["z"].dtype == np.int16 and "scale_factor" in raw["z"].attrs
    assert raw["latitude"].values[0] > raw["latitude"].values[-1]
    raw.close()
    dm = _dm(str(era5_file))
    assert dm.channel_names == ["z500", "z850", "t500", "t850", "t2m"]
    assert (dm.time_dim, dm.y_dim, dm.x_dim, dm.level_dim) == (
        "time",
        "latitude",
        "longitude",
        "level",
    )
    assert dm.num_channels == 5 and dm.grid == (8, 16)
    # the latitude is exposed in the file's (descending) order, in degrees
    np.testing.assert_allclose(dm.latitude, np.linspace(78.75, -78.75, 8))
    # int16 decoding: the floats before packing are recovered to half a quantum
    ref = generate_era5_like(**SMALL)
    data = _frames(dm)[0]
    quantum = pack_encoding(ref["z"].values)["scale_factor"]
    np.testing.assert_allclose(data[:, 1], ref["z"].sel(level=850).values, atol=quantum * 0.51)
    np.testing.assert_allclose(data[:, 4], ref["t2m"].values, atol=0.01)
    assert data.dtype == np.float32
    assert dm.var_attrs["z500"]["units"] == "m**2 s**-2" and dm.var_attrs["z500"]["level"] == 500
    assert dm.time_step == np.timedelta64(6, "h")


@pytest.mark.parametrize("convention", ["cds", "weatherbench"])
def test_other_naming_conventions(tmp_path: Path, era5_file: Path, convention: str) -> None:
    path = write_era5_like(tmp_path / f"{convention}.nc", convention=convention, **SMALL)
    dm = _dm(str(path))
    ref = _dm(str(era5_file))
    if convention == "cds":
        assert (dm.time_dim, dm.level_dim) == ("valid_time", "pressure_level")
        np.testing.assert_array_equal(_frames(dm), _frames(ref))
    else:
        assert (dm.y_dim, dm.x_dim) == ("lat", "lon")
        assert dm.latitude[0] < dm.latitude[-1]
        # same field, latitude flipped
        np.testing.assert_allclose(_frames(dm), _frames(ref)[..., ::-1, :], atol=0.2)


def test_explicit_dims_cf_axis_and_size_one_dims(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1, 12, 6, 5)).astype(np.float32)
    ds = xr.Dataset(
        {"rain": (("number", "step", "row", "col"), values)},
        coords={
            "step": np.arange(12.0),
            "row": ("row", np.arange(6.0), {"axis": "Y"}),
            "col": ("col", np.arange(5.0), {"axis": "X"}),
        },
    )
    path = write_netcdf(ds, tmp_path / "odd.nc")
    # time by explicit name, y/x by the CF axis attribute, the size-1 ``number`` dropped
    dm = NetCDFDataModule(
        str(path),
        ["rain"],
        windows=WindowConfig(in_steps=2, out_steps=1),
        dims=DimsConfig(time="step"),
        splits=ONE_SERIES,
    )
    dm.setup()
    assert (dm.time_dim, dm.y_dim, dm.x_dim) == ("step", "row", "col")
    np.testing.assert_array_equal(_frames(dm)[0, :, 0], values[0])
    assert dm.latitude is None


def test_many_files_glob_list_and_any_order(tmp_path: Path, era5_file: Path) -> None:
    ds = xr.open_dataset(era5_file)
    parts = [ds.isel(time=slice(a, a + 10)) for a in (0, 10, 20, 30)]
    names = []
    for i, part in enumerate(parts):
        for name in ("z", "t", "t2m"):
            part[name].encoding = pack_encoding(ds[name].values)
        names.append(str(write_netcdf(part, tmp_path / f"part_{i}.nc")))
    ds.close()
    single = _frames(_dm(str(era5_file)))
    # a glob, and a list given out of time order: files are sorted by their first time
    np.testing.assert_array_equal(_frames(_dm(str(tmp_path / "part_*.nc"))), single)
    shuffled = _dm([names[2], names[0], names[3], names[1]])
    np.testing.assert_array_equal(_frames(shuffled), single)
    assert [Path(f.path).name for f in shuffled.layout().files] == [
        f"part_{i}.nc" for i in range(4)
    ]


def test_lat_lon_box_and_wrapping_longitudes(era5_file: Path) -> None:
    full = _dm(str(era5_file))
    box = _dm(
        str(era5_file),
        selection=SelectionConfig(levels=LEVELS, lat_range=(0, 60), lon_range=(90, 180)),
    )
    lat = full.latitude
    lon = full.coords["longitude"].values
    rows = np.flatnonzero((lat >= 0) & (lat <= 60))
    cols = np.flatnonzero((lon >= 90) & (lon <= 180))
    np.testing.assert_array_equal(box.latitude, lat[rows])
    assert box.latitude[0] > box.latitude[-1]  # order kept
    np.testing.assert_array_equal(_frames(box), _frames(full)[..., rows[:, None], cols])
    # a box across the 0 meridian: 315 .. 45 runs west to east through 0
    wrap = _dm(str(era5_file), selection=SelectionConfig(levels=LEVELS, lon_range=(315, 45)))
    np.testing.assert_array_equal(wrap.coords["longitude"].values, [315.0, 337.5, 0.0, 22.5, 45.0])
    np.testing.assert_array_equal(_frames(wrap), _frames(full)[..., [14, 15, 0, 1, 2]])


def test_time_range_and_time_step_subsampling(era5_file: Path) -> None:
    full = _dm(str(era5_file))
    part = _dm(
        str(era5_file),
        selection=SelectionConfig(
            levels=LEVELS, time_range=("2000-01-03", "2000-01-06"), time_step="12h"
        ),
        splits=ONE_SERIES,
    )
    t = part.coords["time"].values
    assert t[0] == np.datetime64("2000-01-03T00") and t[-1] == np.datetime64("2000-01-06T12")
    assert np.all(np.diff(t) == np.timedelta64(12, "h"))
    first = int(np.flatnonzero(full.coords["time"].values == t[0])[0])
    np.testing.assert_array_equal(
        _frames(part)[0], _frames(full)[0, first : first + 2 * t.size : 2]
    )


def test_windows_never_bridge_a_gap(tmp_path: Path, era5_file: Path) -> None:
    ds = xr.open_dataset(era5_file)
    # drop one 6-hour step, then five in a row: two gaps
    keep = np.setdiff1d(np.arange(40), [7, 18, 19, 20, 21, 22])
    gappy = ds.isel(time=keep)
    for name in ("z", "t", "t2m"):
        gappy[name].encoding = pack_encoding(ds[name].values)
    path = write_netcdf(gappy, tmp_path / "gappy.nc")
    ds.close()
    dm = _dm(str(path), splits=ONE_SERIES)
    time = dm.coords["time"].values
    starts = dm.plan.starts["train"][:, 1]
    assert len(starts) > 0
    for t0 in starts:
        assert np.all(np.diff(time[t0 : t0 + dm.window]) == np.timedelta64(6, "h"))
    # every gap-free start is used: a window of 4 fits 7 - 3 = 4 times in the first run of 7
    assert list(starts[starts < 7]) == [0, 1, 2, 3]
    assert "2 gap(s)" in dm.check()


def test_date_splits_statistics_and_climatology(era5_file: Path) -> None:
    dm = _dm(
        str(era5_file),
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-05"),
            val_period=("2000-01-06T00", "2000-01-07T18"),
            test_period=("2000-01-08", "2000-01-10"),
        ),
    )
    time = dm.coords["time"].values
    spans = {}
    for split in ("train", "val", "test"):
        t0 = dm.plan.starts[split][:, 1]
        spans[split] = (time[t0.min()], time[t0.max() + dm.window - 1])
    assert spans["train"][0] >= np.datetime64("2000-01-01") and spans["train"][1] <= np.datetime64(
        "2000-01-05T18"
    )
    assert spans["val"][0] >= np.datetime64("2000-01-06") and spans["val"][1] <= np.datetime64(
        "2000-01-07T18"
    )
    assert spans["test"][0] >= np.datetime64("2000-01-08")
    # 20 training frames (Jan 1-5): 20 - 4 + 1 windows
    assert len(dm.plan.starts["train"]) == 17
    train = _frames(dm)[0, :20].astype(np.float64)
    np.testing.assert_allclose(dm.normalization.mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(dm.normalization.std, train.std(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(dm.climatology, train.mean(axis=0), rtol=1e-6)
    assert dm.climatology.shape == (5, 8, 16)
    info = dm.window_info("val", np.array([0]))
    assert info.init_time[0] == np.datetime64("2000-01-06T06")


def test_nan_fill_and_mask_policies(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    z = ds["z"].values.copy()
    z[5, 0, :2, :3] = np.nan  # a few missing pixels in frame 5, stored as _FillValue
    ds["z"] = (ds["z"].dims, z, ds["z"].attrs)
    ds["z"].encoding = pack_encoding(z)
    path = write_netcdf(ds, tmp_path / "holes.nc")
    raw = xr.open_dataset(path, mask_and_scale=False)
    assert int((raw["z"].values == -32767).sum()) == 6
    raw.close()
    fill = _dm(str(path), quality=QualityConfig(max_nan_fraction=0.01), splits=ONE_SERIES)
    assert np.isfinite(_frames(fill)).all()
    np.testing.assert_allclose(_frames(fill)[0, 5, 0, :2, :3], fill.normalization.mean[0])
    mask = _dm(
        str(path),
        quality=QualityConfig(max_nan_fraction=0.01, nan_policy="mask"),
        splits=ONE_SERIES,
    )
    starts = mask.plan.starts["train"][:, 1]
    # no window touches frame 5
    assert not np.any((starts <= 5) & (starts + mask.window > 5))
    assert len(starts) == 40 - 4 + 1 - 4


def test_trajectory_files_split_by_sample(tmp_path: Path) -> None:
    dm = NetCDFDataModule(
        path=str(tmp_path / "ns.nc"),
        variables=["vorticity"],
        windows=WindowConfig(in_steps=2, out_steps=2),
        generator=NavierStokesGenerator(n_trajectories=6, resolution=16, n_frames=6),
    )
    dm.prepare_data()
    dm.setup()
    assert (dm.time_dim, dm.y_dim, dm.x_dim, dm.sample_dim) == ("time", "y", "x", "trajectory")
    assert dm.latitude is None and dm.num_channels == 1 and dm.grid == (16, 16)
    samples = [set(dm.plan.samples[s].tolist()) for s in ("train", "val", "test")]
    assert samples[0].isdisjoint(samples[1]) and samples[0].isdisjoint(samples[2])
    assert sum(map(len, samples)) == 6
    sample = dm.dataset("train")[0]
    assert sample.x.shape == (2, 1, 16, 16) and sample.y.shape == (2, 1, 16, 16)
    info = dm.window_info("test", np.arange(len(dm.plan.starts["test"])))
    assert set(info.sample.tolist()) == samples[2]


def test_check_summary(era5_file: Path) -> None:
    dm = NetCDFDataModule(
        str(era5_file),
        ["z", "t", "t2m"],
        selection=SelectionConfig(levels=LEVELS),
        windows=WindowConfig(in_steps=2, out_steps=2),
        splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
        check_only=True,
    )
    text = dm.check()
    assert dm.check_only
    assert str(era5_file) in text
    for name in ("z500", "z850", "t500", "t850", "t2m"):
        assert f"\n  {name} " in text
    assert "latitude 78.75 .. -78.75 (descending)" in text
    assert "latitude weighting: yes" in text
    assert "(1, 40, 5, 8, 16) float32" in text and "in memory" in text
    assert "step 6h, 0 gap(s)" in text
    # 20 / 10 / 10 frames -> 17 / 7 / 7 windows of 4
    assert "train       17 windows" in text and "val          7 windows" in text
    assert "test         7 windows" in text
    t2m = next(line for line in text.splitlines() if line.startswith("  t2m "))
    assert f"{dm.normalization.mean[4]:.5g}" in t2m
