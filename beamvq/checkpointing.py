"""Checkpoints: what they record of the model and data, the checks on loading one, RNG state.

A checkpoint carries, under the key ``"beamvq"``, the model's identity (backbone class, steps,
channels, latent width, code bank shape), the data's (datamodule class, variables, grid), the
count of skipped batches (``beamvq.faults``), and during ``fit`` every rank's random-number
state, restored on resume so that a resumed CPU run ends bit-identical to an uninterrupted one.

Two places check that a checkpoint fits before any work: ``check_ckpt_path`` runs on the CLI's
configuration (``--ckpt_path``: the file exists, reads safely, and its backbone/bottleneck classes
are the configured ones), ``check_checkpoint`` on the built model and data when the weights load
(identity, weight names and shapes, variables and grid), naming every difference and the
constructor arguments behind it. Atomic checkpoint files are in ``beamvq.checkpoint_io``.

Checkpoints are data, never code: ``read_checkpoint`` loads them with
``torch.load(weights_only=True)`` only and names the file and what is wrong when that fails
(empty, truncated, not a checkpoint, or holding objects only unpickling could rebuild);
``check_ckpt_options`` refuses ``--weights_only false`` and an evaluation without weights; and a
class path read from a checkpoint is imported only under ``beamvq`` or a package the configuration
itself names (``resolve_class``).
"""

from __future__ import annotations

import importlib
import logging
import random
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

log = logging.getLogger(__name__)

# checkpoint key of what beamvq adds: model/data identity, RNG states, fault counters
CKPT_KEY = "beamvq"
# values of --ckpt_path that Lightning resolves itself (not file paths)
SPECIAL_CKPT = {"last", "best", "hpc", "registry"}
_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
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


__all__ = [
    "CKPT_KEY",
    "CheckpointNotFound",
    "CheckpointRefused",
    "Refusal",
    "check_ckpt_options",
    "read_checkpoint",
    "check_checkpoint",
    "check_data",
    "check_ckpt_path",
    "class_path",
    "collect_rng_state",
    "data_identity",
    "init_arg_differences",
    "model_class_differences",
    "model_identity",
    "resolve_class",
    "restore_rng_state",
    "restore_state",
    "save_state",
    "weight_differences",
]


