"""Which weights a report shows: the subcommand and the epoch of the evaluated weights.

The validations of ``fit`` show the epoch being trained (``trainer.current_epoch``). ``beamvq
validate`` and ``beamvq test`` evaluate a checkpoint: the epoch is the checkpoint's ``epoch``
(Lightning's count of the epoch whose weights it holds: ``epoch=3-step=...ckpt`` and the fit's
``val_*_epoch003.png`` show the same weights), read in ``on_load_checkpoint``; without one (a test
right after ``trainer.fit`` in Python) it is the last trained epoch. The files ``validate``
writes start with ``validate_``, never the fit's ``val_``, so they never replace the fit's plots
(docs/configs.md).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

__all__ = ["EvaluatedWeights", "epoch_suffix", "validation_prefix"]


def validation_prefix(trainer: pl.Trainer) -> str:
    """``val`` for the validations of a fit, ``validate`` for a ``validate`` run."""
    return "validate" if trainer.state.fn == TrainerFn.VALIDATING else "val"


def epoch_suffix(epoch: int | None) -> str:
    """``_epoch003`` of epoch 3; nothing when the epoch is unknown (untrained weights)."""
    return "" if epoch is None else f"_epoch{epoch:03d}"


class EvaluatedWeights(pl.Callback):
    """Base of the report callbacks: remembers the epoch of the checkpoint the run loaded."""

    _checkpoint_epoch: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the checkpoint is restored (Lightning restores it after setup)
        self._checkpoint_epoch = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        epoch = checkpoint.get("epoch")
        self._checkpoint_epoch = int(epoch) if isinstance(epoch, int) else None

    def evaluated_epoch(self, trainer: pl.Trainer) -> int | None:
        """The epoch whose weights are evaluated now (module docstring); ``None`` when the
        weights were never trained."""
        if trainer.state.fn == TrainerFn.FITTING:
            return trainer.current_epoch
        if self._checkpoint_epoch is not None:
            return self._checkpoint_epoch
        return trainer.current_epoch - 1 if trainer.current_epoch > 0 else None
