"""Write ``beamvq predict`` forecasts to one CF-style NetCDF file, whatever the number of ranks.

The layout is ``beamvq.callbacks.prediction_file``; the file is written under a temporary name
and renamed (``beamvq.datamodules.io.write_netcdf``), so a reader never sees half a file. It is
``<trainer.default_root_dir>/predictions.nc`` unless ``output`` names another (docs/configs.md).

Under DDP each rank forecasts its share of the samples (Lightning's predict sampler gives every
sample to exactly one rank, unevenly). Each rank saves its raw arrays (forecast, members, their
scores and the samples' positions) as ``.<file>.part<r>-of-<W>.npz`` beside the output; after a
barrier rank 0 concatenates them, orders the samples by position and writes the one file, which
equals the single-process file; the parts are then removed. Parts left by a killed predict are
removed when the next predict starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from beamvq.callbacks.checks import require
from beamvq.callbacks.prediction_file import prediction_dataset
from beamvq.datamodules.io import remove_stale_temporaries, write_netcdf
from beamvq.protocols import ForecastData

log = logging.getLogger(__name__)

FIELDS = ("forecast", "members", "member_scores")
# the file in the run directory (trainer.default_root_dir) when ``output`` is not given
DEFAULT_NAME = "predictions.nc"


def _cat(parts: list[torch.Tensor | None]) -> Any:
    """One field of every batch's ``Prediction`` concatenated, as float NumPy (``None`` when the
    module did not predict it)."""
    if not parts or parts[0] is None:
        return None
    return torch.cat(parts).float().cpu().numpy()


def part_path(output: Path, rank: int, world_size: int) -> Path:
    """Where ``rank`` of ``world_size`` saves its share of ``output``'s forecasts."""
    return output.with_name(f".{output.name}.part{rank}-of-{world_size}.npz")


def stale_parts(output: Path) -> list[Path]:
    """Parts of ``output`` that a predict left behind (``part_path`` names, any world size)."""
    return sorted(output.parent.glob(f".{output.name}.part*-of-*.npz"))


def save_part(path: Path, arrays: dict[str, np.ndarray | None]) -> None:
    """This rank's arrays (``None`` fields left out) as one ``.npz``, under a temporary name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k: v for k, v in arrays.items() if v is not None})
    tmp.replace(path)


def merge_parts(paths: list[Path]) -> dict[str, np.ndarray | None]:
    """The ranks' arrays concatenated and ordered by sample position (``index``), each
    position once (Lightning's predict sampler repeats none; a sampler that pads would)."""
    loaded = []
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            loaded.append({k: npz[k] for k in npz.files})
    index = np.concatenate([p["index"] for p in loaded])
    _, order = np.unique(index, return_index=True)  # sorted positions, first copy of each
    merged: dict[str, np.ndarray | None] = {"index": index[order]}
    for field in FIELDS:
        have = [p[field] for p in loaded if field in p]
        merged[field] = np.concatenate(have)[order] if have else None
    return merged


class NetCDFPredictionWriter(BasePredictionWriter):
    """Collect predictions of an epoch and write them as one NetCDF file.

    Args:
        output: the NetCDF path (one file also under DDP: the ranks' shares are merged in
            sample order by rank 0). ``None``: ``<trainer.default_root_dir>/predictions.nc``;
            a bare file name goes into ``default_root_dir`` too; a path with a folder is used
            as given (relative to the working directory).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def output_path(self, trainer: pl.Trainer | None = None) -> Path:
        """The file ``predict`` writes (the same on every rank; see ``output``)."""
        root = Path(trainer.default_root_dir) if trainer is not None else Path.cwd()
        if self.output is None:
            return root / DEFAULT_NAME
        bare = not os.path.dirname(self.output) and "://" not in self.output
        return root / self.output if bare else Path(self.output)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            remove_stale_temporaries(self.output_path(trainer))
            for old in stale_parts(self.output_path(trainer)):
                old.unlink(missing_ok=True)
                log.warning("removed %s, left by an interrupted predict", old)
        if trainer.world_size > 1:
            trainer.strategy.barrier("prediction_writer_clean")

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        arrays: dict[str, np.ndarray | None] = {
            field: _cat([getattr(p, field) for p in preds]) for field in FIELDS
        }
        arrays["index"] = (
            torch.cat([p.index for p in preds]).cpu().numpy() if preds else np.zeros(0, np.int64)
        )
        output = self.output_path(trainer)
        if trainer.world_size > 1:
            world = trainer.world_size
            save_part(part_path(output, trainer.global_rank, world), arrays)
            trainer.strategy.barrier("prediction_writer_parts")
            if not trainer.is_global_zero:
                return
            parts = [part_path(output, r, world) for r in range(world)]
            arrays = merge_parts(parts)
            for part in parts:
                part.unlink(missing_ok=True)
        forecast = arrays["forecast"]
        if forecast is None or forecast.shape[0] == 0:
            log.warning("predict produced no forecasts; nothing written")
            return
        dm = require(trainer.datamodule, ForecastData, "NetCDFPredictionWriter", "datamodule")
        ds = prediction_dataset(
            dm.info(),
            dm.window_info(dm.predict_split, arrays["index"]),
            forecast,
            members=arrays["members"],
            member_scores=arrays["member_scores"],
            ckpt=trainer.ckpt_path,
        )
        path = write_netcdf(ds, output)
        log.info("wrote %d forecasts to %s", forecast.shape[0], path)