def class_path(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# -- random-number state ---------------------------------------------------------------------------
def collect_rng_state() -> dict[str, Any]:
    """The random-number states of this process: torch (CPU, CUDA if started), NumPy, Python.

    Only tensors and plain Python values, so a checkpoint holding them still loads with
    ``torch.load(weights_only=True)`` (the default of torch >= 2.6).
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the states ``collect_rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- identity ----------------------------------------------------------------------------------------
def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint of this ``VQForecaster`` must match: backbone class and shapes,
    bottleneck class and code bank shape.

    ``rollout_steps`` is not part of it: a model trained on one step may forecast several.
    """
    bb, bn = model.backbone, model.bottleneck
    return {
        "backbone": class_path(bb),
        "in_steps": int(bb.in_steps),
        "out_steps": int(bb.out_steps),
        "in_channels": int(bb.in_channels),
        "out_channels": int(bb.out_channels),
        "latent_dim": int(bb.latent_dim),
        "bottleneck": None if bn is None else class_path(bn),
        "codebook_shape": None if bn is None else list(bn.codebook.shape),
    }


def data_identity(dm: Any) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (class, channels, grid)."""
    out: dict[str, Any] = {"datamodule": type(dm).__qualname__}
    names = getattr(dm, "channel_names", None)
    if names is not None:
        out["variables"] = [str(n) for n in names]
    grid = getattr(dm, "grid", None)
    if grid is not None:
        out["grid"] = [int(g) for g in grid]
    return out


# -- save and restore ----------------------------------------------------------------------------
def save_state(model: nn.Module, trainer: pl.Trainer | None, skipped_batches: int) -> dict:
    """What goes under ``checkpoint[CKPT_KEY]``; call it on every rank (it gathers RNG states)."""
    dm = trainer.datamodule if trainer is not None else None
    extra: dict[str, Any] = {
        "model": model_identity(model),
        "data": None if dm is None else data_identity(dm),
        "skipped_batches": skipped_batches,
    }
    if trainer is not None and trainer.state.fn == "fit":
        # every rank's stream (Lightning calls this hook on all ranks; rank 0 writes)
        states = [collect_rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, collect_rng_state())
        extra["rng"] = states
    return extra


def restore_state(checkpoint: Mapping[str, Any], trainer: pl.Trainer | None) -> int:
    """Restore this rank's random-number state when resuming a fit; returns the checkpoint's
    count of skipped batches."""
    extra = checkpoint.get(CKPT_KEY) or {}
    states = extra.get("rng")
    if trainer is not None and trainer.state.fn == "fit" and states:
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds the random-number states of %d rank(s), this run has "
                "%d: the resumed run draws other random numbers than an uninterrupted one",
                len(states),
                trainer.world_size,
            )
        restore_rng_state(states[trainer.global_rank % len(states)])
    return int(extra.get("skipped_batches", 0))


# -- checks on the built model ---------------------------------------------------------------------
def check_data(model: nn.Module, rollout_steps: int, dm: Any) -> None:
    """Fail before any work when the data and the ``VQForecaster`` disagree on shapes."""
    bb = model.backbone
    expected = {"in_steps": bb.in_steps, "out_steps": bb.out_steps, "rollout_steps": rollout_steps}
    for name, want in expected.items():
        have = getattr(dm, name, want)
        if have != want:
            raise ValueError(
                f"data.windows.{name}={have} but the model expects {want} "
                f"(model.backbone.init_args / model.{name} must match the data)"
            )
    n_channels = getattr(dm, "num_channels", bb.in_channels)
    if n_channels != bb.in_channels or n_channels != bb.out_channels:
        raise ValueError(
            f"the data has {n_channels} channel(s) but the backbone takes in_channels="
            f"{bb.in_channels}, out_channels={bb.out_channels}"
        )
    grid = getattr(dm, "grid", None)
    if grid is not None:
        bb.check_grid(*grid)


def check_checkpoint(
    checkpoint: Mapping[str, Any], module: pl.LightningModule, trainer: pl.Trainer | None
) -> None:
    """Raise ``ValueError`` naming every way ``checkpoint`` does not fit ``module`` and its data.

    Compares the recorded model identity (backbone class, steps, channels, latent width,
    code bank) of ``module.model``, the weights' names and shapes, and the data the checkpoint
    was trained on (variables, grid, and for ``fit`` the datamodule class that owns the augmented
    pool) against this model and the trainer's datamodule; the message also lists the backbone's
    and bottleneck's constructor arguments that differ, when both sides hold them.
    """
    extra = checkpoint.get(CKPT_KEY) or {}
    problems = _identity_differences(extra.get("model"), model_identity(module.model))
    # sharding strategies hold sharded (or not yet materialized) weights at this point
    if trainer is None or not isinstance(trainer.strategy, _SHARDED_STRATEGIES):
        problems += weight_differences(
            checkpoint.get("state_dict") or {}, module.state_dict(), module.strict_loading
        )
    dm = trainer.datamodule if trainer is not None else None
    if dm is not None and extra.get("data"):
        fitting = trainer.state.fn == "fit"
        problems += _data_differences(extra["data"], data_identity(dm), fitting)
    if problems:
        # constructor arguments explain a structural difference; alone (dropout, EMA decay)
        # they are legitimate changes between fit and predict and are not errors
        hints = init_arg_differences(checkpoint.get("hyper_parameters") or {}, module.hparams)
        raise ValueError(_misfit_message(problems, hints, getattr(trainer, "ckpt_path", None)))


def _misfit_message(problems: list[str], hints: list[str], ckpt: str | None) -> str:
    where = f"checkpoint {ckpt}" if ckpt else "the checkpoint"
    hint_text = "\nconstructor arguments that differ:\n  - " + "\n  - ".join(hints) if hints else ""
    return (
        f"{where} does not fit this model/data:\n  - "
        + "\n  - ".join(problems)
        + hint_text
        + "\nUse the configuration the checkpoint was trained with (the run's config.yaml; "
        "its hyper-parameters are stored in the checkpoint) or train a new model."
    )


def _identity_differences(saved: Mapping[str, Any] | None, mine: Mapping[str, Any]) -> list[str]:
    if not saved:
        return []
    return [
        f"{key}: checkpoint {saved[key]}, this model {mine[key]}"
        for key in mine
        if key in saved and saved[key] != mine[key]
    ]


def _data_differences(
    saved: Mapping[str, Any], mine: Mapping[str, Any], fitting: bool
) -> list[str]:
    out = []
    for key, label in (("variables", "data variables"), ("grid", "data grid (y, x)")):
        if key in saved and key in mine and saved[key] != mine[key]:
            out.append(f"{label}: checkpoint {saved[key]}, this data {mine[key]}")
    if fitting and saved.get("datamodule") not in (None, mine["datamodule"]):
        out.append(
            f"datamodule: the checkpoint's state (augmented pool) was saved by "
            f"{saved['datamodule']}, this run uses {mine['datamodule']}, which "
            "Lightning would not restore it into"
        )
    return out


def init_arg_differences(
    saved_hparams: Mapping[str, Any], mine_hparams: Mapping[str, Any]
) -> list[str]:
    """Backbone/bottleneck constructor arguments that differ (both sides as configuration)."""
    out = []
    for part in ("backbone", "bottleneck"):
        saved, mine = saved_hparams.get(part), mine_hparams.get(part)
        if not (isinstance(saved, Mapping) and isinstance(mine, Mapping)):
            continue
        saved_args, mine_args = saved.get("init_args") or {}, mine.get("init_args") or {}
        for key in sorted(set(saved_args) | set(mine_args)):
            if saved_args.get(key) != mine_args.get(key):
                out.append(
                    f"model.{part}.init_args.{key}: checkpoint {saved_args.get(key)!r}, "
                    f"this model {mine_args.get(key)!r}"
                )
    return out


def weight_differences(
    saved_state: Mapping[str, Any], mine: Mapping[str, Tensor], strict: bool, limit: int = 5
) -> list[str]:
    """Weights whose shapes differ, and (under strict loading) missing or unexpected ones."""
    shape = [
        f"weight {k}: checkpoint {tuple(v.shape)}, this model {tuple(mine[k].shape)}"
        for k, v in saved_state.items()
        if k in mine and isinstance(v, Tensor) and tuple(v.shape) != tuple(mine[k].shape)
    ]
    out = shape[:limit] + ([f"... {len(shape) - limit} more weights"] if len(shape) > limit else [])
    return out + (_key_differences(saved_state, mine, limit) if strict else [])


def _key_differences(saved_state: Mapping[str, Any], mine: Mapping[str, Any], limit: int) -> list:
    missing = [k for k in mine if k not in saved_state]
    unexpected = [k for k in saved_state if k not in mine]
    out = []
    if missing:
        out.append(f"weights missing from the checkpoint: {missing[:limit]} ({len(missing)})")
    if unexpected:
        out.append(f"weights this model does not have: {unexpected[:limit]} ({len(unexpected)})")
    return out


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


def check_ckpt_path(ckpt: str | None, configured_model: Mapping[str, Any]) -> None:
    """``--ckpt_path``: the file exists (unless Lightning resolves the name), reads as data
    (``read_checkpoint``), and holds the configured backbone and bottleneck classes; raises
    naming the difference.

    Shapes and constructor arguments are compared when the weights load (``check_checkpoint``).
    """
    if not ckpt or str(ckpt) in SPECIAL_CKPT:
        return
    saved = read_checkpoint(str(ckpt))
    problems = model_class_differences(saved.get("hyper_parameters") or {}, configured_model)
    if problems:
        raise CheckpointRefused(
            f"--ckpt_path {ckpt} was trained with another model than the configuration "
            "gives:\n  - " + "\n  - ".join(problems) + "\nUse the configuration the checkpoint "
            "was trained with (its config.yaml) or a checkpoint of this model."
        )
