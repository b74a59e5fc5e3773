"""CF-clean outputs and file modes (issue 14 item 5; docs/outputs.md).

Two prediction files are checked: the quickstart's (a tiny fit + predict through the CLI:
dimensionless model time on a unit-square grid) and a dated lat-lon one (the ERA5-like sample's
windows through ``prediction_dataset`` and ``write_netcdf``, as the writer calls them). The CF
checker (``cfchecks``, which needs the udunits2 C library) runs where it imports, with a standard
name table of the names these files use (their canonical units as the CF table gives them: no
network in tests); cf-xarray checks run where it is installed; the layout checks always run.
Before this, the quickstart file had 3 cfchecks errors (time standard names on units ``1``), the
lat-lon grid was written as ``y``/``x`` without CF attributes, levels as ``z500`` variables, the
ensemble mean and spread had no ``cell_methods``, and every NetCDF file was 0600 whatever the
umask (``tempfile.mkstemp``), the cache folders 0700.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import xarray as xr

from beamvq.callbacks.prediction_file import prediction_dataset
from beamvq.checkpoint_io import AtomicCheckpointIO
from beamvq.cli import main
from beamvq.datamodules.cache import ensure_cache
from beamvq.datamodules.config import SelectionConfig, SplitConfig, WindowConfig
from beamvq.datamodules.era5 import ERA5LikeGenerator
from beamvq.datamodules.io import current_umask, write_netcdf
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.pool import AugmentedPool
from beamvq.datamodules.synthetic import NavierStokesGenerator
from beamvq.protocols import AxisInfo, ChannelInfo, DataInfo, WindowInfo

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.init_args.generator.init_args.n_trajectories", "6",
    "--data.init_args.generator.init_args.resolution", "16",
    "--data.init_args.generator.init_args.n_frames", "12",
    "--data.init_args.loader.batch_size", "4",
    "--model.bottleneck.init_args.codebook_size", "32",
    "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
FIT += ["--trainer.limit_val_batches", "1"]
# the standard names the checked files use, with their canonical units in the CF standard name
# table (cfchecks reads the table from cfconventions.org by default)
STANDARD_NAMES = {
    "time": "s",
    "forecast_period": "s",
    "forecast_reference_time": "s",
    "realization": "1",
    "latitude": "degree_north",
    "longitude": "degree_east",
    "air_pressure": "Pa",
    "geopotential": "m2 s-2",
    "air_temperature": "K",
    "atmosphere_relative_vorticity": "s-1",
}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Quickstart(NamedTuple):
    data: Path
    ckpt: Path
    predictions: Path


@pytest.fixture(scope="module")
def quickstart(
    tmp_path_factory: pytest.TempPathFactory, figures_not_rendered_within: Any
) -> Quickstart:
    """A tiny quickstart fit and predict, run under umask 0o022."""
    folder = tmp_path_factory.mktemp("cf_quickstart")
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(folder / "run"))
    text = text.replace("data/navier_stokes_64.nc", str(folder / "ns.nc"))
    config = folder / "quickstart.yaml"
    config.write_text(text)
    ckpt = folder / "run" / "checkpoints" / "last.ckpt"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.chdir(folder)
    try:
        with figures_not_rendered_within(), umask(0o022):
            main(["fit", "--config", str(config), *TINY, *FIT])
            main(["predict", "--config", str(config), *TINY, "--ckpt_path", str(ckpt)])
    finally:
        mp.undo()
    return Quickstart(folder / "ns.nc", ckpt, folder / "run" / "predictions.nc")


def era5_module(path: Path) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=str(path),
        variables=["z", "t", "t2m"],
        windows=WindowConfig(in_steps=4, out_steps=4),
        selection=SelectionConfig(levels=[500, 850], time_step="6h"),
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-03"),
            val_period=("2000-01-04", "2000-01-05"),
            test_period=("2000-01-06", "2000-01-07"),
        ),
        generator=ERA5LikeGenerator(n_times=28, resolution_deg=22.5),
    )


class LatLon(NamedTuple):
    path: Path
    forecast: np.ndarray
    members: np.ndarray


@pytest.fixture(scope="module")
def latlon(tmp_path_factory: pytest.TempPathFactory) -> LatLon:
    """A dated lat-lon prediction file: the ERA5-like sample's training futures as forecasts,
    members around them, through ``prediction_dataset`` and ``write_netcdf``."""
    folder = tmp_path_factory.mktemp("cf_latlon")
    dm = era5_module(folder / "era5.nc")
    dm.prepare_data()
    dm.setup()
    index = torch.arange(3)
    forecast = dm.training_targets(index).numpy()  # (3, 4, 5, 8, 16): z500 z850 t500 t850 t2m
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 2, *forecast.shape[1:])).astype(np.float32)
    members = forecast[:, None] * (1 + 0.01 * noise)
    ds = prediction_dataset(
        dm.info(), dm.window_info("train", index.numpy()), forecast, members=members, ckpt="x.ckpt"
    )
    return LatLon(write_netcdf(ds, folder / "predictions.nc"), forecast, members)


# -- the CF checker --------------------------------------------------------------------------------
def _tables(folder: Path) -> dict[str, str]:
    """Local standard-name (``STANDARD_NAMES``), area-type and region tables for cfchecks."""
    entries = "".join(
        f'<entry id="{n}"><canonical_units>{u}</canonical_units></entry>'
        for n, u in STANDARD_NAMES.items()
    )
    files = {
        "cfStandardNamesXML": "<standard_name_table><version_number>84</version_number>"
        f"<last_modified>2024-01-19</last_modified>{entries}</standard_name_table>",
        "cfAreaTypesXML": "<area_type_table><version_number>10</version_number>"
        '<date>2021-01-01</date><entry id="land"/></area_type_table>',
        "cfRegionNamesXML": "<standardized_region_list><version_number>4</version_number>"
        '<date>2021-01-01</date><entry id="global"/></standardized_region_list>',
    }
    out = {}
    for key, text in files.items():
        (folder / f"{key}.xml").write_text(f'<?xml version="1.0"?>\n{text}\n')
        out[key] = str(folder / f"{key}.xml")
    return out


def cf_errors(path: Path, folder: Path) -> list[str]:
    """cfchecks' FATAL and ERROR messages on ``path``, each with where it was found."""
    try:
        from cfchecker.cfchecks import CFChecker, CFVersion
    except Exception as err:  # not installed, or no udunits2 library: cfunits fails to load
        pytest.skip(f"cfchecks cannot run here ({type(err).__name__}: {err})")
    checker = CFChecker(silent=True, version=CFVersion(), **_tables(folder))  # auto
    results = checker.checker(str(path))
    found = [(name, r) for name, r in results["variables"].items()]
    found.append(("global", results["global"]))
    return [f"{where}: {m}" for where, r in found for c in ("FATAL", "ERROR") for m in r[c]]


