"""Bad NetCDF input stops in ``setup`` (before training) with one message naming file and variable."""

from __future__ import annotations

import re
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
from beamvq.datamodules.era5 import generate_era5_like, pack_encoding
from beamvq.datamodules.io import write_netcdf
from beamvq.datamodules.netcdf import NetCDFDataModule

SMALL = dict(n_times=24, resolution_deg=22.5, levels=(500.0, 850.0))
LEVELS = SelectionConfig(levels=[500, 850])
ALL_LEVELS = SelectionConfig()


def _write(ds: xr.Dataset, path: Path, packed: bool = True) -> str:
    for name in ds.data_vars:
        ds[name].encoding = pack_encoding(ds[name].values) if packed else {}
    return str(write_netcdf(ds, path))


def _era5(tmp_path: Path, name: str = "era5.nc", **kwargs: object) -> str:
    return _write(generate_era5_like(**(SMALL | kwargs)), tmp_path / name)


def _setup(path: str | list[str], **kwargs: object) -> NetCDFDataModule:
    args: dict = dict(
        variables=["z", "t", "t2m"],
        selection=LEVELS,
        windows=WindowConfig(in_steps=2, out_steps=2),
        splits=SplitConfig(fractions=(1, 0, 0)),
    )
    args.update(kwargs)
    dm = NetCDFDataModule(path=path, **args)
    dm.setup()
    return dm


def _raises(match: str, path: str | list[str], **kwargs: object) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        _setup(path, **kwargs)
    message = str(info.value)
    assert re.search(match, message), message
    return message


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    msg = _raises("NetCDF file not found", str(tmp_path / "nope.nc"))
    assert str(tmp_path / "nope.nc") in msg
    _raises(r"no file matches the pattern .*era5_\*\.nc", str(tmp_path / "era5_*.nc"))


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.nc"
    bad.write_bytes(b"this is not a NetCDF file\n" * 100)
    msg = _raises("cannot read the file as NetCDF", str(bad))
    assert str(bad) in msg


def test_truncated_file(tmp_path: Path) -> None:
    good = Path(_era5(tmp_path, n_times=200))
    cut = tmp_path / "cut.nc"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    msg = _raises("cannot read", str(cut))
    assert str(cut) in msg


def test_missing_variable(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    msg = _raises(r"variable\(s\) \['q'\] not in the file", path, variables=["z", "q"])
    assert path in msg and "'t2m'" in msg  # lists what the file has


def test_missing_level(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    msg = _raises(
        r"variable 'z' has no level 300 along 'level'",
        path,
        selection=SelectionConfig(levels=[300, 500]),
    )
    assert path in msg and "['500', '850']" in msg


def test_dims_that_cannot_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "refl": (("time", "band", "y", "x"), rng.random((6, 3, 4, 4), dtype=np.float32)),
            "flat": (("y", "x"), rng.random((4, 4), dtype=np.float32)),
        },
        coords={"time": np.arange(6.0)},
    )
    path = _write(ds, tmp_path / "bands.nc", packed=False)
    msg = _raises(
        r"variable 'refl' has dims .*dim 'band' \(size 3\) cannot map",
        path,
        variables=["refl"],
        selection=ALL_LEVELS,
    )
    assert path in msg
    msg = _raises(
        r"variable 'flat' has dims \('y', 'x'\) that cannot map to \(time, y, x\)",
        path,
        variables=["flat"],
        selection=ALL_LEVELS,
    )
    assert path in msg
    _raises(
        r"data.dims.time='when' not in dims; set data.dims.time / data.dims.y / data.dims.x",
        path,
        variables=["refl"],
        selection=ALL_LEVELS,
        dims=DimsConfig(time="when"),
    )


