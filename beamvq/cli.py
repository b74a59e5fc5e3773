"""The ``beamvq`` command: a LightningCLI over ``ForecastModule`` and the datamodules.

``beamvq fit|validate|test|predict --config configs/quickstart.yaml [--config more.yaml]``.
Backbone, bottleneck, datamodule, logger, callbacks and strategy are chosen by class path in YAML.
This is the only module that wires the model side to data, callbacks and precision plugins.

W&B runs offline unless the environment says otherwise (``WANDB_MODE=online`` to upload,
``WANDB_MODE=disabled`` to turn it off); nothing here touches the network by default. An online run
that cannot start (no API key, wrong entity or project, no network) falls back to an offline run
with a warning, within ``WANDB_INIT_TIMEOUT`` seconds (default 30), so training never waits on W&B.

Checkpoints are written atomically (``beamvq.checkpoint_io.AtomicCheckpointIO`` replaces
Lightning's default ``TorchCheckpointIO``; a ``CheckpointIO`` given in ``--trainer.plugins`` or by
the strategy is kept). See docs/reliability.md for what resuming guarantees.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.utilities import rank_zero_only

import beamvq.quant  # noqa: F401  (registers the precision strategies by name)
from beamvq.checkpoint_io import AtomicCheckpointIO
from beamvq.module import ForecastModule

log = logging.getLogger("beamvq")

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}
_OFFLINE_MODES = {"offline", "dryrun", "disabled"}
DEFAULT_WANDB_INIT_TIMEOUT = 30.0


class LoggedSaveConfig(SaveConfigCallback):
    """Save the resolved config beside the run and record it in the experiment logger."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class BeamVQCLI(LightningCLI):
    """LightningCLI with early checks that name the offending argument."""

    def _check_ckpt(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and str(ckpt) not in _SPECIAL_CKPT and not Path(str(ckpt)).is_file():
            raise FileNotFoundError(f"--ckpt_path: checkpoint file not found: {ckpt}")

    def _check_data_only(self) -> None:
        """``--data.init_args.check_only true``: summarize the data and exit before any training."""
        dm = self.datamodule
        if getattr(dm, "check_only", False):
            dm.prepare_data()
            dm.setup("fit")
            sys.stdout.write(dm.check() + "\n")
            sys.exit(0)

    def _parse_ckpt_path(self) -> None:
        """Keep the configured model; stop if ``--ckpt_path`` holds another backbone/bottleneck.

        LightningCLI would replace the configured model arguments by the checkpoint's
        hyper-parameters (for a file path, not for ``last``), so that predict-time options such
        as ``--model.predict_members`` were silently ignored and a config naming another
        backbone silently predicted with the checkpoint's. Here the configuration stays as
        given; a backbone or bottleneck class that differs from the checkpoint's is an error
        naming both, and differing shapes are reported when the weights load
        (``ForecastModule.check_checkpoint``).
        """
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or not Path(str(ckpt)).is_file():
            return
        saved = torch.load(str(ckpt), weights_only=True, map_location="cpu")
        model = self.config[sub].get("model")
        configured = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        problems = model_class_differences(saved.get("hyper_parameters") or {}, configured)
        if problems:
            raise ValueError(
                f"--ckpt_path {ckpt} was trained with another model than the configuration "
                "gives:\n  - " + "\n  - ".join(problems) + "\nUse the configuration the checkpoint "
                "was trained with (its config.yaml) or a checkpoint of this model."
            )

    def _before(self) -> None:
        self._check_ckpt()
        self._check_data_only()
        start_wandb(self.trainer)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> pl.Trainer:
        # a rich progress bar by default, unless the run turns the bar off or names its own
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        plugins = kwargs.get(
            "plugins", self._get(self.config_init, "trainer", default={}).get("plugins")
        )
        chosen = plugins if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in chosen):
            use_atomic_checkpoints(trainer)
        check_launch_environment(trainer)
        gloo_over_loopback(trainer)
        return trainer

    def before_fit(self) -> None:
        self._before()

    def before_validate(self) -> None:
        self._before()

    def before_test(self) -> None:
        self._before()

    def before_predict(self) -> None:
        self._before()


def _resolve(class_path: str) -> object:
    """The class a ``class_path`` names (``beamvq.backbones.SimVPv2`` and its defining module's
    ``beamvq.backbones.simvp.SimVPv2`` are the same), or the string if it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def model_class_differences(saved: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """Backbone/bottleneck classes of a checkpoint's hyper-parameters that the config changes."""
    out = []
    for part in ("backbone", "bottleneck"):
        old, new = saved.get(part), configured.get(part)
        if part not in saved or not (old is None or isinstance(old, dict)):
            continue  # a checkpoint made in Python holds the module itself: the load checks it
        old_cls = old.get("class_path") if isinstance(old, dict) else None
        new_cls = new.get("class_path") if isinstance(new, dict) else None
        if (old_cls is None) != (new_cls is None) or (
            old_cls is not None and _resolve(old_cls) != _resolve(str(new_cls))
        ):
            out.append(f"model.{part}: checkpoint {old_cls}, configuration {new_cls}")
    return out


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Swap Lightning's default ``TorchCheckpointIO`` for ``AtomicCheckpointIO``.

    Only the exact default class is replaced: one set by the strategy (async, XLA, sharded)
    stays as it is; the CLI does not call this when ``--trainer.plugins`` names a
    ``CheckpointIO``.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# what Lightning's own launcher writes into os.environ of rank 0 (and leaves there after fit),
