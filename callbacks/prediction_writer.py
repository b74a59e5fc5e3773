"""Write ``beamvq predict`` forecasts to one CF-style NetCDF file per rank.

The layout is ``beamvq.callbacks.prediction_file``; the file is written under a temporary name
and renamed (``beamvq.datamodules.io.write_netcdf``), so a reader never sees half a file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from beamvq.callbacks.checks import require
from beamvq.callbacks.prediction_file import prediction_dataset
from beamvq.datamodules.io import write_netcdf
from beamvq.protocols import ForecastData

log = logging.getLogger(__name__)


def _cat(parts: list[torch.Tensor | None]) -> Any:
    """One field of every batch's ``Prediction`` concatenated, as float NumPy (``None`` when the
    module did not predict it)."""
    if parts[0] is None:
        return None
    return torch.cat(parts).float().cpu().numpy()


class NetCDFPredictionWriter(BasePredictionWriter):
    """Collect predictions of an epoch and write them as one NetCDF file.

    Args:
        output: the NetCDF path; under DDP each rank writes ``<stem>.rank<r>.nc``.
    """

    def __init__(self, output: str = "runs/predictions.nc") -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def output_path(self, trainer: pl.Trainer) -> Path:
        """The file this rank writes: ``output``, or ``<stem>.rank<r>.nc`` under DDP."""
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
        dm = require(trainer.datamodule, ForecastData, "NetCDFPredictionWriter", "datamodule")
        forecast = _cat([p.forecast for p in preds])
        index = torch.cat([p.index for p in preds]).cpu().numpy()
        ds = prediction_dataset(
            dm.info(),
            dm.window_info(dm.predict_split, index),
            forecast,
            members=_cat([p.members for p in preds]),
            member_scores=_cat([p.member_scores for p in preds]),
            ckpt=trainer.ckpt_path,
        )
        path = write_netcdf(ds, self.output_path(trainer))
        log.info("wrote %d forecasts to %s", forecast.shape[0], path)
