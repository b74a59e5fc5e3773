"""The conventions of the field's NetCDF files (and zarr stores): names, CF attributes, packing,
time axes.

What reanalysis, WeatherBench and simulation files look like (the ERA5 documentation,
https://confluence.ecmwf.int/display/CKB/ERA5; WeatherBench, Rasp et al. 2020, arXiv 2002.00469;
WeatherBench 2, Rasp et al. 2024, arXiv 2308.15560; the CF conventions 1.8,
https://cfconventions.org):

- a dim plays a role (time, level, y, x) by its conventional name (``TIME_NAMES``...), else by the
  CF ``axis`` (``T``/``Z``/``Y``/``X``), ``standard_name`` or ``units`` of its coordinate;
- a y dim is a latitude (and x a longitude) by name, ``standard_name`` or ``units``
  (``degrees_north``...): only then are latitude-weighted metrics used and a longitude box may
  wrap across 0;
- packing: int16 values with ``scale_factor``/``add_offset``/``_FillValue`` are decoded by xarray
  when a file is opened (``open_netcdf`` keeps ``mask_and_scale`` on), so fill values arrive as
  NaN and go through the NaN policy (``QualityConfig``);
- a zarr store (WeatherBench 2's ERA5 stores) is opened by ``open_netcdf`` too, lazily through
  xarray's zarr backend (``beamvq.datamodules.zarr_store``), and then read by the same rules;
- time: dates (``datetime64``, or cftime dates convertible to the standard calendar) or numbers
  (model time); a dim without a coordinate counts positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import xarray as xr

from beamvq.datamodules.zarr_store import is_zarr_store, open_zarr_store

# names that real files use for each role, in order of preference
TIME_NAMES = ("time", "valid_time", "Time", "t")
LEVEL_NAMES = ("level", "pressure_level", "plev", "isobaricInhPa", "lev")
Y_NAMES = ("latitude", "lat", "y", "rlat", "south_north")
X_NAMES = ("longitude", "lon", "x", "rlon", "west_east")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")
LAT_UNITS = ("degrees_north", "degree_north", "degree_N", "degrees_N", "degreeN", "degreesN")
LON_UNITS = ("degrees_east", "degree_east", "degree_E", "degrees_E", "degreeE", "degreesE")


class DimRule(NamedTuple):
    """How a role's dim is recognized: names, then CF ``axis``, ``standard_name`` or ``units``."""

    names: tuple[str, ...]
    axis: str
    standard_names: tuple[str, ...]
    units: tuple[str, ...] = ()


# the roles in the order they are detected (a dim taken by one role is not offered to the next)
DIM_RULES: dict[str, DimRule] = {
    "time": DimRule(TIME_NAMES, "T", ("time",)),
    "y": DimRule(Y_NAMES, "Y", ("latitude", "projection_y_coordinate", "grid_latitude"), LAT_UNITS),
    "x": DimRule(
        X_NAMES, "X", ("longitude", "projection_x_coordinate", "grid_longitude"), LON_UNITS
    ),
    "level": DimRule(LEVEL_NAMES, "Z", ("air_pressure", "model_level_number", "height")),
}
REQUIRED_ROLES = ("time", "y", "x")


def open_netcdf(path: str) -> xr.Dataset:
    """Open a NetCDF file (or a zarr store: ``zarr_store.open_zarr_store``) lazily, decoding CF
    packing; any failure becomes one message naming the file."""
    if is_zarr_store(path):
        return open_zarr_store(path)
    try:
        return xr.open_dataset(path, cache=False)
    except Exception as err:  # netCDF4/HDF5 raise several types for unreadable files
        raise ValueError(
            f"{path}: cannot read the file as NetCDF ({type(err).__name__}: {err})"
        ) from err


def coord_attr(ds: xr.Dataset, dim: str, key: str) -> str:
    """The attribute ``key`` of the coordinate of ``dim`` ("" when absent)."""
    return str(ds[dim].attrs.get(key, "")) if dim in ds.variables else ""


def coord_values(ds: xr.Dataset, dim: str) -> np.ndarray:
    """The coordinate values of ``dim`` as float64, or positions when it has no coordinate."""
    values = ds[dim].values if dim in ds.variables else np.arange(ds.sizes[dim])
    return values.astype(np.float64)


def coord_attrs(ds: xr.Dataset, dim: str) -> dict:
    return dict(ds[dim].attrs) if dim in ds.variables else {}


def find_dim(ds: xr.Dataset, dims: Sequence[str], rule: DimRule) -> str | None:
    """The dim of ``dims`` playing a role: by conventional name, then by CF attributes."""
    for name in rule.names:
        if name in dims:
            return name
    for dim in dims:
        if (
            coord_attr(ds, dim, "axis").upper() == rule.axis
            or coord_attr(ds, dim, "standard_name") in rule.standard_names
            or (rule.units and coord_attr(ds, dim, "units") in rule.units)
        ):
            return dim
    return None