def test_the_quickstart_prediction_passes_cfchecks(quickstart: Quickstart, tmp_path: Path) -> None:
    assert cf_errors(quickstart.predictions, tmp_path) == []


def test_the_dated_latlon_prediction_passes_cfchecks(latlon: LatLon, tmp_path: Path) -> None:
    assert cf_errors(latlon.path, tmp_path) == []


# -- cf-xarray ------------------------------------------------------------------------------------
def test_cf_xarray_finds_the_axes_and_the_forecast(quickstart: Quickstart, latlon: LatLon) -> None:
    pytest.importorskip("cf_xarray")
    with xr.open_dataset(latlon.path) as ds:
        assert ds.cf["latitude"].name == "latitude" and ds.cf["longitude"].name == "longitude"
        assert ds.cf["time"].name == "valid_time" and ds.cf["Z"].name == "level"
        assert ds.cf["realization"].name == "member"
        assert ds.cf["forecast_reference_time"].name == "init_time"
        names = ds.cf.standard_names
        assert sorted(names["geopotential"]) == ["z", "z_ens_mean", "z_ens_spread", "z_members"]
        # the forecast: the variable of the standard name without members or cell_methods
        plain = [v for v in names["air_temperature"] if "cell_methods" not in ds[v].attrs]
        assert [v for v in plain if "member" not in ds[v].dims] == ["t"]
    with xr.open_dataset(quickstart.predictions) as ds:
        assert ds.cf["time"].name == "valid_time"
        assert ds.cf["X"].name == "x" and ds.cf["Y"].name == "y"
        methods = {v: ds[v].attrs.get("cell_methods") for v in ds.data_vars}
        assert methods == {
            "vorticity": None,
            "vorticity_members": None,
            "vorticity_ens_mean": "realization: mean",
            "vorticity_ens_spread": "realization: standard_deviation",
        }