# and what gloo_over_loopback sets: main() restores them after each run
LAUNCH_ENV = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOO_SOCKET_IFNAME",
)  # fmt: skip


def check_launch_environment(trainer: pl.Trainer) -> None:
    """Stop a multi-process run whose other ranks nobody would start.

    With ``LOCAL_RANK`` in the environment Lightning assumes an external launcher (torchrun, a
    scheduler) starts every rank, and rank 0 waits for the others in ``init_process_group``. Such
    launchers also set ``WORLD_SIZE``; ``LOCAL_RANK`` without it is a leftover (Lightning's own
    launcher sets ``LOCAL_RANK`` in its process and only removes ``WORLD_SIZE`` at teardown), and
    the run would wait for 30 minutes and fail without a word.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy):
        return
    n = trainer.num_nodes * len(strategy.parallel_devices or [])
    if n > 1 and "LOCAL_RANK" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"LOCAL_RANK={os.environ['LOCAL_RANK']} is set in the environment but WORLD_SIZE is "
            f"not: Lightning would take this {n}-process run as started by an external launcher "
            "and wait forever for ranks that nobody starts. Unset LOCAL_RANK (and NODE_RANK, "
            "MASTER_ADDR, MASTER_PORT, left over from an earlier run in this process or shell), "
            "or start the run with torchrun."
        )


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


def gloo_over_loopback(trainer: pl.Trainer) -> None:
    """Single-node multi-process training on CPU (gloo): connect the ranks over the loopback.

    Without ``GLOO_SOCKET_IFNAME``, gloo connects the ranks at the address the host name resolves
    to. In containers and sandboxes that address is often not reachable from the host itself, and
    ``init_process_group`` then waits for its 30-minute timeout without a word. All ranks of a
    one-node run share the host, so the loopback always works. A ``GLOO_SOCKET_IFNAME`` set in the
    environment is kept, and nothing changes for multi-node runs or GPU (NCCL) runs.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ or trainer.num_nodes != 1:
        return
    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy) or len(strategy.parallel_devices or []) < 2:
        return
    if not isinstance(strategy.accelerator, CPUAccelerator):
        return
    name = loopback_interface()
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("single-node CPU run: gloo connects the ranks over %s (GLOO_SOCKET_IFNAME)", name)


def _wandb_mode(logger: WandbLogger) -> str:
    if logger._offline:
        return "offline"
    return str(logger._wandb_init.get("mode") or os.environ.get("WANDB_MODE") or "online")


def start_wandb(trainer: pl.Trainer, init_timeout: float | None = None) -> None:
    """Start every W&B run of ``trainer`` now; an online run that cannot start goes offline.

    ``wandb.init`` gets ``init_timeout`` seconds (default: ``$WANDB_INIT_TIMEOUT`` or 30) unless
    the logger's own ``settings`` say otherwise. Any failure to start online (no API key, an
    unknown entity or project, an unreachable server) is logged as a warning and the logger is
    switched to an offline run in the same ``save_dir``, which ``wandb sync`` can upload later.
    Offline and disabled runs start lazily as usual; ranks other than 0 have no W&B run.
    """
    if rank_zero_only.rank != 0:
        return
    if init_timeout is None:
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_WANDB_INIT_TIMEOUT))
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is not None:
            continue
        if _wandb_mode(logger) in _OFFLINE_MODES:
            continue
        import wandb

        # the CLI may pass settings=None through WandbLogger's **kwargs (wandb.init's signature)
        settings = logger._wandb_init.get("settings")
        if settings is None:
            logger._wandb_init["settings"] = wandb.Settings(init_timeout=init_timeout)
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
            logger._wandb_init["mode"] = "offline"
            logger._experiment = None
            logger.experiment  # noqa: B018


def main(args: list[str] | None = None) -> BeamVQCLI:
    """Run the CLI and return it (``python -m beamvq``, tests, ``beamvq.summary``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning's launcher leaves its rank-0 variables in os.environ; a second run in this
    # process (tests, notebooks, beamvq.summary) must start from the environment it was given
    launch_env = {name: os.environ.get(name) for name in LAUNCH_ENV}
    try:
        cli = BeamVQCLI(
            ForecastModule,
            pl.LightningDataModule,
            subclass_mode_model=False,
            subclass_mode_data=True,
            save_config_callback=LoggedSaveConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
        )
        _finish_loggers(cli.trainer)
    finally:
        for name, value in launch_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return cli


def console_main() -> None:
    """Entry point of the ``beamvq`` console script: returns nothing, so the exit status is 0 on
    success (``sys.exit`` of the CLI object would print it and exit with status 1)."""
    main()


def _finish_loggers(trainer: pl.Trainer) -> None:
    """Close W&B runs so a following command (e.g. predict after fit) starts its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
