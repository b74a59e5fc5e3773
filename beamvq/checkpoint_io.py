"""Atomic checkpoint files: a checkpoint on disk is either the previous complete one or the new one.

Lightning's ``TorchCheckpointIO`` serializes into memory and, on a local filesystem, writes
through an fsspec transaction whose temporary file lives in the system temp folder; committing it
is a ``shutil.move``, which falls back to a copy when that folder is on another filesystem (the
usual case on clusters: node-local ``/tmp``, checkpoints on a shared filesystem). A job killed
during that copy leaves a truncated ``last.ckpt`` that ``--ckpt_path last`` then fails to load,
and nothing is flushed to stable storage before the rename.

``AtomicCheckpointIO`` writes the checkpoint to a hidden temporary file in the checkpoint's own
folder, flushes and ``fsync``s it, then ``os.replace``s it onto the target (atomic on POSIX
filesystems, NFS and Lustre included) and ``fsync``s the folder. A temporary file left by a killed
save is named ``.<name>.<pid>.<random>.tmp``: it never matches Lightning's ``last*.ckpt`` lookup,
and the next successful save of the same checkpoint deletes it. Remote URLs (``s3://``, ...) go
through Lightning's own path: object stores publish an upload only once it is complete. A save
that fails (a full disk, a folder made read-only) raises an ``OSError`` naming the checkpoint and
the free space left, instead of torch's ``PytorchStreamWriter failed writing file data/0``.

``beamvq`` CLI runs use it by default (``beamvq.cli``); in Python pass
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def temp_path(target: Path) -> Path:
    """A fresh temporary path beside ``target`` (hidden, never ``*.ckpt``)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def stale_temp_files(target: Path) -> list[Path]:
    """Temporary files of earlier, interrupted saves of ``target``."""
    return sorted(target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"))


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not every platform can open a directory
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # its folder is not there (or not a folder)
        pass


def _free(target: Path) -> str:
    """``" (<n> MiB free on <folder>)"``, or nothing when the folder cannot be examined."""
    try:
        return f" ({shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free on {target.parent})"
    except OSError:
        return ""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file + ``os.replace``)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        fs, _ = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            # remote stores (and the parent's error for storage_options) keep Lightning's path
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(fs._strip_protocol(str(path)))
        tmp = temp_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            _discard(tmp)
            raise OSError(f"cannot write the checkpoint {target}: {err}{_free(target)}") from err
        except BaseException:
            _discard(tmp)
            raise
        _fsync_dir(target.parent)
        for stale in stale_temp_files(target):
            log.info("removing %s, left by an interrupted checkpoint save", stale)
            stale.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], f: Any) -> None:
        """Serialize ``checkpoint`` into the open binary file ``f``."""
        torch.save(checkpoint, f)
