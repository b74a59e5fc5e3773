"""Write ``beamvq predict`` forecasts to CF-style NetCDF.

Layout (one file, written under a temporary name and renamed, see ``beamvq.datamodules.io``):

* dims ``(sample, lead_time, y, x)`` for each variable; ``sample`` indexes forecast windows, with
  coordinates ``trajectory`` (the input's sample label) and ``init_time`` (time label of the
  last input frame); ``lead_time`` counts forecast steps from 1 in units of the input's time step;
* when the module predicts an ensemble, ``<var>_members (sample, member, lead_time, y, x)``,
  ``<var>_ens_mean`` and ``<var>_ens_spread`` (standard deviation over members); members are
  code-bank ranks, or, when beam-searched, trajectories best first with their scores in
  ``member_score (sample, member)``;
* the input's ``y``/``x`` coordinates and variable attributes (units, long_name) carried over;
  global ``history`` names the command and the checkpoint.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import xarray as xr
from pytorch_lightning.callbacks import BasePredictionWriter

from beamvq.datamodules.io import write_netcdf

log = logging.getLogger(__name__)


class NetCDFPredictionWriter(BasePredictionWriter):
    """Collect predictions of an epoch and write them as one NetCDF file.

    Args:
        output: the NetCDF path; under DDP each rank writes ``<stem>.rank<r>.nc``.
    """

    def __init__(self, output: str = "runs/predictions.nc") -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def _path(self, trainer: pl.Trainer) -> Path:
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not preds:
            log.warning("predict produced no forecasts; nothing written")
            return
        dm = trainer.datamodule
        forecast = torch.cat([p.forecast for p in preds]).float().cpu().numpy()
        index = torch.cat([p.index for p in preds]).cpu().numpy()
        has_members = preds[0].members is not None
        members = (
            torch.cat([p.members for p in preds]).float().cpu().numpy() if has_members else None
        )
        has_scores = getattr(preds[0], "member_scores", None) is not None
        scores = (
            torch.cat([p.member_scores for p in preds]).float().cpu().numpy()
            if has_scores
            else None
        )
        ds = self.build_dataset(dm, forecast, index, members, trainer.ckpt_path, scores)
        path = write_netcdf(ds, self._path(trainer))
        log.info("wrote %d forecasts to %s", forecast.shape[0], path)

    @staticmethod
    def build_dataset(
        dm: Any,
        forecast: np.ndarray,
        index: np.ndarray,
        members: np.ndarray | None,
        ckpt: str | None,
        member_scores: np.ndarray | None = None,
    ) -> xr.Dataset:
        """The CF dataset for ``forecast (S, T, C, H, W)`` of windows ``index`` of the predict split;
        ``members (S, M, T, C, H, W)`` and their beam-search ``member_scores (S, M)`` optional."""
        searched = member_scores is not None
        kind = "beam-searched trajectories, best first" if searched else "code-bank candidates"
        data = dm.info()
        info = dm.window_info(dm.predict_split, index)
        n_lead = forecast.shape[1]
        time_attrs = dict(data.time.attrs)
        # one forecast step is the spacing of a window's frames (data.time_step), not the file's
        step = data.time_step
        lead = np.arange(1, n_lead + 1) * step
        lead_attrs = {"long_name": "forecast lead time", "standard_name": "forecast_period"}
        if not np.issubdtype(np.asarray(lead).dtype, np.timedelta64):
            # datetime leads are encoded by xarray ("hours"); numbers take the time's unit
            # without its reference date ("days since 2000-01-01" -> "days")
            units = str(time_attrs.get("units", "1")).split(" since ")[0]
            lead_attrs["units"] = units
        init_attrs = {k: v for k, v in time_attrs.items() if k in ("units", "calendar")} | {
            "long_name": "time of the last input frame",
            "standard_name": "forecast_reference_time",
        }
        valid = info.init_time[:, None] + lead[None, :]
        coords: dict[str, Any] = {
            "sample": ("sample", np.arange(forecast.shape[0]), {"long_name": "forecast window"}),
            "trajectory": (
                "sample",
                info.sample,
                {"long_name": "sample (trajectory) of the input"},
            ),
            "init_time": ("sample", info.init_time, init_attrs),
            "lead_time": ("lead_time", lead, lead_attrs),
            "valid_time": (
                ("sample", "lead_time"),
                valid,
                {k: v for k, v in init_attrs.items() if k in ("units", "calendar")}
                | {"long_name": "time the forecast is valid for", "standard_name": "time"},
            ),
        }
        for ax, new, axis in ((data.y, "y", "Y"), (data.x, "x", "X")):
            attrs = dict(ax.attrs)
            attrs.setdefault("axis", axis)
            attrs.setdefault("long_name", f"{ax.name} coordinate")
            coords[new] = (new, ax.values, attrs)
        data_vars: dict[str, Any] = {}
        # one variable per channel (``z500``, ``t850``, ``t2m``; the variable name when it has
        # no levels) with the attributes of its source variable
        for c, channel in enumerate(data.channels):
            name = channel.name
            attrs = {
                k: v
                for k, v in channel.attrs.items()
                if k in ("units", "long_name", "standard_name")
            }
            attrs.setdefault("long_name", channel.variable)
            if channel.level is not None:
                attrs["long_name"] = f"{attrs['long_name']} at level {channel.level:g}"
                attrs["level"] = float(channel.level)
            data_vars[name] = (("sample", "lead_time", "y", "x"), forecast[:, :, c], attrs)
            if members is not None:
                m = members[:, :, :, c]
                data_vars[f"{name}_members"] = (
                    ("sample", "member", "lead_time", "y", "x"),
                    m,
                    dict(
                        attrs, long_name=f"{attrs.get('long_name', name)} ensemble members ({kind})"
                    ),
                )
                data_vars[f"{name}_ens_mean"] = (
                    ("sample", "lead_time", "y", "x"),
                    m.mean(1),
                    dict(attrs, long_name=f"{attrs.get('long_name', name)} ensemble mean"),
                )
                data_vars[f"{name}_ens_spread"] = (
                    ("sample", "lead_time", "y", "x"),
                    m.std(1),
                    dict(
                        attrs,
                        long_name=f"{attrs.get('long_name', name)} ensemble spread (std over members)",
                    ),
                )
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
        ds = xr.Dataset(
            data_vars,
            coords=coords,
            attrs={
                "title": "beamvq forecasts",
                "Conventions": "CF-1.8",
                "source": f"beamvq forecasts of {data.path}",
                "history": f"{stamp}: {' '.join(sys.argv)} (checkpoint: {ckpt})",
                "references": "BeamVQ: arXiv 2405.17051, 2502.18925",
            },
        )
        for name in ds.coords:
            # CF: coordinate variables hold no missing values, so they get no _FillValue
            ds[name].encoding["_FillValue"] = None
        return ds
