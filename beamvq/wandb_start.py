"""Start W&B runs before training, so that an online run that cannot start goes offline.

W&B runs offline unless the environment says otherwise (``beamvq.cli`` sets ``WANDB_MODE=offline``
by default; ``WANDB_MODE=online`` uploads, ``WANDB_MODE=disabled`` turns it off). An online run
that cannot start (no API key, wrong entity or project, no network) falls back to an offline run
in the same ``save_dir`` with a warning, within ``WANDB_INIT_TIMEOUT`` seconds (default 30), so
training never waits on W&B; ``wandb sync`` uploads it later.

A fit resumed from a checkpoint continues the W&B run that wrote it (``beamvq.checkpointing``
records the run id), so one fit keeps one history; a logger given its own ``id``/``version``
keeps it. A validate, test or predict run records that id as its config ``fit_run_id`` (it is
also in the fit run's ``group``, ``beamvq.run_paths``), so its metrics are found beside the fit.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger("beamvq")

_OFFLINE_MODES = {"offline", "dryrun", "disabled"}
DEFAULT_WANDB_INIT_TIMEOUT = 30.0

__all__ = [
    "DEFAULT_WANDB_INIT_TIMEOUT",
    "continue_wandb_run",
    "finish_wandb",
    "record_fit_run",
    "start_wandb",
]


def _init_settings(logger: WandbLogger) -> tuple[bool, dict[str, Any]]:
    """The logger's ``offline`` flag and the keyword arguments it will pass to ``wandb.init``
    (the dict itself: changing it changes the run the logger starts).

    The one place (with ``continue_wandb_run``, which sets the id the same way the logger's
    ``version`` argument would) that reads WandbLogger's private state: it has no public accessor for either,
    and the fallback below must set the run's mode and ``init_timeout`` before the logger starts
    the run (``logger.experiment``), which is the logger's only public way to start it.
    """
    return logger._offline, logger._wandb_init


def _wandb_mode(logger: WandbLogger) -> str:
    offline, init = _init_settings(logger)
    if offline:
        return "offline"
    return str(init.get("mode") or os.environ.get("WANDB_MODE") or "online")


def continue_wandb_run(trainer: pl.Trainer, run_id: str | None) -> bool:
    """Point ``trainer``'s W&B loggers that have no run yet, and no id of their own, at the run
    ``run_id`` (``resume="allow"``: the resumed fit appends to that run's history). Returns
    whether a logger was pointed at it."""
    if not run_id or rank_zero_only.rank != 0:
        return False
    pointed = False
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        _, init = _init_settings(logger)
        if init.get("id") or _wandb_mode(logger) == "disabled":
            continue
        if logger.version is not None:  # already started (or given a version)
            continue
        init["id"] = run_id
        init["resume"] = "allow"
        logger._id = run_id  # the logger's version before the run starts (see _init_settings)
        pointed = True
    if pointed:
        log.info("W&B: the resumed fit continues run %s", run_id)
    return pointed


def record_fit_run(trainer: pl.Trainer, run_id: str | None) -> bool:
    """Add ``fit_run_id: run_id`` (the W&B run that trained the checkpoint) to the config of
    ``trainer``'s W&B runs that have not started. Returns whether a logger got it."""
    if not run_id or rank_zero_only.rank != 0:
        return False
    recorded = False
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or logger.version is not None:
            continue
        _, init = _init_settings(logger)
        config = init.get("config")
        if config is None or isinstance(config, dict):
            init["config"] = {**(config or {}), "fit_run_id": run_id}
            recorded = True
    return recorded


def start_wandb(trainer: pl.Trainer, init_timeout: float | None = None) -> None:
    """Start every W&B run of ``trainer`` now; an online run that cannot start goes offline.

    ``wandb.init`` gets ``init_timeout`` seconds (default: ``$WANDB_INIT_TIMEOUT`` or 30) unless
    the logger's own ``settings`` say otherwise. Any failure to start online (no API key, an
    unknown entity or project, an unreachable server) is logged as a warning and the logger
    starts an offline run in the same ``save_dir`` instead. Offline and disabled runs start
    lazily as usual; ranks other than 0 have no W&B run.
    """
    if rank_zero_only.rank != 0:
        return
    if init_timeout is None:
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_WANDB_INIT_TIMEOUT))
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    for logger in loggers:
        # a run in progress is the one the logger attaches to (WandbLogger.experiment)
        if wandb.run is None and _wandb_mode(logger) not in _OFFLINE_MODES:
            _start_or_go_offline(logger, init_timeout)


def _start_or_go_offline(logger: WandbLogger, init_timeout: float) -> None:
    import wandb

    _, init = _init_settings(logger)
    # the CLI may pass settings=None through WandbLogger's **kwargs (wandb.init's signature)
    settings = init.get("settings")
    if settings is None:
        init["settings"] = wandb.Settings(init_timeout=init_timeout)
    elif isinstance(settings, dict):
        settings.setdefault("init_timeout", init_timeout)
    try:
        logger.experiment  # noqa: B018  (starts the run)
    except Exception as err:  # wandb raises CommError, UsageError, AuthenticationError, ...
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning(
            "W&B could not start an online run (%s: %s); training goes on with an offline "
            "run in %s (upload it later with `wandb sync`)",
            type(err).__name__,
            message,
            logger.save_dir or "./wandb",
        )
        if wandb.run is not None:
            wandb.finish()
        # the failed start left the logger without a run: the next access starts offline
        init["mode"] = "offline"
        logger.experiment  # noqa: B018


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run of ``trainer``'s loggers, so a following command (e.g. predict after
    fit) in the same process starts its own run."""
    if not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
