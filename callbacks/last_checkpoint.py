"""``last.ckpt`` at the end of every training epoch, whatever the monitored metric did.

Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only in epochs
that also save a top-k checkpoint (pytorch-lightning 2.6: "Only save last checkpoint if a
checkpoint was actually saved in this step"). After an epoch whose validation loss got worse,
the final weights and the augmented pool that epoch's search grew were nowhere on disk, and
``--ckpt_path last`` resumed (or predicted) from a stale epoch. ``LastCheckpoint`` writes
``<dirpath>/last.ckpt`` at the end of every training epoch with ``trainer.save_checkpoint``
(atomic under the CLI's ``beamvq.checkpoint_io.AtomicCheckpointIO``), replacing the previous file:
a second fit into the same folder replaces it too (no ``last-v1.ckpt`` beside a stale one).

Order: as a ``pytorch_lightning.callbacks.Checkpoint`` it runs its epoch-end hook after every
other callback (BeamVQ's search included) and after the LightningModule's, so the file holds the
pool the next epoch trains on; at ``setup`` it moves itself after every ``ModelCheckpoint``, so
the file also holds their bookkeeping of this epoch (best score, top-k files), wherever it stands
in the callbacks list.

Where: ``dirpath`` when given, else the folder of the first ``ModelCheckpoint`` (where
Lightning's and beamvq's ``--ckpt_path last`` look), else ``<default_root_dir>/checkpoints``. Use
it with ``ModelCheckpoint(save_last=False)``: the shipped configs do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

__all__ = [
    "LAST_NAME",
    "LastCheckpoint",
    "after_model_checkpoints",
    "find_last_checkpoint",
    "last_checkpoint_dirs",
    "model_checkpoint_dir",
]

LAST_NAME = "last.ckpt"
# the files --ckpt_path last considers (Lightning's rule: last.ckpt, last-v1.ckpt, ...)
_LAST_FILE = re.compile(r"^last(-(\d+))?")


def model_checkpoint_dir(cb: ModelCheckpoint, trainer: pl.Trainer) -> str:
    """The folder ``cb`` writes to: its ``dirpath``, else Lightning's rule (the first logger's
    ``<save_dir>/<name>/<version>/checkpoints``, or ``<default_root_dir>/checkpoints``)."""
    if cb.dirpath is not None:
        return str(cb.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(str(save_dir), str(logger.name), version, "checkpoints")
    return os.path.join(str(trainer.default_root_dir), "checkpoints")


def after_model_checkpoints(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """``callbacks`` with every ``LastCheckpoint`` moved to the end (the others keep their order)."""
    last = [c for c in callbacks if isinstance(c, LastCheckpoint)]
    return [c for c in callbacks if not isinstance(c, LastCheckpoint)] + last


def last_checkpoint_dirs(trainer: pl.Trainer) -> list[str]:
    """The folders ``--ckpt_path last`` looks in: every ``ModelCheckpoint``'s and
    ``LastCheckpoint``'s."""
    dirs = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            dirs.append(model_checkpoint_dir(cb, trainer))
        elif isinstance(cb, LastCheckpoint):
            dirs.append(cb.directory(trainer))
    return list(dict.fromkeys(dirs))


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest ``last*.ckpt`` in ``last_checkpoint_dirs`` (or an ``OnExceptionCheckpoint``'s
    file): what ``--ckpt_path last`` loads; ``None`` when there is none. Local folders only."""
    found = [
        path
        for folder in last_checkpoint_dirs(trainer)
        if Path(folder).is_dir()
        for path in Path(folder).iterdir()
        if path.suffix == ".ckpt" and _LAST_FILE.match(path.stem) and path.is_file()
    ]
    for cb in trainer.callbacks:
        if isinstance(cb, OnExceptionCheckpoint) and Path(cb.ckpt_path).is_file():
            found.append(Path(cb.ckpt_path))
    if not found:
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime))


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` at the end of every training epoch (see the module docstring).

    Args:
        dirpath: the folder; ``None``: the first ``ModelCheckpoint``'s, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_model_path = ""

    def directory(self, trainer: pl.Trainer) -> str:
        """The folder ``last.ckpt`` goes to (see ``dirpath``)."""
        if self.dirpath is not None:
            return str(self.dirpath)
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                return model_checkpoint_dir(cb, trainer)
        return os.path.join(str(trainer.default_root_dir), "checkpoints")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a new list, not an in-place change: Lightning is iterating over the current one
        trainer.callbacks = after_model_checkpoints(trainer.callbacks)
        if stage != "fit":
            return
        folder = self.directory(trainer)
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                if model_checkpoint_dir(cb, trainer) == folder:
                    rank_zero_warn(
                        f"ModelCheckpoint(save_last={cb.save_last}) also writes last*.ckpt in "
                        f"{folder}, only in epochs it saves a top-k checkpoint; LastCheckpoint "
                        "writes last.ckpt there every epoch: set the ModelCheckpoint's "
                        "save_last: false"
                    )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning's checkpoints skip such runs too
            return
        path = os.path.join(self.directory(trainer), LAST_NAME)
        # every rank calls it (the module gathers their random-number states); rank 0 writes
        trainer.save_checkpoint(path, weights_only=False)
        self.last_model_path = path