# -- the layout, checked directly -----------------------------------------------------------------
def test_the_latlon_file_has_lat_lon_and_level_coordinates(latlon: LatLon) -> None:
    with xr.open_dataset(latlon.path) as ds:
        z, t2m = ds["z"], ds["t2m"]
        assert z.dims == ("sample", "lead_time", "level", "latitude", "longitude")
        assert t2m.dims == ("sample", "lead_time", "latitude", "longitude")
        assert ds["t_members"].dims == (
            "sample",
            "member",
            "lead_time",
            "level",
            "latitude",
            "longitude",
        )
        assert ds["level"].values.tolist() == [500.0, 850.0]
        assert {k: ds["level"].attrs[k] for k in ("standard_name", "units", "positive", "axis")} == {
            "standard_name": "air_pressure", "units": "hPa", "positive": "down", "axis": "Z"
        }  # fmt: skip
        lat, lon = ds["latitude"].attrs, ds["longitude"].attrs
        assert (lat["standard_name"], lat["units"], lat["axis"]) == (
            "latitude",
            "degrees_north",
            "Y",
        )
        assert (lon["standard_name"], lon["units"], lon["axis"]) == (
            "longitude",
            "degrees_east",
            "X",
        )
        assert ds["latitude"].values[0] > ds["latitude"].values[-1]  # ERA5's order, as read
        # channels z500 z850 t500 t850 t2m land in their variable and level
        np.testing.assert_allclose(z.values, latlon.forecast[:, :, [0, 1]], rtol=1e-6)
        np.testing.assert_allclose(ds["t"].sel(level=850).values, latlon.forecast[:, :, 3])
        np.testing.assert_allclose(t2m.values, latlon.forecast[:, :, 4], rtol=1e-6)
        np.testing.assert_allclose(
            ds["z_ens_spread"].values, latlon.members[:, :, :, :2].std(1), rtol=1e-5
        )
        assert z.attrs["units"] == "m**2 s**-2" and z.attrs["standard_name"] == "geopotential"
        assert "level" not in z.attrs and "z500" not in ds
        assert ds["valid_time"].values[0, 0] == np.datetime64("2000-01-02T00:00")
        assert ds["lead_time"].values[0] == np.timedelta64(6, "h")


def test_time_standard_names_come_only_with_units_of_time(quickstart: Quickstart) -> None:
    with xr.open_dataset(quickstart.predictions, decode_times=False) as ds:
        for name in ("init_time", "lead_time", "valid_time"):
            assert ds[name].attrs["units"] == "1" and "standard_name" not in ds[name].attrs
        assert ds["valid_time"].attrs["axis"] == "T"
        np.testing.assert_array_equal(ds["lead_time"].values, [1.0, 2.0, 3.0, 4.0, 5.0])
        np.testing.assert_array_equal(
            ds["valid_time"].values, ds["init_time"].values[:, None] + np.arange(1, 6)
        )


# -- file modes follow the umask --------------------------------------------------------------------
def test_outputs_of_a_fit_and_predict_follow_umask_022(quickstart: Quickstart) -> None:
    for path in (quickstart.data, quickstart.ckpt, quickstart.predictions):
        assert oct(mode(path)) == oct(0o644), path


def _cache(root: Path) -> Path:
    class Stats(NamedTuple):
        mean: np.ndarray

    def reader(out: np.ndarray) -> Stats:
        out[:] = 1.0
        return Stats(np.ones(2))

    return ensure_cache(root, "entry-0123456789abcdef", (1, 2, 1, 2, 2), reader).data_file.parent


@pytest.mark.parametrize(
    ("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_every_writer_gives_the_mode_of_the_umask(
    tmp_path: Path, mask: int, file_mode: int, folder_mode: int
) -> None:
    ds = xr.Dataset({"a": ("x", np.arange(3.0))})
    with umask(mask):
        assert current_umask() == mask
        written = [
            write_netcdf(ds, tmp_path / "plain.nc"),
            NavierStokesGenerator(n_trajectories=1, resolution=8, n_frames=2).write(
                tmp_path / "ns.nc"
            ),
        ]
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "ckpts" / "last.ckpt")
        written.append(tmp_path / "ckpts" / "last.ckpt")
        entry = _cache(tmp_path / "cache")
    for path in written:
        assert oct(mode(path)) == oct(file_mode), path
    assert oct(mode(entry)) == oct(folder_mode)
    assert {oct(mode(f)) for f in entry.iterdir()} == {oct(file_mode)}


