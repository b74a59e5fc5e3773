"""The CF dataset of ``beamvq predict`` forecasts (written by ``NetCDFPredictionWriter``).

Layout (CF-1.8; docs/outputs.md):

* one variable per input variable with dims ``(sample, lead_time, [level,] <y>, <x>)``;
  ``sample`` indexes forecast windows, with coordinates ``trajectory`` (the input's sample
  label) and ``init_time`` (time label of the last input frame, ``forecast_reference_time``);
  ``lead_time`` counts forecast steps from 1 in units of the input's time step
  (``forecast_period``); ``valid_time (sample, lead_time)`` is ``init_time + lead_time``
  (``standard_name: time``, ``axis: T``);
* a variable with levels (channels ``z500``, ``z850``) is one variable ``z`` over a ``level``
  coordinate (pressure in hPa: ``standard_name: air_pressure``, ``positive: down``, ``axis: Z``),
  as ERA5 and WeatherBench lay it out; variables whose levels differ get a dim each
  (``level_<variable>``); single-level variables (``t2m``) have no level dim;
* the grid: a lat-lon input keeps its dim names (``latitude``/``longitude``, ``lat``/``lon``)
  with ``standard_name``, ``units`` (``degrees_north``/``degrees_east``) and ``axis``; any other
  grid is ``y``/``x`` with the input's attributes, ``axis`` and a ``long_name``
  (``beamvq.datamodules.io.grid_axes``);
* when the module predicts an ensemble, ``<var>_members (sample, member, lead_time, ...)``,
  ``<var>_ens_mean`` (``cell_methods: realization: mean``) and ``<var>_ens_spread`` (standard
  deviation over members, ``cell_methods: realization: standard_deviation``), all with the
  variable's ``standard_name`` and units: the forecast itself is the variable of that standard
  name with neither a ``member`` dim nor ``cell_methods``. Members are code-bank ranks, or, when
  beam-searched, trajectories best first with their scores in ``member_score (sample, member)``;
* time without a date: CF's time standard names need units of time (``forecast_period``) or of
  time since a reference date (``time``, ``forecast_reference_time``). A dimensionless time axis
  (units ``1``, or none: model time, step numbers) keeps its numbers and units ``1`` without those
  standard names (``valid_time`` still carries ``axis: T``); a numeric axis in units of time
  (``hours``) gives ``lead_time`` its ``forecast_period``; dates and ``<unit> since <date>`` get
  all three;
* global ``history`` names the command (or the Python call, ``beamvq.forecast``) and the
  checkpoint.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any, NamedTuple

import numpy as np
import xarray as xr

from beamvq.datamodules.io import grid_axes
from beamvq.protocols import ChannelInfo, DataInfo, WindowInfo

# the pressure level coordinate (the reading's level dims: ERA5's level, CDS' pressure_level, ...)
LEVEL_ATTRS = {
    "long_name": "pressure level",
    "standard_name": "air_pressure",
    "units": "hPa",
    "positive": "down",
    "axis": "Z",
}
# udunits names of time units without a reference date (lead times in these are forecast_period)
TIME_UNITS = frozenset(
    "s sec secs second seconds min mins minute minutes h hr hrs hour hours d day days".split()
)


class Field(NamedTuple):
    """One output variable: its name, the channels it stacks (in level order) and its level dim
    (None for a single-level variable)."""

    name: str
    channels: list[int]
    level_dim: str | None


def _time_coords(data: DataInfo, windows: WindowInfo, n_sample: int, n_lead: int) -> dict:
    time_attrs = dict(data.time.attrs)
    # one forecast step is the spacing of a window's frames (data.time_step), not the file's
    lead = np.arange(1, n_lead + 1) * data.time_step
    lead_attrs: dict[str, Any] = {"long_name": "forecast lead time"}
    init_attrs: dict[str, Any] = {"long_name": "time of the last input frame"}
    valid_attrs: dict[str, Any] = {"long_name": "time the forecast is valid for", "axis": "T"}
    units = str(time_attrs.get("units", "")).strip()
    numeric = np.asarray(lead).dtype.kind in "iuf"  # not timedelta64 (an integer to numpy)
    if not numeric or " since " in units:
        # dates (xarray encodes them, in hours or days since a date) or numbers since a date
        if numeric:
            lead_attrs["units"] = units.split(" since ")[0]
            calendar = {k: v for k, v in time_attrs.items() if k in ("units", "calendar")}
            init_attrs |= calendar
            valid_attrs |= calendar
        lead_attrs["standard_name"] = "forecast_period"
        init_attrs["standard_name"] = "forecast_reference_time"
        valid_attrs["standard_name"] = "time"
    else:
        # numbers without a reference date: a duration unit (hours) or none (model time)
        units = units or "1"
        for attrs in (lead_attrs, init_attrs, valid_attrs):
            attrs["units"] = units
        if units in TIME_UNITS:
            lead_attrs["standard_name"] = "forecast_period"
    trajectory_attrs: dict[str, Any] = {"long_name": "sample (trajectory) of the input"}
    if np.issubdtype(np.asarray(windows.sample).dtype, np.number):
        trajectory_attrs["units"] = "1"
    return {
        "sample": ("sample", np.arange(n_sample), {"long_name": "forecast window", "units": "1"}),
        "trajectory": ("sample", windows.sample, trajectory_attrs),
        "init_time": ("sample", windows.init_time, init_attrs),
        "lead_time": ("lead_time", lead, lead_attrs),
        "valid_time": (
            ("sample", "lead_time"),
            windows.init_time[:, None] + lead[None, :],
            valid_attrs,
        ),
    }


def _grid_coords(data: DataInfo) -> tuple[tuple[str, str], dict]:
    """The grid's dim names ``(y, x)`` and coordinates (``grid_axes``), every axis with ``axis``
    and ``long_name``."""
    axes = grid_axes(data)
    coords = {}
    for role, source in (("y", data.y), ("x", data.x)):
        name, attrs = axes[role]
        attrs.setdefault("axis", role.upper())
        attrs.setdefault("long_name", f"{source.name} coordinate")
        coords[name] = (name, source.values, attrs)
    return (axes["y"][0], axes["x"][0]), coords


def fields(channels: tuple[ChannelInfo, ...]) -> tuple[list[Field], dict]:
    """The output variables of ``channels`` (those of one variable with levels stacked over a
    level dim) and the level coordinates they use."""
    grouped: dict[str, list[int]] = {}
    for c, channel in enumerate(channels):
        key = channel.name if channel.level is None else channel.variable
        grouped.setdefault(key, []).append(c)
    out, coords, dims = [], {}, {}
    for name, index in grouped.items():
        if channels[index[0]].level is None:
            out.append(Field(name, index, None))
            continue
        index = sorted(index, key=lambda c: float(channels[c].level))  # type: ignore[arg-type]
        levels = tuple(float(channels[c].level) for c in index)  # type: ignore[arg-type]
        if levels not in dims:
            dims[levels] = "level" if not dims else f"level_{name}"
            coords[dims[levels]] = (dims[levels], np.asarray(levels), dict(LEVEL_ATTRS))
        out.append(Field(name, index, dims[levels]))
    return out, coords


def _channel_attrs(channel: ChannelInfo) -> dict[str, Any]:
    """The source variable's CF attributes (units, long_name, standard_name)."""
    keep = ("units", "long_name", "standard_name")
    attrs = {k: v for k, v in channel.attrs.items() if k in keep}
    attrs.setdefault("long_name", channel.variable)
    return attrs


