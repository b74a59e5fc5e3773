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

Checkpoints are data, never code: reading files and the CLI's checks on ``--ckpt_path`` are in
``beamvq.checkpoint_files`` (re-exported here).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from beamvq.checkpoint_files import (  # noqa: F401  (re-exported: the checks live there)
    EVALUATING,
    IMPORTABLE,
    SPECIAL_CKPT,
    CheckpointNotFound,
    CheckpointRefused,
    Refusal,
    check_ckpt_options,
    check_ckpt_path,
    model_class_differences,
    read_checkpoint,
    resolve_class,
)

log = logging.getLogger(__name__)

# checkpoint key of what beamvq adds: model/data identity, RNG states, fault counters
CKPT_KEY = "beamvq"
_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

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
    "wandb_run_id",
    "checkpoint_wandb_run_id",
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
        # bit-identical resume needs the same intra-op thread count (reductions split by thread)
        extra["torch_threads"] = torch.get_num_threads()
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            extra["wandb_run_id"] = run_id
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
        threads = extra.get("torch_threads")
        if threads is not None and int(threads) != torch.get_num_threads():
            log.warning(
                "the checkpoint was written with %d torch thread(s), this run has %d: the "
                "resumed run is not bit-identical to an uninterrupted one (sums split across "
                "threads round differently); set OMP_NUM_THREADS=%d or torch.set_num_threads(%d) "
                "for an exact resume",
                int(threads),
                torch.get_num_threads(),
                int(threads),
                int(threads),
            )
    return int(extra.get("skipped_batches", 0))


def wandb_run_id(trainer: pl.Trainer) -> str | None:
    """The id of the W&B run of ``trainer``'s first WandbLogger once it has started, else None
    (recorded in checkpoints so that a resumed fit continues the same run)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                version = logger.version
            except Exception:  # a logger that cannot start has no run to continue
                return None
            return None if version is None else str(version)
    return None


def checkpoint_wandb_run_id(checkpoint: Mapping[str, Any]) -> str | None:
    """The W&B run id that ``checkpoint`` (a checkpoint read as data) recorded, if any."""
    extra = checkpoint.get(CKPT_KEY) or {}
    run_id = extra.get("wandb_run_id") if isinstance(extra, Mapping) else None
    return str(run_id) if isinstance(run_id, str) and run_id else None


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
        + "\nUse the configuration the checkpoint was trained with (the run's config_fit.yaml; "
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