# -- the rules on hand-made labels -------------------------------------------------------------------
def _info(time_attrs: dict, channels: tuple[ChannelInfo, ...], lat: bool = False) -> DataInfo:
    grid = {"units": "degrees_north"} if lat else {"units": "m"}
    return DataInfo(
        path="in.nc",
        channels=channels,
        time=AxisInfo("time", np.arange(4.0), time_attrs),
        time_step=1.0,
        y=AxisInfo("lat" if lat else "south_north", np.array([10.0, 20.0]), grid),
        x=AxisInfo("lon" if lat else "west_east", np.array([0.0, 5.0, 10.0]), {}),
        latitude=np.array([10.0, 20.0]) if lat else None,
        in_steps=2,
        target_steps=2,
    )


W = WindowInfo(np.array([0, 1]), np.array([1.0, 2.0]))
ONE = (ChannelInfo("w", "w", None, {"units": "K"}),)


@pytest.mark.parametrize(
    ("time_attrs", "units", "lead_name", "time_name"),
    [
        ({"units": "hours"}, "hours", "forecast_period", None),
        ({}, "1", None, None),
        ({"units": "1"}, "1", None, None),
        ({"units": "days since 2000-01-01"}, "days", "forecast_period", "time"),
    ],
)
def test_time_standard_names_follow_the_time_units(
    time_attrs: dict, units: str, lead_name: str | None, time_name: str | None
) -> None:
    ds = prediction_dataset(_info(time_attrs, ONE), W, np.zeros((2, 3, 1, 2, 3)))
    assert ds["lead_time"].attrs["units"] == units
    assert ds["lead_time"].attrs.get("standard_name") == lead_name
    assert ds["valid_time"].attrs.get("standard_name") == time_name
    assert ds["valid_time"].attrs["axis"] == "T"
    np.testing.assert_array_equal(ds["valid_time"].values, [[2.0, 3.0, 4.0], [3.0, 4.0, 5.0]])


def test_levels_grids_and_the_pool_file_share_the_layout() -> None:
    attrs = {"units": "K", "long_name": "temperature"}
    channels = (
        ChannelInfo("t850", "t", 850.0, attrs),
        ChannelInfo("t500", "t", 500.0, attrs),
        ChannelInfo("q700", "q", 700.0, {}),
        ChannelInfo("sst", "sst", None, attrs),
    )
    forecast = np.arange(2 * 3 * 4 * 2 * 3, dtype=np.float32).reshape(2, 3, 4, 2, 3)
    ds = prediction_dataset(_info({}, channels), W, forecast)
    # a non-geographic grid: y/x with the input's attributes, axis and long_name added
    assert ds["t"].dims == ("sample", "lead_time", "level", "y", "x")
    assert ds["y"].attrs == {"units": "m", "axis": "Y", "long_name": "south_north coordinate"}
    assert ds["level"].values.tolist() == [500.0, 850.0]  # ascending, whatever the channel order
    np.testing.assert_array_equal(ds["t"].sel(level=850).values, forecast[:, :, 0])
    assert ds["q"].dims == ("sample", "lead_time", "level_q", "y", "x")
    assert ds["level_q"].values.tolist() == [700.0] and ds["level_q"].attrs["axis"] == "Z"
    assert ds["sst"].dims == ("sample", "lead_time", "y", "x")
    # lat-lon by units alone: the input's names kept, CF attributes added
    ds = prediction_dataset(_info({}, ONE, lat=True), W, np.zeros((2, 3, 1, 2, 3)))
    assert ds["w"].dims == ("sample", "lead_time", "lat", "lon")
    assert ds["lon"].attrs["standard_name"] == "longitude" and ds["lat"].attrs["axis"] == "Y"
    # the pool file names the grid the same way
    pool = AugmentedPool(capacity=2, policy="worst")
    zeros, one = torch.zeros(1, 2, 1, 2, 3), torch.ones(1, dtype=torch.long)
    pool.add(zeros, zeros, torch.ones(1), one * 0, one)
    out = pool.to_dataset(_info({}, ONE, lat=True))
    assert out["w_input"].dims == ("pool", "input_time", "lat", "lon")
    assert out["lat"].attrs["units"] == "degrees_north" and out["lead_time"].attrs["units"] == "1"
