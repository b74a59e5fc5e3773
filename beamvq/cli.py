"""The ``beamvq`` command: a LightningCLI over ``ForecastModule`` and the datamodules.

``beamvq fit|validate|test|predict --config configs/quickstart.yaml [--config more.yaml]``.
Backbone, bottleneck, datamodule, logger, callbacks and strategy are chosen by class path in YAML.
This is the only module that wires the model side to data, callbacks and precision plugins.

``trainer.default_root_dir`` is the run directory (``beamvq.run_paths``, docs/configs.md): the
logger's ``save_dir``, the checkpoint folder, the prediction file and the plots follow it unless
given, each subcommand saves its resolved config as ``<root>/config_<subcommand>.yaml``, and a
W&B run is named after the run (``group``) and the subcommand (``job_type``). With a W&B logger, a
``LearningRateMonitor`` logs the learning rate unless the run configures one.

W&B runs offline unless the environment says otherwise (``WANDB_MODE=online`` to upload,
``WANDB_MODE=disabled`` to turn it off); nothing here touches the network by default, and an online
run that cannot start falls back to an offline one (``beamvq.wandb_start``).

``--ckpt_path`` is checked before any work (``beamvq.checkpoint_files``): ``validate``, ``test`` and
``predict`` need one (they would run random weights), ``--weights_only false`` is refused, the file
(``last`` resolved here to the newest ``last*.ckpt`` of the checkpoint folders) must read as data
and hold the configured backbone and bottleneck classes; the configured model arguments are kept
(LightningCLI would replace them by the checkpoint's). The console prints such refusals as one
line (exit status 2). The optimizer is
``model.optimizer`` (``beamvq.optim``); LightningCLI's top-level ``optimizer:`` and
``lr_scheduler:`` keys are off, since they would bypass the Surge rule and parameter groups.

Checkpoints are written atomically (``beamvq.checkpoint_io.AtomicCheckpointIO`` replaces
Lightning's default ``TorchCheckpointIO``; a ``CheckpointIO`` given in ``--trainer.plugins`` or by
the strategy is kept). See docs/reliability.md for what resuming guarantees.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    RichProgressBar,
)
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.utilities import rank_zero_warn

import beamvq.quant  # noqa: F401  (registers the precision strategies by name)
from beamvq.callbacks.last_checkpoint import (
    LastCheckpoint,
    after_model_checkpoints,
    find_last_checkpoint,
    last_checkpoint_dirs,
)
from beamvq.callbacks.model_summary import ParameterSummary
from beamvq.callbacks.prediction_writer import NetCDFPredictionWriter
from beamvq.checkpoint_files import CheckpointRefused, check_ckpt_options, check_ckpt_path
from beamvq.checkpoint_io import AtomicCheckpointIO
from beamvq.checkpointing import checkpoint_wandb_run_id
from beamvq.console import quiet_known_noise, route_logs_through_current_streams
from beamvq.module import ForecastModule
from beamvq.output_checks import check_output_locations, trainer_output_locations
from beamvq.packaged_configs import resolve_config_arguments
from beamvq.run_paths import LoggedSaveConfig, derive_run_settings
from beamvq.wandb_start import continue_wandb_run, finish_wandb, record_fit_run, start_wandb

log = logging.getLogger("beamvq")

# what model.optimizer is when a configuration does not name one: the module's own default
# (AdamW at lr 1e-3 without weight decay), written out so that --print_config shows it and
# --model.optimizer.lr alone works
DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 1e-3, "weight_decay": 0.0},
}


class BeamVQCLI(LightningCLI):
    """LightningCLI with early checks that name the offending argument."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model.optimizer": DEFAULT_OPTIMIZER})

    def before_instantiate_classes(self) -> None:
        """One run directory (``beamvq.run_paths``): the unset output paths and W&B names follow
        ``trainer.default_root_dir``; the saved config keeps them as given, so that a refit
        from it with another root moves them again."""
        sub = self.config.get("subcommand")
        section = self.config[sub] if sub else self.config
        self._config_as_given = section.clone()
        derive_run_settings(section["trainer"], str(sub or "fit"))

    def _check_data_only(self) -> None:
        """``--data.init_args.check_only true``: summarize the data and exit before any training."""
        dm = self.datamodule
        if getattr(dm, "check_only", False):
            dm.prepare_data()
            dm.setup("fit")
            sys.stdout.write(dm.check() + "\n")
            sys.exit(0)

    def _check_outputs(self) -> None:
        """Every folder this subcommand writes to is writable and has room, before any work."""
        trainer = self.trainer
        files = [
            cb.output_path(trainer)
            for cb in trainer.callbacks
            if isinstance(cb, NetCDFPredictionWriter)
        ]
        stage = str(self.subcommand)
        dirs = last_checkpoint_dirs(trainer)
        check_output_locations(trainer_output_locations(trainer, stage, dirs, files))

    # LightningCLI has no public switch for this: its _parse_ckpt_path replaces the configured
    # model arguments by the checkpoint's hyper-parameters (for a file path, not for ``last``), so
    # that predict-time options such as --model.ensemble.members were silently ignored and a
    # config naming another backbone silently predicted with the checkpoint's. The override keeps
    # the configuration as given and checks the checkpoint against it instead.
    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        section = self.config[sub]
        check_ckpt_options(sub, section.get("ckpt_path"), section.get("weights_only"))
        self._remember_run(check_ckpt_path(section.get("ckpt_path"), self._configured_model()))

    def _remember_run(self, saved: Any) -> None:
        """The W&B run a resumed fit continues: the one that wrote its checkpoint."""
        self._resumed_run_id = checkpoint_wandb_run_id(saved) if saved else None

    def _configured_model(self) -> dict[str, Any]:
        model = self.config[self.config["subcommand"]].get("model")
        return model.as_dict() if hasattr(model, "as_dict") else dict(model or {})

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: the newest ``last*.ckpt`` of the checkpoint folders, checked like
        an explicit path; none is a new fit for ``fit`` and a refusal for the others. Every
        checkpoint then loads with ``weights_only=True`` (the default of torch >= 2.6 only)."""
        sub = str(self.subcommand)
        section = self.config_init[sub]
        if "weights_only" in section:
            section["weights_only"] = True
        if section.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is None:
            where = ", ".join(last_checkpoint_dirs(self.trainer)) or "(no checkpoint callback)"
            if sub != "fit":
                raise CheckpointRefused(
                    f"beamvq {sub} --ckpt_path last: no checkpoint last*.ckpt in {where}: it "
                    "would run a randomly initialised model. Train first (beamvq fit with this "
                    "configuration) or give --ckpt_path PATH."
                )
            log.warning("--ckpt_path last: no last*.ckpt in %s: a new fit starts", where)
            section["ckpt_path"] = None
            return
        self._remember_run(check_ckpt_path(found, self._configured_model()))
        log.info("--ckpt_path last: %s", found)
        section["ckpt_path"] = found

    def _trainer_config(self, key: str) -> Any:
        """``key`` of the instantiated ``trainer`` section (top level when ``run=False``)."""
        config = self.config_init.get(str(self.subcommand), self.config_init)
        return (config.get("trainer") or {}).get(key)

    def _before(self) -> None:
        self._resolve_last()
        self._check_data_only()
        self._check_outputs()
        run_id = getattr(self, "_resumed_run_id", None)
        if self.subcommand == "fit":
            continue_wandb_run(self.trainer, run_id)
        else:
            record_fit_run(self.trainer, run_id)
        start_wandb(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        def setting(key: str) -> Any:
            return kwargs[key] if key in kwargs else self._trainer_config(key)

        # a rich progress bar by default, unless the run turns the bar off or names its own
        given = setting("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if setting("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            kwargs["callbacks"] = given = [*given, RichProgressBar()]
        # the summary without Lightning's FLOPs column (always 0 here: callbacks/model_summary.py)
        if setting("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in given
        ):
            kwargs["callbacks"] = [*given, ParameterSummary()]
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.callbacks:  # the config as given, not with the derived paths
            if isinstance(cb, SaveConfigCallback) and hasattr(self, "_config_as_given"):
                cb.config = self._config_as_given
        # the learning rate beside the losses in W&B, unless the run names its own monitor (not
        # for other loggers: its rows have no epoch, which CSV readers such as the benchmarks' need)
        wandb = any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        if wandb and not any(isinstance(c, LearningRateMonitor) for c in given):
            trainer.callbacks = [LearningRateMonitor(), *trainer.callbacks]
        # LastCheckpoint after every ModelCheckpoint: trainer.checkpoint_callback (the first)
        # stays the ModelCheckpoint that ckpt_path "best" reads
        trainer.callbacks = after_model_checkpoints(trainer.callbacks)
        plugins = setting("plugins")
        chosen = plugins if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in chosen):
            use_atomic_checkpoints(trainer)
        check_launch_environment(trainer)
        gloo_over_loopback(trainer)
        return trainer

    def before_fit(self) -> None:
        warn_if_last_follows_the_monitor(self.trainer)
        self._before()

    def before_validate(self) -> None:
        self._before()

    def before_test(self) -> None:
        self._before()

    def before_predict(self) -> None:
        self._before()


def warn_if_last_follows_the_monitor(trainer: pl.Trainer) -> None:
    """One warning when ``last.ckpt`` would be rewritten only in epochs that improve a monitor:
    ``ModelCheckpoint(monitor=..., save_last=True)`` without a ``LastCheckpoint``."""
    if any(isinstance(cb, LastCheckpoint) for cb in trainer.callbacks):
        return
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.monitor:
            rank_zero_warn(
                f"ModelCheckpoint(monitor={cb.monitor}, save_last={cb.save_last}) rewrites "
                f"last.ckpt only in epochs that improve {cb.monitor}: add "
                "'- class_path: beamvq.callbacks.last_checkpoint.LastCheckpoint' to "
                "trainer.callbacks and set save_last: false to keep every epoch's end"
            )
            return


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


def main(args: list[str] | None = None) -> BeamVQCLI:
    """Run the CLI and return it (``python -m beamvq``, tests, ``beamvq.summary``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    route_logs_through_current_streams()  # log lines above the progress bar, not erased by it
    quiet_known_noise()
    # Lightning's launcher leaves its rank-0 variables in os.environ; a second run in this
    # process (tests, notebooks, beamvq.summary) must start from the environment it was given
    launch_env = {name: os.environ.get(name) for name in LAUNCH_ENV}
    if isinstance(args, list):
        args = resolve_config_arguments(args)
    try:
        cli = BeamVQCLI(
            ForecastModule,
            pl.LightningDataModule,
            subclass_mode_model=False,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=LoggedSaveConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
        )
        finish_wandb(cli.trainer)
    finally:
        for name, value in launch_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return cli
