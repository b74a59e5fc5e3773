"""The ``beamvq`` command: a LightningCLI over ``ForecastModule`` and the datamodules.

``beamvq fit|validate|test|predict --config configs/quickstart.yaml [--config more.yaml]``.
Backbone, bottleneck, datamodule, logger, callbacks and strategy are chosen by class path in YAML.
This is the only module that wires the model side to data, callbacks and precision plugins.

W&B runs offline unless the environment says otherwise (``WANDB_MODE=online`` to upload,
``WANDB_MODE=disabled`` to turn it off); nothing here touches the network by default.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

import beamvq.quant  # noqa: F401  (registers the precision strategies by name)
from beamvq.module import ForecastModule

log = logging.getLogger("beamvq")

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


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

    def _before(self) -> None:
        self._check_ckpt()
        self._check_data_only()

    def before_fit(self) -> None:
        self._before()

    def before_validate(self) -> None:
        self._before()

    def before_test(self) -> None:
        self._before()

    def before_predict(self) -> None:
        self._before()


def main(args: list[str] | None = None) -> BeamVQCLI:
    """Entry point of the ``beamvq`` console script and ``python -m beamvq``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli = BeamVQCLI(
        ForecastModule,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        save_config_callback=LoggedSaveConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args if args is not None else sys.argv[1:],
    )
    _finish_loggers(cli.trainer)
    return cli


def _finish_loggers(trainer: pl.Trainer) -> None:
    """Close W&B runs so a following command (e.g. predict after fit) starts its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
