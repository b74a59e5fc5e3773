"""The places a run writes to, checked before any work (docs/reliability.md).

A read-only, missing-permission or full output folder used to show only after training or
predicting, as ``NetCDF: HDF error`` or torch's ``PytorchStreamWriter failed writing file``.
``check_output_locations`` takes every folder a run will write to (``trainer_output_locations``
lists them: ``trainer.default_root_dir``, each logger's ``save_dir``, the checkpoint folders, the
prediction files' folders), creates it, writes and removes a small probe file in it, and checks
that its filesystem has at least ``MIN_FREE_MB`` free; the first that fails is refused with a
``beamvq.checkpoint_files.Refusal`` naming the setting and the folder (the ``beamvq`` console
prints it in one line). Remote URLs (``s3://``...) are not checked.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl

from beamvq.checkpoint_files import Refusal

__all__ = [
    "MIN_FREE_MB",
    "OutputLocation",
    "OutputNotWritable",
    "check_output_locations",
    "trainer_output_locations",
]

# below this much free space a run cannot be expected to write its checkpoints, logs and
# prediction files (a quickstart checkpoint is about 2 MB; W&B's offline run a few MB)
MIN_FREE_MB = 50.0


class OutputNotWritable(Refusal, OSError):
    """An output folder that cannot be created or written, or whose filesystem is full."""


class OutputLocation(NamedTuple):
    """A folder a run writes to, what writes there (``the prediction file runs/pred.nc``) and
    the setting that chooses it (``trainer.default_root_dir``), as a refusal names them."""

    what: str
    folder: Path
    setting: str


def _is_remote(path: object) -> bool:
    return "://" in str(path)


def _check_one(loc: OutputLocation, min_free_mb: float) -> None:
    folder = Path(os.path.expanduser(str(loc.folder)))
    fix = f"change {loc.setting} or fix the folder's permissions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputNotWritable(
            f"{loc.what}: cannot create the folder {folder} ({err.strerror or err}); {fix}"
        ) from err
    probe = folder / f".beamvq-write-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        probe.write_bytes(b"beamvq")
        probe.unlink()
    except OSError as err:
        raise OutputNotWritable(
            f"{loc.what}: cannot write in the folder {folder} ({err.strerror or err}); {fix}"
        ) from err
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < min_free_mb:
        raise OutputNotWritable(
            f"{loc.what}: only {free_mb:.0f} MiB free on the filesystem of {folder}, below the "
            f"{min_free_mb:g} MiB a run needs for its outputs; free some space or change "
            f"{loc.setting}"
        )


def check_output_locations(
    locations: Iterable[OutputLocation], min_free_mb: float = MIN_FREE_MB
) -> None:
    """Create each local folder of ``locations``, write and remove a probe file in it and check
    its free space; refuse (``OutputNotWritable``) the first that fails, naming it."""
    seen: set[str] = set()
    for loc in locations:
        if _is_remote(loc.folder):
            continue
        key = os.path.abspath(os.path.expanduser(str(loc.folder)))
        if key in seen:
            continue
        seen.add(key)
        _check_one(loc, min_free_mb)


def trainer_output_locations(
    trainer: pl.Trainer,
    stage: str,
    checkpoint_dirs: Sequence[str | os.PathLike] = (),
    prediction_files: Sequence[str | os.PathLike] = (),
) -> list[OutputLocation]:
    """The folders ``stage`` (``fit``, ``validate``, ``test``, ``predict``) writes to: for
    ``fit`` ``trainer.default_root_dir`` and ``checkpoint_dirs`` (the CLI passes
    ``beamvq.callbacks.last_checkpoint.last_checkpoint_dirs``), for ``predict`` the folders of
    ``prediction_files``, and always every logger's ``save_dir``."""
    found: list[OutputLocation] = []
    if stage == "fit":
        root = "trainer.default_root_dir"
        found.append(OutputLocation(root, Path(trainer.default_root_dir), root))
    for logger in trainer.loggers:
        if logger.save_dir is not None:
            what = f"the logger's save_dir ({type(logger).__name__})"
            setting = "trainer.logger.init_args.save_dir"
            found.append(OutputLocation(what, Path(logger.save_dir), setting))
    if stage == "fit":
        setting = "the dirpath of the checkpoint callbacks (trainer.callbacks)"
        found += [
            OutputLocation("the checkpoint folder", Path(d), setting) for d in checkpoint_dirs
        ]
    if stage == "predict":
        setting = "the prediction writer's output (trainer.callbacks)"
        for file in prediction_files:
            what = f"the prediction file {file}"
            found.append(OutputLocation(what, Path(file).parent, setting))
    return found
