"""Checkpoint files as data, and the CLI's checks on ``--ckpt_path`` before any work.

Checkpoints are data, never code: ``read_checkpoint`` loads them with
``torch.load(weights_only=True)`` only and names the file and what is wrong when that fails
(empty, truncated, not a checkpoint, or holding objects only unpickling could rebuild);
``check_ckpt_options`` refuses ``--weights_only false`` and an evaluation without weights;
``check_ckpt_path`` checks that the file holds the configured backbone and bottleneck classes;
and a class path read from a checkpoint is imported only under ``beamvq`` or a package the
configuration itself names (``resolve_class``). What a checkpoint records and the checks when
the weights load are in ``beamvq.checkpointing``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EVALUATING",
    "IMPORTABLE",
    "SPECIAL_CKPT",
    "CheckpointNotFound",
    "CheckpointRefused",
    "Refusal",
    "check_ckpt_options",
    "check_ckpt_path",
    "model_class_differences",
    "read_checkpoint",
    "resolve_class",
]

# values of --ckpt_path that Lightning resolves itself (not file paths)
SPECIAL_CKPT = {"last", "best", "hpc", "registry"}
# subcommands that only make sense with trained weights
EVALUATING = ("validate", "test", "predict")
# top-level packages whose class paths a checkpoint may make beamvq import (besides the
# configuration's own): importing a module runs its code, and a checkpoint is data
IMPORTABLE = ("beamvq",)


class Refusal(Exception):
    """An argument refused before any work; the ``beamvq`` console prints its message alone."""


class CheckpointRefused(Refusal, ValueError):
    """A checkpoint (or a checkpoint option) that beamvq will not load."""


class CheckpointNotFound(Refusal, FileNotFoundError):
    """A checkpoint file that is not there."""


# -- checks on the CLI's configuration ---------------------------------------------------------------
def _unreadable(err: Exception) -> str:
    """What ``torch.load(weights_only=True)``'s error says about the file, without torch's advice
    to load it unsafely."""
    unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return (
            f"refused: it holds a Python object ({unsafe.group(1)}) that only unpickling could "
            "rebuild, and unpickling runs code from the file. beamvq reads checkpoints as data "
            "(torch.load with weights_only=True: tensors and plain values, all a beamvq "
            "checkpoint holds); use a checkpoint written by beamvq fit, or convert other weights "
            "with beamvq import-weights"
        )
    return (
        f"not a readable PyTorch checkpoint ({type(err).__name__}): the file is truncated, "
        "corrupted or of another kind"
    )


def read_checkpoint(path: str, option: str = "--ckpt_path") -> Mapping[str, Any]:
    """The Lightning checkpoint at ``path``, loaded as data only (``weights_only=True``), or one
    ``CheckpointRefused``/``CheckpointNotFound`` naming ``option``, the file and what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointNotFound(f"{option}: checkpoint file not found: {path}")
    if file.stat().st_size == 0:
        raise CheckpointRefused(
            f"{option} {path}: the file is empty (0 bytes), not a checkpoint: a save that never "
            "finished or a failed copy; use another checkpoint"
        )
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError, KeyError, ...
        raise CheckpointRefused(f"{option} {path}: {_unreadable(err)}") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointRefused(f"{option} {path}: holds no state_dict: not a Lightning checkpoint")
    return checkpoint


def check_ckpt_options(subcommand: str, ckpt: str | None, weights_only: bool | None) -> None:
    """Refuse, before anything is built, ``--weights_only false`` (beamvq loads checkpoints as
    data only) and ``validate``/``test``/``predict`` without ``--ckpt_path`` (they would run a
    randomly initialised model and look like success)."""
    if weights_only is False:
        raise CheckpointRefused(
            "--weights_only false: refused. beamvq loads checkpoints only as data "
            "(weights_only=True: tensors and plain values, all a beamvq checkpoint holds); "
            "unpickling anything else runs code from the file. Remove the option."
        )
    if subcommand in EVALUATING and not ckpt:
        raise CheckpointRefused(
            f"beamvq {subcommand} needs trained weights: no --ckpt_path given, so it would run "
            "a randomly initialised model. Give --ckpt_path PATH (a checkpoint of beamvq fit, "
            "e.g. <run>/checkpoints/last.ckpt) or --ckpt_path last (the newest last*.ckpt of the "
            "configuration's checkpoint folder)."
        )


def resolve_class(path: str, trusted: Collection[str] = ()) -> object:
    """The class a ``class_path`` names (``beamvq.backbones.SimVPv2`` and its defining module's
    ``beamvq.backbones.simvp.SimVPv2`` are the same), or the string if it does not import.

    Only modules under ``beamvq`` or a ``trusted`` top-level package are imported: a class path
    read from a checkpoint is data, and importing a module runs its code.
    """
    module, _, name = path.rpartition(".")
    if module.split(".")[0] not in (*IMPORTABLE, *trusted):
        return path
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def _configured_packages(configured: Mapping[str, Any]) -> set[str]:
    """Top-level packages of the configured backbone/bottleneck classes (imported anyway)."""
    out = set()
    for part in ("backbone", "bottleneck"):
        section = configured.get(part)
        if isinstance(section, dict) and section.get("class_path"):
            out.add(str(section["class_path"]).split(".")[0])
    return out


def model_class_differences(saved: Mapping[str, Any], configured: Mapping[str, Any]) -> list[str]:
    """Backbone/bottleneck classes of a checkpoint's hyper-parameters that the config changes."""
    out = []
    trusted = _configured_packages(configured)
    for part in ("backbone", "bottleneck"):
        old, new = saved.get(part), configured.get(part)
        if part not in saved or not (old is None or isinstance(old, dict)):
            continue  # a checkpoint made in Python holds the module itself: the load checks it
        old_cls = old.get("class_path") if isinstance(old, dict) else None
        new_cls = new.get("class_path") if isinstance(new, dict) else None
        if old_cls is not None and not isinstance(old_cls, str):
            out.append(f"model.{part}: checkpoint {old_cls!r} (not a class path)")
        elif (old_cls is None) != (new_cls is None) or (
            old_cls is not None
            and old_cls != new_cls
            and resolve_class(old_cls, trusted) != resolve_class(str(new_cls), trusted)
        ):
            note = ""
            if old_cls is not None and old_cls.split(".")[0] not in (*IMPORTABLE, *trusted):
                note = " (not imported: outside beamvq and the configuration's packages)"
            out.append(f"model.{part}: checkpoint {old_cls}{note}, configuration {new_cls}")
    return out


def check_ckpt_path(
    ckpt: str | None, configured_model: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """``--ckpt_path``: the file exists (unless Lightning resolves the name), reads as data
    (``read_checkpoint``), and holds the configured backbone and bottleneck classes; raises
    naming the difference. Returns the checkpoint read as data (None for no file or a name
    Lightning resolves).

    Shapes and constructor arguments are compared when the weights load (``check_checkpoint``).
    """
    if not ckpt or str(ckpt) in SPECIAL_CKPT:
        return None
    saved = read_checkpoint(str(ckpt))
    problems = model_class_differences(saved.get("hyper_parameters") or {}, configured_model)
    if problems:
        raise CheckpointRefused(
            f"--ckpt_path {ckpt} was trained with another model than the configuration "
            "gives:\n  - " + "\n  - ".join(problems) + "\nUse the configuration the checkpoint "
            "was trained with (its config_fit.yaml) or a checkpoint of this model."
        )
    return saved
