"""The CF-style dataset of ``beamvq predict`` forecasts (written by ``NetCDFPredictionWriter``).

Layout:

* dims ``(sample, lead_time, y, x)`` for each variable; ``sample`` indexes forecast windows, with
  coordinates ``trajectory`` (the input's sample label) and ``init_time`` (time label of the
  last input frame); ``lead_time`` counts forecast steps from 1 in units of the input's time step;
* when the module predicts an ensemble, ``<var>_members (sample, member, lead_time, y, x)``,
  ``<var>_ens_mean`` and ``<var>_ens_spread`` (standard deviation over members); members are
  code-bank ranks, or, when beam-searched, trajectories best first with their scores in
  ``member_score (sample, member)``;
* the input's ``y``/``x`` coordinates and variable attributes (units, long_name) carried over;
  global ``history`` names the command (or the Python call, ``beamvq.forecast``) and the
  checkpoint.

CF conventions 1.8 (``forecast_period``, ``forecast_reference_time``, ``realization``).
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import numpy as np
import xarray as xr

from beamvq.protocols import ChannelInfo, DataInfo, WindowInfo

DIMS = ("sample", "lead_time", "y", "x")
MEMBER_DIMS = ("sample", "member", "lead_time", "y", "x")


def _time_coords(data: DataInfo, windows: WindowInfo, n_sample: int, n_lead: int) -> dict:
    time_attrs = dict(data.time.attrs)
    # one forecast step is the spacing of a window's frames (data.time_step), not the file's
    lead = np.arange(1, n_lead + 1) * data.time_step
    lead_attrs = {"long_name": "forecast lead time", "standard_name": "forecast_period"}
    if not np.issubdtype(np.asarray(lead).dtype, np.timedelta64):
        # datetime leads are encoded by xarray ("hours"); numbers take the time's unit
        # without its reference date ("days since 2000-01-01" -> "days")
        lead_attrs["units"] = str(time_attrs.get("units", "1")).split(" since ")[0]
    calendar = {k: v for k, v in time_attrs.items() if k in ("units", "calendar")}
    init_attrs = calendar | {
        "long_name": "time of the last input frame",
        "standard_name": "forecast_reference_time",
    }
    valid_attrs = calendar | {
        "long_name": "time the forecast is valid for",
        "standard_name": "time",
    }
    return {
        "sample": ("sample", np.arange(n_sample), {"long_name": "forecast window"}),
        "trajectory": ("sample", windows.sample, {"long_name": "sample (trajectory) of the input"}),
        "init_time": ("sample", windows.init_time, init_attrs),
        "lead_time": ("lead_time", lead, lead_attrs),
        "valid_time": (
            ("sample", "lead_time"),
            windows.init_time[:, None] + lead[None, :],
            valid_attrs,
        ),
    }


def _grid_coords(data: DataInfo) -> dict:
    coords = {}
    for ax, new, axis in ((data.y, "y", "Y"), (data.x, "x", "X")):
        attrs = dict(ax.attrs)
        attrs.setdefault("axis", axis)
        attrs.setdefault("long_name", f"{ax.name} coordinate")
        coords[new] = (new, ax.values, attrs)
    return coords


def _channel_attrs(channel: ChannelInfo) -> dict[str, Any]:
    """The source variable's attributes of one channel, its level named in ``long_name``."""
    keep = ("units", "long_name", "standard_name")
    attrs = {k: v for k, v in channel.attrs.items() if k in keep}
    attrs.setdefault("long_name", channel.variable)
    if channel.level is not None:
        attrs["long_name"] = f"{attrs['long_name']} at level {channel.level:g}"
        attrs["level"] = float(channel.level)
    return attrs


def _member_vars(name: str, attrs: dict[str, Any], m: np.ndarray, kind: str) -> dict:
    long = attrs.get("long_name", name)
    return {
        f"{name}_members": (MEMBER_DIMS, m, dict(attrs, long_name=f"{long} ensemble members ({kind})")),
        f"{name}_ens_mean": (DIMS, m.mean(1), dict(attrs, long_name=f"{long} ensemble mean")),
        f"{name}_ens_spread": (
            DIMS,
            m.std(1),
            dict(attrs, long_name=f"{long} ensemble spread (std over members)"),
        ),
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
    coords = _time_coords(data, windows, forecast.shape[0], forecast.shape[1]) | _grid_coords(data)
    data_vars: dict[str, Any] = {}
    # one variable per channel (``z500``, ``t850``, ``t2m``; the variable name when it has no
    # levels) with the attributes of its source variable
    for c, channel in enumerate(data.channels):
        attrs = _channel_attrs(channel)
        data_vars[channel.name] = (DIMS, forecast[:, :, c], attrs)
        if members is not None:
            data_vars |= _member_vars(channel.name, attrs, members[:, :, :, c], kind)
    if members is not None:
        what = "beam-search rank" if searched else "code-bank rank"
        coords["member"] = (
            "member",
            np.arange(members.shape[1]),
            {"long_name": f"ensemble member ({what})", "standard_name": "realization"},
        )
    if searched:
        data_vars["member_score"] = (
            ("sample", "member"),
            member_scores,
            {"long_name": "beam-search score of the member (higher is better)"},
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
