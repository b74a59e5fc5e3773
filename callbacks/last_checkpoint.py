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

Leftovers of a killed run: a fit killed after a ``ModelCheckpoint`` saved a new best file but
before the epoch's ``last.ckpt`` leaves that file on disk, unknown to the top-k bookkeeping
that ``last.ckpt`` restores (pytorch-lightning 2.6 restores ``best_k_models`` from the
checkpoint and deletes only files it knows), so the folder kept more than ``save_top_k`` best
files, for ever. When a fit resumes from a ``last*.ckpt``, ``LastCheckpoint`` deletes, before
training, the files of each ``ModelCheckpoint``'s folder that its ``filename`` template makes,
that are newer than the resumed file and that the restored bookkeeping does not hold (and their
temporary files), in one log line (``remove_interrupted_saves``). Nothing else is touched:
files of other names, files older than the resumed checkpoint (earlier runs into the same
folder), folders shared with a ``ModelCheckpoint`` that keeps every file.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

log = logging.getLogger(__name__)

__all__ = [
    "LAST_NAME",
    "LastCheckpoint",
    "after_model_checkpoints",
    "find_last_checkpoint",
    "last_checkpoint_dirs",
    "model_checkpoint_dir",
    "remove_interrupted_saves",
    "top_k_file_pattern",
]

LAST_NAME = "last.ckpt"
# the files --ckpt_path last considers (Lightning's rule: last.ckpt, last-v1.ckpt, ...)
_LAST_FILE = re.compile(r"^last(-(\d+))?")
# what a metric or epoch/step becomes in a checkpoint name ("3", "0.1234", "1.5e-05", "nan")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
# beamvq.checkpoint_io.AtomicCheckpointIO's temporary file of <name>: .<name>.<pid>.<hex8>.tmp
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


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


def top_k_file_pattern(cb: ModelCheckpoint) -> re.Pattern[str]:
    """The names ``cb`` gives its files: its ``filename`` template (default ``{epoch}-{step}``)
    with every field a number, ``name=`` before it when ``auto_insert_metric_name``, and
    Lightning's ``-v<n>`` suffix for a name already taken."""
    template = cb.filename or "{epoch}" + cb.CHECKPOINT_JOIN_CHAR + "{step}"
    out = []
    for part in re.split(r"(\{[^{}]*\})", template):
        field = re.fullmatch(r"\{([^:{}]*)(?::[^{}]*)?\}", part)
        if field is None:
            out.append(re.escape(part))
            continue
        if cb.auto_insert_metric_name:
            out.append(re.escape(field.group(1) + cb.CHECKPOINT_EQUALS_CHAR))
        out.append(_NUMBER)
    version = re.escape(cb.CHECKPOINT_JOIN_CHAR) + r"v\d+"
    return re.compile(f"^{''.join(out)}(?:{version})?{re.escape(cb.FILE_EXTENSION)}$")


def _keeps_top_k(cb: ModelCheckpoint) -> bool:
    """Whether ``cb`` deletes files it no longer needs (else it keeps every file it saves)."""
    return cb.save_top_k > 0 and (cb.monitor is not None or cb.save_top_k == 1)


def _known_files(state: dict[str, Any]) -> set[str]:
    names = [*state.get("best_k_models", {})]
    names += [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
    return {os.path.abspath(str(n)) for n in names if n}


def _known_in_folder(
    folder: str, cbs: list[ModelCheckpoint], states: dict[str, dict[str, Any]], resumed: str
) -> set[str] | None:
    """The files the restored bookkeeping of ``folder``'s callbacks knows (plus ``resumed``), or
    None when the folder is not to be cleaned (remote, missing, keeping every file, or with no
    restored bookkeeping)."""
    restored = [states.get(cb.state_key) for cb in cbs]
    if "://" in folder or not Path(folder).is_dir() or not all(map(_keeps_top_k, cbs)):
        return None
    if any(st is None or st.get("dirpath") != cb.dirpath for cb, st in zip(cbs, restored)):
        return None  # Lightning restored no bookkeeping for this folder
    known = set().union(*(_known_files(st) for st in restored if st is not None))
    known.add(os.path.abspath(resumed))
    return known


def _saved_since(
    folder: str, cbs: list[ModelCheckpoint], known: set[str], since: float
) -> list[Path]:
    """Top-k files (or their atomic temporaries) of ``folder`` newer than ``since`` and unknown."""
    patterns = [top_k_file_pattern(cb) for cb in cbs]
    found = []
    for path in sorted(Path(folder).iterdir()):
        tmp = _ATOMIC_TMP.match(path.name)
        name = tmp["name"] if tmp else path.name
        if not any(p.match(name) for p in patterns) or _LAST_FILE.match(name):
            continue
        if path.is_file() and os.path.abspath(path) not in known and path.stat().st_mtime > since:
            found.append(path)
    return found


def remove_interrupted_saves(
    trainer: pl.Trainer, resumed: str, states: dict[str, dict[str, Any]]
) -> list[Path]:
    """Delete the files each ``ModelCheckpoint`` saved after the checkpoint ``resumed`` was
    written and that its restored state ``states[cb.state_key]`` does not know (see the module
    docstring); one log line; returns what was removed. Local folders only."""
    since = Path(resumed).stat().st_mtime
    by_folder: dict[str, list[ModelCheckpoint]] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            by_folder.setdefault(str(cb.dirpath), []).append(cb)
    removed: list[Path] = []
    for folder, cbs in by_folder.items():
        known = _known_in_folder(folder, cbs, states, resumed)
        if known is None:
            continue
        for path in _saved_since(folder, cbs, known, since):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning(
            "removed %d checkpoint file(s) that the interrupted run saved after %s and that "
            "the resumed top-k bookkeeping does not know (beyond save_top_k): %s",
            len(removed), resumed, ", ".join(str(p) for p in removed),
        )  # fmt: skip
    return removed


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` at the end of every training epoch (see the module docstring).

    Args:
        dirpath: the folder; ``None``: the first ``ModelCheckpoint``'s, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_model_path = ""
        # the ModelCheckpoints' states in the checkpoint a fit resumes from
        self._resumed_states: dict[str, dict[str, Any]] = {}

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

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        self._resumed_states = {
            str(k): v for k, v in states.items() if isinstance(v, dict) and "best_k_models" in v
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after every restore: files of the interrupted run unknown to the restored top-k
        resumed, states, self._resumed_states = trainer.ckpt_path, self._resumed_states, {}
        if not (resumed and states and trainer.is_global_zero and Path(resumed).is_file()):
            return
        if _LAST_FILE.match(Path(resumed).stem):  # not an older checkpoint a user rewinds to
            remove_interrupted_saves(trainer, str(resumed), states)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning's checkpoints skip such runs too
            return
        path = os.path.join(self.directory(trainer), LAST_NAME)
        # every rank calls it (the module gathers their random-number states); rank 0 writes
        trainer.save_checkpoint(path, weights_only=False)
        self.last_model_path = path
