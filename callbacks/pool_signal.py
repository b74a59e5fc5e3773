"""How much of the training signal BeamVQ's pool gets: its share, weighted by the learning rate.

Pseudo-samples that arrive late, when a cosine schedule has brought the rate near zero, teach
little: measured on an earlier protocol, they got under 1 % of the learning-rate-weighted
signal although the pool held as many samples as a few epochs of real windows (issue 17). This
callback sums, over the training batches, ``lr × (the pool samples' share of the batch's loss
weight)`` and divides by the sum of ``lr``, over the fit so far (it is part of the checkpoint, so
a resumed fit goes on counting). Logged each epoch as ``augment/pool_signal_share``; the lr is
the first parameter group's.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from beamvq.protocols import Batch

__all__ = ["PoolSignalShare"]


class PoolSignalShare(pl.Callback):
    """Log ``augment/pool_signal_share`` (see the module docstring) at every epoch's end."""

    def __init__(self) -> None:
        super().__init__()
        # sum over training batches of lr x the pool's share of the loss weight, and of lr
        self._signal = torch.zeros(2, dtype=torch.float64)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if not isinstance(batch, Batch) or not trainer.optimizers:
            return
        weight = batch.weight.detach().double()
        pool = float(weight[batch.index < 0].sum()) / max(float(weight.sum()), 1e-300)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._signal += torch.tensor([lr * pool, lr], dtype=torch.float64)

    @property
    def share(self) -> float:
        """The pool's share of the learning-rate-weighted training signal over the fit so far."""
        total = float(self._signal[1])
        return float(self._signal[0]) / total if total > 0 else 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("augment/pool_signal_share", self.share, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"signal": self._signal.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._signal = state_dict["signal"].clone()