def test_non_monotonic_and_duplicated_time(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    swapped = ds.isel(time=[0, 1, 2, 4, 3, *range(5, 24)])
    path = _write(swapped, tmp_path / "swapped.nc")
    msg = _raises(
        r"coordinate 'time' is not monotonic: 2000-01-01T18:00 at position 4 comes "
        r"after 2000-01-02",
        path,
    )
    assert path in msg
    dup = ds.isel(time=[0, 1, 2, 2, *range(3, 24)])
    path = _write(dup, tmp_path / "dup.nc")
    msg = _raises(r"coordinate 'time' has the duplicated value 2000-01-01T12:00", path)
    assert path in msg


def test_files_overlapping_in_time(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    a = _write(ds.isel(time=slice(0, 14)), tmp_path / "a.nc")
    b = _write(ds.isel(time=slice(10, 24)), tmp_path / "b.nc")
    msg = _raises(r"b\.nc: its time axis .* overlaps that of .*a\.nc", [a, b])
    assert "the files must cover disjoint periods" in msg and "data.selection.time_range" in msg
    assert "sort" not in msg  # sorting would not help: the frames are repeated


def test_a_file_with_nothing_in_it_is_called_empty(tmp_path: Path) -> None:
    path = str(tmp_path / "empty.nc")
    xr.Dataset().to_netcdf(path)
    msg = _raises(r"empty\.nc: the file is empty: it opens but holds no dimensions", path)
    assert "not in the file" not in msg


def test_all_nan_variable(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    ds["t2m"][:] = np.nan
    path = _write(ds, tmp_path / "dead.nc")
    msg = _raises(
        r"variable 't2m' is entirely NaN/_FillValue",
        path,
        quality=QualityConfig(max_nan_fraction=1.0),
    )
    assert path in msg


def test_nan_fraction_threshold_and_the_fill_option(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    t = ds["t"].values.copy()
    t[:6, 1] = np.nan  # 6 of 24 frames of t850 missing: 25% of that channel
    ds["t"] = (ds["t"].dims, t, ds["t"].attrs)
    path = _write(ds, tmp_path / "holes.nc")
    msg = _raises(
        r"variable 't' at level 850 has 768 NaN/Inf/_FillValue values \(25% of it\), "
        r"above data.quality.max_nan_fraction=0.1",
        path,
        quality=QualityConfig(max_nan_fraction=0.1),
    )
    assert path in msg and "data.quality.nan_policy" in msg
    # the default threshold (0) stops on any NaN
    _raises("above data.quality.max_nan_fraction=0;", path)
    # raised threshold: fill or mask instead of stopping
    dm = _setup(path, quality=QualityConfig(max_nan_fraction=0.3, nan_policy="fill"))
    assert np.isfinite(dm.array).all()
    dm = _setup(path, quality=QualityConfig(max_nan_fraction=0.3, nan_policy="mask"))
    assert dm.plan.starts["train"][:, 1].min() == 6


def test_window_longer_than_a_split(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    msg = _raises(
        r"the val split has 4 time steps.*one window needs in_steps \+ out_steps x rollout_steps "
        r"= 3 \+ 3 x 1 = 6 consecutive steps: the window is longer than the split; reduce "
        r"data.windows.in_steps / data.windows.out_steps / data.windows.rollout_steps",
        path,
        windows=WindowConfig(in_steps=3, out_steps=3),
        splits=SplitConfig(fractions=(0.7, 0.15, 0.15)),
    )
    assert path in msg
    # too few steps in total
    _raises(
        "the train split has 24 time steps.*window is longer than the split",
        path,
        windows=WindowConfig(in_steps=20, out_steps=10),
    )


def test_gaps_shorten_a_split_below_one_window(tmp_path: Path) -> None:
    ds = generate_era5_like(**SMALL)
    path = _write(ds.isel(time=list(range(0, 24, 2))), tmp_path / "every12h.nc")
    # the file is 12-hourly but 6 h windows are asked for: every pair of frames is a gap
    msg = _raises(
        r"longest run without a gap in the time axis is 1 steps of 6h",
        path,
        selection=SelectionConfig(levels=[500, 850], time_step="6h"),
    )
    assert path in msg


def test_empty_split(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    msg = _raises(
        r"data.splits.val_period=\('2030-01-01', '2030-12-31'\) selects no time step of "
        r".*era5\.nc: the selected data span 2000-01-01 .. 2000-01-06T18:00; the val split "
        r"would be empty",
        path,
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-04"), val_period=("2030-01-01", "2030-12-31")
        ),
    )
    assert path in msg
    # by fractions: a split that asks for data but gets no step
    _raises(
        r"the test split is empty \(no time step\); change data.splits.fractions",
        path,
        splits=SplitConfig(fractions=(1.0, 0.0, 0.01)),
    )
    # too few trajectories for the fractions
    rng = np.random.default_rng(0)
    ns = xr.Dataset(
        {"w": (("trajectory", "time", "y", "x"), rng.random((1, 8, 4, 4), dtype=np.float32))}
    )
    one = _write(ns, tmp_path / "one.nc", packed=False)
    _setup(
        one, variables=["w"], selection=ALL_LEVELS
    )  # one trajectory: a single series, time blocks
    ns2 = xr.Dataset(
        {"w": (("trajectory", "time", "y", "x"), rng.random((2, 8, 4, 4), dtype=np.float32))}
    )
    two = _write(ns2, tmp_path / "two.nc", packed=False)
    _raises(
        r"2 samples along 'trajectory' are too few for data.splits.fractions=.*the train split "
        r"would be empty",
        two,
        variables=["w"],
        selection=ALL_LEVELS,
        splits=SplitConfig(fractions=(0.4, 0.3, 0.3)),
    )


def test_overlapping_periods(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    _raises(
        r"data.splits.train_period=.* and data.splits.val_period=.* overlap",
        path,
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-04"), val_period=("2000-01-04", "2000-01-06")
        ),
    )


def test_grids_differ_across_files(tmp_path: Path) -> None:
    a = _write(generate_era5_like(**SMALL), tmp_path / "a.nc")
    coarse = generate_era5_like(**(SMALL | dict(start="2000-01-07", resolution_deg=45.0)))
    b = _write(coarse, tmp_path / "b.nc")
    msg = _raises(
        r"b\.nc: variable 'z' is on a different grid than .*a\.nc: 'latitude' has 4 points "
        r"\[67.5 .. -67.5\] vs 8 \[78.75 .. -78.75\]",
        [a, b],
    )
    assert b in msg


def test_levels_differ_across_files(tmp_path: Path) -> None:
    a = _write(generate_era5_like(**SMALL), tmp_path / "a.nc")
    b = _write(
        generate_era5_like(**(SMALL | dict(start="2000-01-07", levels=(500.0,)))), tmp_path / "b.nc"
    )
    msg = _raises(
        r"b\.nc: variable 'z' has levels \[500.0\] but .*a\.nc has \[500.0, 850.0\] "
        r"\(levels differ across files\)",
        [a, b],
        selection=ALL_LEVELS,
    )
    assert b in msg
    # asking for a level one file lacks names that file
    _raises(
        r"b\.nc: variable 'z' has no level 850", [a, b], selection=SelectionConfig(levels=[850])
    )


def test_bad_arguments_name_the_argument(tmp_path: Path) -> None:
    path = _era5(tmp_path)
    with pytest.raises(ValueError, match="data.quality.nan_policy must be one of"):
        QualityConfig(nan_policy="zero")
    with pytest.raises(ValueError, match=r"data.quality.max_nan_fraction must be in \[0, 1\]"):
        QualityConfig(max_nan_fraction=2)
    with pytest.raises(
        ValueError, match="data.splits.val_period/test_period need data.splits.train_period"
    ):
        SplitConfig(val_period=("2000", "2001"))
    with pytest.raises(ValueError, match=r"data.splits.fractions must be three non-negative"):
        SplitConfig(fractions=(1, -1, 0))
    with pytest.raises(ValueError, match=r"data.splits.predict_split must be one of"):
        SplitConfig(predict_split="all")
    with pytest.raises(ValueError, match=r"data.selection.lat_range must be \(start, end\)"):
        SelectionConfig(lat_range=(1, 2, 3))
    for field in ("in_steps", "out_steps", "rollout_steps", "stride"):
        with pytest.raises(ValueError, match=f"data.windows.{field} must be >= 1, got 0"):
            WindowConfig(**{field: 0})
    with pytest.raises(ValueError, match="data.loader.batch_size must be >= 1, got 0"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ValueError, match="data.variables lists a variable twice"):
        NetCDFDataModule(path, ["z", "z"])
    _raises(
        r"data.selection.time_step='fortnightly' must be a duration such as '6h'",
        path,
        selection=SelectionConfig(time_step="fortnightly"),
    )
    _raises(
        r"data.selection.lat_range=\(-10.0, 10.0\) selects no point of 'latitude'",
        path,
        selection=SelectionConfig(levels=[500, 850], lat_range=(-10, 10)),
    )
    _raises(
        r"data.selection.time_range=\('2010', '2011'\) selects no time step",
        path,
        selection=SelectionConfig(levels=[500, 850], time_range=("2010", "2011")),
    )
