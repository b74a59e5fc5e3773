"""Forecasts from Python: load a checkpoint, forecast an ``xarray.Dataset``, get one back.

The notebook user's path (docs/own_inputs.md)::

    import beamvq

    model = beamvq.load_forecaster("runs/quickstart/checkpoints/last.ckpt")  # on the CPU
    out = model.forecast(ds_in)                # from each sample's last T_in frames
    out = model.forecast(ds_in, members=4)     # + members, their mean and spread (VQ models)
    out = model.forecast(ds_in, init="every")  # every input; or init=["2000-01-03T06:00", ...]

``out`` is laid out like the ``predictions.nc`` of ``beamvq predict`` (built by the same
``beamvq.callbacks.prediction_file.prediction_dataset``): one variable per channel with dims
``(sample, lead_time, [level,] y, x)`` in physical units (docs/outputs.md), ``init_time`` and ``valid_time`` coordinates,
and with ``members`` the ``<var>_members``, ``<var>_ens_mean`` and ``<var>_ens_spread``.

The checkpoint is read as data only (``beamvq.checkpoint_files.read_checkpoint``:
``weights_only=True``); the module is rebuilt from its recorded configuration, importing class
paths under ``beamvq`` (or a package passed as ``trusted``) only, and its weights, code bank and
normalization statistics are loaded with the checks of ``beamvq predict``
(``ForecastModule.on_load_checkpoint``). The input goes through the datamodule's reading
(``beamvq.datamodules.netcdf.NetCDFDataModule`` with ``data.predict``, the own-inputs mode of
``beamvq.datamodules.own_inputs``), so the API and the CLI read, check and forecast a dataset
the same way: the statistics are the checkpoint's, never the input's; variables, their order and
the grid are checked against the checkpoint's. A dataset (rather than a file) is written once to
a temporary NetCDF file that the reading opens, and messages name it ``ds_in``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from beamvq.callbacks.prediction_file import prediction_dataset
from beamvq.checkpoint_files import IMPORTABLE, CheckpointRefused, read_checkpoint
from beamvq.checkpointing import check_data, data_identity
from beamvq.datamodules.config import (
    CacheConfig,
    DimsConfig,
    LoaderConfig,
    PredictConfig,
    SelectionConfig,
    WindowConfig,
)
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.module import ForecastModule

__all__ = ["Forecaster", "load_forecaster"]

# what messages call an in-memory dataset (its temporary file is named after it)
DATASET_LABEL = "ds_in"


def _class_paths(tree: Any) -> list[str]:
    """Every ``class_path`` value in a configuration tree."""
    if isinstance(tree, Mapping):
        found = [str(tree["class_path"])] if "class_path" in tree else []
        return found + [p for v in tree.values() for p in _class_paths(v)]
    if isinstance(tree, (list, tuple)):
        return [p for v in tree for p in _class_paths(v)]
    return []


def build_module(hparams: Mapping[str, Any], label: str, trusted: Sequence[str]) -> ForecastModule:
    """The ``ForecastModule`` of a checkpoint's recorded configuration, for inference: no
    optimizer, no ``init_from``; class paths outside ``beamvq`` and ``trusted`` are refused."""
    from jsonargparse import ArgumentParser

    section = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    if not isinstance(section.get("backbone"), Mapping):
        raise CheckpointRefused(
            f"{label}: the checkpoint records no model configuration (hyper_parameters.backbone "
            "as class_path + init_args, what beamvq fit writes)"
        )
    section.update(optimizer=None, init_from=None)  # inference needs neither
    outside = [p for p in _class_paths(section) if p.split(".")[0] not in (*IMPORTABLE, *trusted)]
    if outside:
        raise CheckpointRefused(
            f"{label}: the checkpoint names classes outside beamvq: {outside}; importing them "
            "would run their code. Pass trusted=('<package>',) for a package you trust."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ForecastModule, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": section})
    with warnings.catch_warnings():
        # save_hyperparameters() sees the backbone object here (LightningCLI hands it the
        # configuration); the checkpoint's configuration is what the module is built from
        warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
        return parser.instantiate_classes(cfg).model


def load_forecaster(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", trusted: Sequence[str] = ()
) -> Forecaster:
    """The trained model of the checkpoint at ``path`` (``beamvq fit``'s ``last.ckpt``...),
    in eval mode on ``device`` (the CPU by default), ready to ``forecast`` datasets.

    ``trusted``: top-level packages besides ``beamvq`` whose classes the checkpoint may name
    (a backbone of your own); a checkpoint is data, and importing a module runs its code.
    """
    label = f"load_forecaster {path}"
    checkpoint = dict(read_checkpoint(str(path), option="load_forecaster"))
    module = build_module(checkpoint.get("hyper_parameters") or {}, label, trusted)
    # what Lightning does when predict restores --ckpt_path: the identity and weight checks,
    # legacy buffer names, the lat-lon buffers sized like the checkpoint's; then the weights
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    if not module.normalizer.is_set:
        raise CheckpointRefused(
            f"{label}: the checkpoint holds no normalization statistics (normalizer.ready is "
            "false): it was saved before any training data were seen"
        )
    saved = (checkpoint.get("beamvq") or {}).get("data")
    return Forecaster(module.eval().to(device), str(path), saved)


class Forecaster:
    """A trained ``ForecastModule`` (eval mode) that forecasts ``xarray`` datasets or files.

    Use ``load_forecaster``. ``channels`` are the checkpoint's channel names (``None`` for
    imported weights, which record no data), ``in_steps`` the input frames ``T_in`` a forecast
    starts from and ``lead_steps`` the frames it gives (``rollout_steps × T_out``).
    """

    def __init__(
        self, module: ForecastModule, checkpoint: str, data: Mapping[str, Any] | None
    ) -> None:
        self.module = module
        self.checkpoint = checkpoint
        self.data = dict(data or {})

    @property
    def channels(self) -> list[str] | None:
        names = self.data.get("variables")
        return None if names is None else list(names)

    @property
    def in_steps(self) -> int:
        return int(self.module.model.backbone.in_steps)

    @property
    def lead_steps(self) -> int:
        return int(self.module.rollout_steps * self.module.model.backbone.out_steps)

    @property
    def device(self) -> torch.device:
        return self.module.normalizer.mean.device

    def forecast(
        self,
        ds: xr.Dataset | str | os.PathLike,
        *,
        members: int | None = None,
        init: str | Sequence[Any] = "last",
        variables: Sequence[str] | None = None,
        levels: Sequence[float] | None = None,
        dims: Mapping[str, str] | None = None,
        batch_size: int = 8,
    ) -> xr.Dataset:
        """Forecast ``ds`` (a dataset, or a NetCDF file, glob or list of files).

        Args:
            ds: ``(time, y, x)`` fields, optionally with a sample dim (``trajectory`` unless
                ``dims`` says otherwise) and levels, holding the checkpoint's variables on its
                grid, with at least ``in_steps`` frames one time step apart.
            members: ensemble members to add (``None``: the deterministic forecast only): that
                many rank-aligned code-bank rollouts (member i takes its i-th nearest code at
                every step; needs the VQ bottleneck).
            init: ``"last"`` (each sample's latest ``in_steps`` consecutive frames),
                ``"every"`` (every such input) or init times (the time of an input's last
                frame: ISO dates for a dated time axis, numbers otherwise).
            variables: the data variables stacked as channels (default: the checkpoint's
                channel names; a variable with levels, ``z500`` ..., needs its name here and
                ``levels``).
            levels: the level labels of variables with a level dim.
            dims: dim names when the conventions do not find them (``{"time": "t", "sample":
                "member"}``: the keys of ``data.dims``).
            batch_size: inputs per forward pass.
        """
        m = self._members(members)
        config = self._init(init)
        names = self._variables(variables)
        with tempfile.TemporaryDirectory(prefix="beamvq-forecast-") as tmp:
            path, label = self._source(ds, Path(tmp))
            dm = NetCDFDataModule(
                path, names, windows=self._windows(), selection=SelectionConfig(levels=levels),
                dims=DimsConfig(**dict(dims or {})), cache=CacheConfig(above_mb=float("inf")),
                loader=LoaderConfig(batch_size=batch_size), predict=config,
            )  # fmt: skip
            try:
                dm.setup("predict")  # reads every input into memory: the file may go
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(str(err).replace(str(path), label)) from None
        self._check(dm, label)
        return self._run(dm, m, label)

    # -- the parts of forecast ---------------------------------------------------------------
    def _members(self, members: int | None) -> int:
        if members is None:
            return 0
        m = int(members)
        size = self.module.codebook_size
        if m < 2:
            raise ValueError(f"members={members}: give 2 or more (None: no members)")
        if size == 0:
            raise ValueError(
                f"members={members}: the model of {self.checkpoint} has no VQ bottleneck, "
                "whose code bank gives the members"
            )
        if m > size:
            raise ValueError(f"members={members}: the code bank holds {size} codes")
        return m

    @staticmethod
    def _init(init: str | Sequence[Any]) -> PredictConfig:
        if isinstance(init, str):
            if init not in ("last", "every"):
                raise ValueError(f"init={init!r}: give 'last', 'every' or a list of init times")
            return PredictConfig(init=init)
        times = [str(np.datetime64(t, "ns")) if _is_date(t) else str(t) for t in init]
        return PredictConfig(init="times", times=times)

    def _variables(self, variables: Sequence[str] | None) -> list[str]:
        if variables is not None:
            return [str(v) for v in variables]
        if self.channels is None:
            raise ValueError(
                f"{self.checkpoint} records no data variables (imported weights): give "
                "variables=[...] in the order of the model's channels"
            )
        return self.channels

    def _windows(self) -> WindowConfig:
        bb = self.module.model.backbone
        return WindowConfig(
            in_steps=bb.in_steps, out_steps=bb.out_steps, rollout_steps=self.module.rollout_steps
        )

    @staticmethod
    def _source(ds: xr.Dataset | str | os.PathLike, tmp: Path) -> tuple[Any, str]:
        """The file(s) the datamodule reads, and how messages name them."""
        if not isinstance(ds, xr.Dataset):
            given = ds if isinstance(ds, (list, tuple)) else str(ds)
            return given, str(given)
        path = tmp / f"{DATASET_LABEL}.nc"
        try:
            ds.to_netcdf(path)
        except Exception as err:  # attributes or types NetCDF cannot hold
            raise ValueError(
                f"{DATASET_LABEL}: cannot be read as NetCDF ({type(err).__name__}: {err}); "
                "drop the attributes or variables it names"
            ) from err
        return str(path), DATASET_LABEL

    def _check(self, dm: NetCDFDataModule, label: str) -> None:
        """Variables, their order and the grid against the checkpoint's; the model's shapes."""
        mine = data_identity(dm)
        problems = [
            f"{what}: checkpoint {self.data[key]}, {label} {mine[key]}"
            for key, what in (("variables", "variables (channel order)"), ("grid", "grid (y, x)"))
            if key in self.data and self.data[key] != mine.get(key)
        ]
        if problems:
            raise ValueError(
                f"{label} does not fit the model of {self.checkpoint}:\n  - "
                + "\n  - ".join(problems)
            )
        check_data(self.module.model, self.module.rollout_steps, dm)

    def _run(self, dm: NetCDFDataModule, members: int, label: str) -> xr.Dataset:
        module, device = self.module, self.device
        forecasts, fields, index = [], [], []
        with torch.inference_mode():
            for batch in dm.predict_dataloader():
                x = batch.x.to(device)
                # ForecastModule.predict_step's forecast: normalize, roll out, denormalize
                forecasts.append(module(x).float().cpu())
                if members:
                    fields.append(module.ensemble_members(x, members).fields.float().cpu())
                index.append(batch.index)
        idx = torch.cat(index).numpy()
        return prediction_dataset(
            dm.info()._replace(path=label),
            dm.window_info(dm.predict_split, idx),
            torch.cat(forecasts).numpy(),
            members=torch.cat(fields).numpy() if members else None,
            ckpt=self.checkpoint,
            command=f"beamvq.load_forecaster({self.checkpoint!r}).forecast({label})",
        )


def _is_date(value: Any) -> bool:
    """A date object (``datetime``, ``numpy.datetime64``, ``pandas.Timestamp``), not a string."""
    return isinstance(value, np.datetime64) or hasattr(value, "isoformat")
