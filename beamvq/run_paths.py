"""One run directory: where a run's logger, checkpoints, predictions, plots and configs go.

``trainer.default_root_dir`` is the run directory (Lightning's own setting; the working directory
when unset) and the one setting that moves a run: the CLI (``beamvq.cli``) fills in, before
anything is instantiated, the places a configuration leaves unset (docs/configs.md):

- each logger's ``save_dir`` when it is left out or ``.`` (``WandbLogger``'s default): the run
  directory, so W&B writes ``<root>/wandb/``;
- each ``ModelCheckpoint``'s ``dirpath`` when unset: ``<root>/checkpoints`` (Lightning's rule
  would put it under the logger's ``<save_dir>/<name>/<version>/``); ``LastCheckpoint`` follows it;
- ``BeamSearchAugmentation``'s ``pool_output`` when it is a bare file name: inside the run
  directory (the prediction writer applies the same rule to its ``output`` itself);
- a ``WandbLogger``'s ``group`` (the run's name, the root's folder name), ``job_type`` (the
  subcommand) and ``name`` (the run's name; ``<run>-<subcommand>`` for validate, test and
  predict), so a test run is found beside the fit run of its checkpoint.

An explicitly given path or name is kept as given (relative paths to the working directory).
The plots go to ``<root>/plots`` (the plot callbacks' own default) and each subcommand saves its
resolved configuration as ``<root>/config_<subcommand>.yaml`` (``LoggedSaveConfig``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from fsspec.core import url_to_fs
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

__all__ = [
    "CHECKPOINTS",
    "LoggedSaveConfig",
    "checkpoint_dir",
    "config_filename",
    "derive_run_settings",
    "file_in_run",
    "logger_save_dir",
    "run_name",
    "run_root",
    "wandb_run_names",
]

CHECKPOINTS = "checkpoints"


def run_root(default_root_dir: str | os.PathLike | None) -> str:
    """The run directory: ``trainer.default_root_dir``, or the working directory when unset
    (Lightning's default)."""
    return os.fspath(default_root_dir) if default_root_dir else os.getcwd()


def run_name(root: str | os.PathLike) -> str:
    """The run's name: the run directory's folder name (``runs/quickstart`` -> ``quickstart``)."""
    name = Path(os.path.abspath(os.path.expanduser(os.fspath(root)))).name
    return name or "run"


def logger_save_dir(root: str, given: Any, class_default: Any = None) -> Any:
    """A logger's ``save_dir``: ``root`` when ``given`` is unset, ``.`` or the logger class's
    own default; else ``given``."""
    if given is None or given == class_default or os.path.normpath(str(given)) == ".":
        return root
    return given


def checkpoint_dir(root: str, given: str | None) -> str:
    """A ``ModelCheckpoint``'s ``dirpath``: ``<root>/checkpoints`` when unset, else ``given``."""
    return given if given else os.path.join(root, CHECKPOINTS)


def file_in_run(root: str, given: str | None) -> str | None:
    """An output file of a beamvq callback: a bare file name goes into the run directory; a
    path with a folder (``./x.nc`` included), an absolute path, a URL or ``None`` is kept."""
    if not given or os.path.dirname(given) or "://" in given:
        return given
    return os.path.join(root, given)


def config_filename(subcommand: str) -> str:
    """The file each subcommand saves its resolved configuration to, in the run directory."""
    return f"config_{subcommand}.yaml"


def wandb_run_names(root: str, subcommand: str) -> dict[str, str]:
    """The W&B ``group``, ``job_type`` and ``name`` of ``subcommand``'s run in ``root``."""
    run = run_name(root)
    name = run if subcommand == "fit" else f"{run}-{subcommand}"
    return {"group": run, "job_type": subcommand, "name": name}


def _class(class_path: Any) -> type | None:
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _entries(value: Any) -> list[Any]:
    """The ``class_path``/``init_args`` entries of a ``trainer.logger`` or ``callbacks`` value."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if hasattr(v, "get") and v.get("class_path")]


def _init_default(cls: type, name: str) -> Any:
    param = inspect.signature(cls.__init__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def derive_run_settings(trainer: Any, subcommand: str) -> str:
    """Fill in, in the parsed ``trainer`` section (a jsonargparse ``Namespace``), the paths and
    W&B names left unset (module docstring); returns the run directory."""
    root = run_root(trainer.get("default_root_dir"))
    for entry in _entries(trainer.get("logger")):
        cls, args = _class(entry["class_path"]), entry.get("init_args")
        if cls is None or args is None:
            continue
        if "save_dir" in args:
            default = _init_default(cls, "save_dir")
            args["save_dir"] = logger_save_dir(root, args["save_dir"], default)
        if issubclass(cls, WandbLogger):
            for key, value in wandb_run_names(root, subcommand).items():
                if args.get(key) is None:
                    args[key] = value
    for entry in _entries(trainer.get("callbacks")):
        cls, args = _class(entry["class_path"]), entry.get("init_args")
        if cls is None or args is None:
            continue
        if issubclass(cls, ModelCheckpoint):
            args["dirpath"] = checkpoint_dir(root, args.get("dirpath"))
        elif "pool_output" in args:  # BeamSearchAugmentation's pool file (None: off)
            args["pool_output"] = file_in_run(root, args["pool_output"])
    return root


class LoggedSaveConfig(SaveConfigCallback):
    """Save each subcommand's resolved config as ``<default_root_dir>/config_<subcommand>.yaml``
    (always in the run directory, whatever the logger's ``log_dir``; a resumed fit replaces its
    own file) and record it in the experiment logger. The CLI hands it the config as given,
    before ``derive_run_settings``, so a refit from the file derives the paths again."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = str(trainer.default_root_dir)
            fs, folder = url_to_fs(root)
            fs.makedirs(folder, exist_ok=True)
            path = os.path.join(root, config_filename(str(getattr(stage, "value", stage))))
            save = {"skip_none": False, "overwrite": self.overwrite, "multifile": self.multifile}
            self.parser.save(self.config, path, **save)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})