def is_latitude(ds: xr.Dataset, dim: str) -> bool:
    return (
        dim in LAT_NAMES
        or coord_attr(ds, dim, "standard_name") == "latitude"
        or coord_attr(ds, dim, "units") in LAT_UNITS
    )


def is_longitude(ds: xr.Dataset, dim: str) -> bool:
    return (
        dim in LON_NAMES
        or coord_attr(ds, dim, "standard_name") == "longitude"
        or coord_attr(ds, dim, "units") in LON_UNITS
    )


# ------------------------------------------------------------------------------------------
# time axes
# ------------------------------------------------------------------------------------------
def time_values(ds: xr.Dataset, dim: str, path: str) -> np.ndarray:
    """Time labels as datetime64[ns] or float64 (positions when the dim has no coordinate)."""
    if dim not in ds.variables:
        return np.arange(ds.sizes[dim], dtype=np.float64)
    values = ds[dim].values
    if values.dtype.kind == "M":
        return values.astype("datetime64[ns]")
    if values.dtype.kind == "O":
        # cftime dates (non-standard calendars of climate models)
        try:
            return xr.CFTimeIndex(values).to_datetimeindex(time_unit="ns").values
        except Exception as err:
            raise ValueError(
                f"{path}: coordinate {dim!r} holds dates that cannot be converted to the standard "
                f"calendar ({err}); convert the time axis before training"
            ) from err
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    raise ValueError(
        f"{path}: coordinate {dim!r} has type {values.dtype}; expected dates or numbers"
    )


def fmt_time(value: object) -> str:
    """A time label as messages and the data check write it (``2000-01-01T06:00``, ``12.5``)."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="m")).replace("T00:00", "")
    return f"{float(value):g}"  # type: ignore[arg-type]


def fmt_step(step: object) -> str:
    """A time step as messages write it (``6h``, ``0.05``)."""
    if isinstance(step, np.timedelta64):
        return pd.tseries.frequencies.to_offset(pd.Timedelta(step)).freqstr
    return f"{float(step):g}"  # type: ignore[arg-type]


def check_monotonic(time: np.ndarray, dim: str, path: str) -> None:
    """Stop on a duplicated or decreasing time label, naming the file and the positions."""
    if time.size < 2:
        return
    diff = np.diff(time)
    zero = np.zeros((), dtype=diff.dtype)
    dup = np.flatnonzero(diff == zero)
    if dup.size:
        i = int(dup[0])
        raise ValueError(
            f"{path}: coordinate {dim!r} has the duplicated value {fmt_time(time[i])} "
            f"(positions {i} and {i + 1}); remove the duplicate frames"
        )
    back = np.flatnonzero(diff < zero)
    if back.size:
        i = int(back[0])
        raise ValueError(
            f"{path}: coordinate {dim!r} is not monotonic: {fmt_time(time[i + 1])} at position "
            f"{i + 1} comes after {fmt_time(time[i])}; sort the file along {dim!r}"
        )


def parse_time_step(step: str | float, time: np.ndarray) -> np.timedelta64 | float:
    """``step`` in the time axis' units: a pandas duration (``6h``) for dates, a number otherwise."""
    try:
        if time.dtype.kind == "M":
            value = pd.Timedelta(str(step)).to_timedelta64().astype("timedelta64[ns]")
            ok = value > np.timedelta64(0, "ns")
        else:
            value = float(step)
            ok = value > 0
    except (ValueError, TypeError) as err:
        kind = "a duration such as '6h'" if time.dtype.kind == "M" else "a number"
        raise ValueError(f"data.selection.time_step={step!r} must be {kind}: {err}") from err
    if not ok:
        raise ValueError(f"data.selection.time_step={step!r} must be positive")
    return value


def label_slice(time: np.ndarray, start: str, end: str, key: str) -> slice:
    """Positions of ``time`` inside ``[start, end]`` (inclusive; partial dates like ``2015``
    cover the whole year, as in pandas/xarray label selection); ``key`` is the YAML key."""
    try:
        if time.dtype.kind == "M":
            index = pd.DatetimeIndex(time)
            return index.slice_indexer(str(start), str(end))
        return pd.Index(time).slice_indexer(float(start), float(end))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"data.{key}=({start!r}, {end!r}) cannot select time labels: {err}"
        ) from err


def most_common_step(time: np.ndarray) -> np.timedelta64 | float:
    """The most common spacing of ``time`` (1 h or 1 for a single frame)."""
    if time.size < 2:
        return np.timedelta64(1, "h") if time.dtype.kind == "M" else 1.0
    values, counts = np.unique(np.diff(time), return_counts=True)
    return values[np.argmax(counts)]


def one_step_pairs(time: np.ndarray, step: np.timedelta64 | float) -> np.ndarray:
    """Which consecutive frames are exactly one ``step`` apart (a window may cross no other)."""
    diff = np.diff(time)
    if diff.dtype.kind == "m":
        return diff == step
    return np.isclose(diff, step)