def _member_vars(
    name: str, attrs: dict[str, Any], dims: tuple[str, ...], m: np.ndarray, kind: str
) -> dict:
    long = attrs.get("long_name", name)
    member_dims = (dims[0], "member", *dims[1:])
    mean = dict(attrs, long_name=f"{long} ensemble mean", cell_methods="realization: mean")
    spread = dict(
        attrs,
        long_name=f"{long} ensemble spread (std over members)",
        cell_methods="realization: standard_deviation",
    )
    return {
        f"{name}_members": (member_dims, m, dict(attrs, long_name=f"{long} ensemble members ({kind})")),
        f"{name}_ens_mean": (dims, m.mean(1), mean),
        f"{name}_ens_spread": (dims, m.std(1), spread),
    }  # fmt: skip


def prediction_dataset(
    data: DataInfo,
    windows: WindowInfo,
    forecast: np.ndarray,
    members: np.ndarray | None = None,
    member_scores: np.ndarray | None = None,
    ckpt: str | None = None,
    command: str | None = None,
) -> xr.Dataset:
    """The CF dataset for ``forecast (S, T, C, H, W)`` of windows labelled ``windows``;
    ``members (S, M, T, C, H, W)`` and their beam-search ``member_scores (S, M)`` optional;
    ``command`` is what ``history`` records (default: the command line)."""
    searched = member_scores is not None
    kind = "beam-searched trajectories, best first" if searched else "code-bank candidates"
    coords = _time_coords(data, windows, forecast.shape[0], forecast.shape[1])
    (y, x), grid = _grid_coords(data)
    out_fields, levels = fields(data.channels)
    coords |= levels | grid
    data_vars: dict[str, Any] = {}
    for field in out_fields:
        attrs = _channel_attrs(data.channels[field.channels[0]])
        level = () if field.level_dim is None else (field.level_dim,)
        dims = ("sample", "lead_time", *level, y, x)
        # channels (S, T, L, H, W), or (S, T, H, W) without levels
        values = forecast[:, :, field.channels] if level else forecast[:, :, field.channels[0]]
        data_vars[field.name] = (dims, values, attrs)
        if members is not None:
            m = members[:, :, :, field.channels] if level else members[:, :, :, field.channels[0]]
            data_vars |= _member_vars(field.name, attrs, dims, m, kind)
    if members is not None:
        what = "beam-search rank" if searched else "code-bank rank"
        coords["member"] = (
            "member",
            np.arange(members.shape[1]),
            {
                "long_name": f"ensemble member ({what})",
                "standard_name": "realization",
                "units": "1",
            },
        )
    if searched:
        data_vars["member_score"] = (
            ("sample", "member"),
            member_scores,
            {"long_name": "beam-search score of the member (higher is better)", "units": "1"},
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs = {
        "title": "beamvq forecasts",
        "Conventions": "CF-1.8",
        "source": f"beamvq forecasts of {data.path}",
        "history": f"{stamp}: {command or ' '.join(sys.argv)} (checkpoint: {ckpt})",
        "references": "BeamVQ: arXiv 2405.17051, 2502.18925",
    }
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    for name in ds.coords:
        # CF: coordinate variables hold no missing values, so they get no _FillValue
        ds[name].encoding["_FillValue"] = None
    return ds
