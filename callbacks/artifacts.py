"""Checkpoints and prediction files as W&B artifacts, only when the run uploads.

At the end of ``fit`` the best and last checkpoints of every ``ModelCheckpoint`` (its public
``best_model_path``, ``last_model_path``, ``best_model_score``, ``monitor``) and the
``last.ckpt`` of a ``LastCheckpoint`` become one artifact
of type ``model``; at the end of ``predict`` the files of every ``NetCDFPredictionWriter`` (its
public ``output_path``) one of type ``predictions``. An offline run cannot upload them: it is
skipped with a log line and the files stay where the checkpoint callback and the writer put them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks import wandb_media
from beamvq.callbacks.last_checkpoint import LastCheckpoint
from beamvq.callbacks.prediction_writer import NetCDFPredictionWriter


def checkpoint_files(trainer: pl.Trainer) -> tuple[list[Path], dict[str, float]]:
    """The best and last checkpoint files of the trainer's ``ModelCheckpoint`` callbacks and
    their best scores (``{"best <monitor>": score}``)."""
    files, meta = [], {}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, LastCheckpoint):  # last.ckpt of every epoch (beamvq.callbacks)
            files += [Path(cb.last_model_path)] if cb.last_model_path else []
        if not isinstance(cb, ModelCheckpoint):
            continue
        files += [Path(p) for p in (cb.best_model_path, cb.last_model_path) if p]
        if cb.best_model_score is not None:
            meta[f"best {cb.monitor}"] = float(cb.best_model_score)
    return files, meta


class WandbArtifacts(pl.Callback):
    """Best and last checkpoints (end of fit) and prediction NetCDF files (end of predict) as W&B
    artifacts ``model-<run id>`` and ``predictions-<run id>``; ``logged`` lists what was uploaded."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, list[Path]]] = []

    def _log(self, trainer: pl.Trainer, kind: str, files: list[Path], meta: dict[str, Any]) -> None:
        files = [f for f in dict.fromkeys(files) if f.is_file()]
        if not files:
            return
        for logger in wandb_media.wandb_loggers(trainer):
            if wandb_media.log_artifact(logger, kind, files, meta):
                self.logged.append((kind, files))

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        files, meta = checkpoint_files(trainer)
        self._log(trainer, "model", files, meta)

    @rank_zero_only
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        files = [
            cb.output_path(trainer)
            for cb in trainer.callbacks
            if isinstance(cb, NetCDFPredictionWriter)
        ]
        self._log(trainer, "predictions", files, {"checkpoint": str(trainer.ckpt_path)})
