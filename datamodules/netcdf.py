"""A forecasting datamodule over xarray-readable NetCDF: one file, a glob or a list of files.

It composes the rooms of ``beamvq.datamodules`` (docs/data.md): ``config`` (the settings, grouped
as they read in YAML; ``settings``: the values read off them), ``conventions`` (names, CF
attributes, packing and time axes of the field's files: ERA5,
https://confluence.ecmwf.int/display/CKB/ERA5; WeatherBench, Rasp et al. 2020, arXiv
2002.00469; WeatherBench 2, Rasp et al. 2024, arXiv 2308.15560), ``scan`` (metadata → one
``Layout``), ``reading`` (streaming into one float32 array ``(sample, time, channel, y, x)``
with per-frame statistics), ``cache`` (the memory map for archives larger than RAM), ``splits``
and ``windows`` (split plan, window starts, the datasets), ``prepared`` (what setup makes of it
all), ``check`` (the data report), ``pool`` (BeamVQ's augmented pool) and ``own_inputs``
(``beamvq predict`` from a file of inputs alone, with the checkpoint's statistics).

Every check on the input runs in ``setup``, before training, and stops with one message naming
the file and the variable, or the YAML key of a bad setting. Files are read in the main process
and closed (or converted once to the cache, which each worker maps lazily), so no NetCDF handle
reaches a DataLoader worker. The datamodule implements ``beamvq.protocols.ForecastData`` and
owns the augmented pool: capped, part of ``state_dict``, concatenated to the training windows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import xarray as xr
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from beamvq.datamodules import cache as cache_mod
from beamvq.datamodules.check import CheckInput, check_report, check_stage_windows
from beamvq.datamodules.config import (
    CacheConfig,
    DimsConfig,
    LoaderConfig,
    PoolConfig,
    PredictConfig,
    QualityConfig,
    SelectionConfig,
    SplitConfig,
    WindowConfig,
)
from beamvq.datamodules.io import DataGenerator
from beamvq.datamodules.own_inputs import check_frames, inputs_hint, inputs_mode, prepare_inputs
from beamvq.datamodules.pool import AugmentedPool
from beamvq.datamodules.prepared import PreparedData, prepare
from beamvq.datamodules.reading import FrameStats, read_into
from beamvq.datamodules.scan import Layout, files_label, resolve_paths, scan_layout
from beamvq.datamodules.settings import SettingsView
from beamvq.datamodules.splits import SplitPlan, successor_index
from beamvq.datamodules.unlabelled import InputSource, draw_inputs, unlabelled_sources
from beamvq.datamodules.windows import collate_windows, pick_windows, window_targets
from beamvq.protocols import DataInfo, Normalization, UnlabelledInputs, WindowInfo, Windows

log = logging.getLogger(__name__)


class NetCDFDataModule(SettingsView, pl.LightningDataModule):
    """Forecasting windows from NetCDF files (ERA5/WeatherBench grids, radar mosaics, simulations).

    The settings come in groups, one YAML mapping each (``beamvq.datamodules.config``; every
    group and field is optional)::

        path: data/era5_*.nc
        variables: [z, t, t2m]
        windows:   {in_steps, out_steps, rollout_steps, stride}          # WindowConfig
        selection: {levels, time_range, time_step, lat_range, lon_range} # SelectionConfig
        splits:    {fractions, train_period, val_period, test_period,
                    seed, predict_split}                                 # SplitConfig
        dims:      {sample, time, y, x, level}                           # DimsConfig
        quality:   {max_nan_fraction, nan_policy}                        # QualityConfig
        cache:     {above_mb, dir, per_node}                             # CacheConfig
        loader:    {batch_size, num_workers}                             # LoaderConfig
        pool:      {capacity, policy, weight, share}                     # PoolConfig
        predict:   {init, times}                                         # PredictConfig
        generator: {class_path: ..., init_args: ...}
        check_only: false

    A group holds what a user sets together (the window's frames; which part of the files; how
    to split; what the files call their dims; how much missing data to accept; where the cache
    lives; the loader; the pool; what predict forecasts from), so a config writes only the
    groups it changes. Read-only properties (``in_steps``, ``out_steps``, ``rollout_steps``,
    ``target_steps``, ``batch_size``, ``predict_split``...;
    ``beamvq.datamodules.settings.SettingsView``) give the module and the callbacks the values
    they read.

    Args:
        path: a NetCDF file, a glob pattern (``data/era5_*.nc``) or a list of files, concatenated
            along time (files may come in any order; they must not overlap in time).
        variables: data variables stacked as channels (in this order).
        windows: the frames of a window.
        selection: levels, time span and step, lat/lon box.
        splits: train/val/test by fractions or periods, the shuffle seed, the predict split.
        dims: dim names in the files (None: detected).
        quality: the NaN threshold and policy.
        cache: the memory-mapped cache for archives larger than RAM.
        loader: DataLoader settings.
        pool: BeamVQ's augmented pool (``beamvq.datamodules.pool.AugmentedPool``).
        predict: what ``beamvq predict`` forecasts from: the windows of a split, or the file's
            inputs alone (``beamvq.datamodules.own_inputs``; never generated by ``generator``).
        generator: a built-in dataset (``beamvq.datamodules.synthetic.NavierStokesGenerator``,
            ``beamvq.datamodules.storm.StormGenerator``, ...) that writes ``path`` when it is missing.
        check_only: the CLI prints ``check()`` and exits before training when True.
    """

    def __init__(
        self,
        path: str | list[str],
        variables: list[str],
        windows: WindowConfig = WindowConfig(),
        selection: SelectionConfig = SelectionConfig(),
        splits: SplitConfig = SplitConfig(),
        dims: DimsConfig = DimsConfig(),
        quality: QualityConfig = QualityConfig(),
        cache: CacheConfig = CacheConfig(),
        loader: LoaderConfig = LoaderConfig(),
        pool: PoolConfig = PoolConfig(),
        predict: PredictConfig = PredictConfig(),
        generator: DataGenerator | None = None,
        check_only: bool = False,
    ) -> None:
        super().__init__()
        if not variables:
            raise ValueError("data.variables: give at least one variable name")
        if len(set(variables)) != len(variables):
            raise ValueError(f"data.variables lists a variable twice: {list(variables)}")
        self.path = str(path) if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
        if generator is not None and not isinstance(self.path, str):
            raise ValueError("data.generator writes one file: give data.path as a single file name")
        self.variables = list(variables)
        self.windows, self.selection, self.splits = windows, selection, splits
        self.dims, self.quality, self.cache, self.loader = dims, quality, cache, loader
        self.pool = AugmentedPool.from_config(pool)
        self.predict_config = predict
        self.generator = generator
        self.check_only = bool(check_only)
        # Lightning reads this attribute: prepare_data (the cache conversion) per node or once
        self.prepare_data_per_node = cache.per_node
        # the dims as given; setup replaces them by the ones found in the files
        self.time_dim, self.y_dim, self.x_dim = dims.time, dims.y, dims.x
        self.level_dim: str | None = dims.level
        self.sample_dim: str | None = dims.sample
        self._layout: Layout | None = None
        self._prepared: PreparedData | None = None
        self._climatology: np.ndarray | None = None
        self._sources: list[InputSource] | None = None
        self._inputs_mode: str | None = None
        self.normalization: Normalization | None = None
        self.latitude: np.ndarray | None = None
        self.coords: dict[str, xr.DataArray] = {}
        self.var_attrs: dict[str, dict] = {}

    @property
    def files(self) -> list[str]:
        return resolve_paths(self.path)

    def _label(self) -> str:
        """The data files, as named in messages."""
        files = self._layout.files if self._layout is not None else None
        names = [f.path for f in files] if files else [str(p) for p in np.atleast_1d(self.path)]
        return files_label(names)

    # -- metadata, reading, the cache -----------------------------------------------------------
    def layout(self) -> Layout:
        """The files' layout after selection (metadata only; cached)."""
        if self._layout is None:
            self._layout = scan_layout(
                self.path, self.variables, self.selection, self.dims, self._label()
            )
        return self._layout

    def read_into(self, out: np.ndarray) -> FrameStats:
        """Read the selection into ``out (S, T, C, H, W)``; per-frame statistics (``reading``)."""
        return read_into(self.layout(), out)

    def _use_cache(self) -> bool:
        size_mb = float(np.prod(self.layout().shape)) * 4 / 2**20
        return size_mb > self.cache.above_mb

    def _ensure_cache(self) -> cache_mod.CacheEntry:
        lay = self.layout()
        return cache_mod.ensure_cache(
            cache_mod.cache_root(self.cache.dir),
            cache_mod.layout_entry_name(lay),
            lay.shape,
            self.read_into,
            description=f"{self._label()}: {[c.name for c in lay.channels]}",
        )

    def _generate_if_missing(self) -> None:
        # the user's own inputs are never generated: a missing one is an error
        if self.predict_config.from_inputs:
            return
        if self.generator is not None and not Path(self.path).exists():
            log.info(
                "%s is missing: generating it with %s", self.path, type(self.generator).__name__
            )
            self.generator.write(self.path)

    def prepare_data(self) -> None:
        """Generate a missing built-in file; convert to the memory-mapped cache once when large
        (rank 0; see ``cache.per_node``)."""
        self._generate_if_missing()
        if self._use_cache():
            self._ensure_cache()

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._prepared is not None:
            return
        # setup without prepare_data (a notebook, a test) still finds a built-in file
        self._generate_if_missing()
        lay = self.layout()
        self.time_dim, self.y_dim, self.x_dim = lay.time_dim, lay.y_dim, lay.x_dim
        self.level_dim = lay.level_dim
        self.sample_dim = lay.sample_dim or self.dims.sample
        self.coords = dict(lay.coords)
        self.var_attrs = dict(lay.var_attrs)
        self.latitude = lay.latitude
        mode = inputs_mode(self.predict_config, stage, len(lay.time), self.windows)
        if mode is not None:
            check_frames(len(lay.time), self.in_steps, self._label())
        if self._use_cache():
            entry = self._ensure_cache()
            data, cache_file, stats = None, entry.data_file, FrameStats(**entry.stats)
        else:
            data, cache_file = np.empty(lay.shape, np.float32), None
            stats = self.read_into(data)
        if mode is not None:
            self._prepared = prepare_inputs(
                lay, data, cache_file, stats, self.windows, self.predict_config, self.quality,
                self.selection.time_step, self._label(), mode,
            )  # fmt: skip
            self._inputs_mode = mode
            return
        args = (self.windows, self.splits, self.quality, self.selection.time_step, self._label())
        with inputs_hint(stage):
            ready = prepare(lay, data, cache_file, stats, *args)
        self._prepared = ready
        self.normalization = ready.normalization
        self.pool.fit_to_training(len(ready.plan.starts["train"]))  # data.pool.share
        warning = check_stage_windows(ready.plan, self.splits, stage, self._label())
        if warning is not None:
            rank_zero_warn(warning)

    def prepared(self) -> PreparedData:
        """The data after setup (runs it first when needed)."""
        if self._prepared is None:
            self.setup()
        assert self._prepared is not None
        return self._prepared

    # -- shapes and labels -------------------------------------------------------------------
    @property
    def plan(self) -> SplitPlan:
        """Samples, window starts and frames of every split (after setup)."""
        return self.prepared().plan

    @property
    def array(self) -> np.ndarray | None:
        """The in-memory array ``(S, T, C, H, W)`` (NaNs filled under ``"fill"``), or None when
        the windows come from the memory-mapped cache (``cache_file``)."""
        return self.prepared().data

    @property
    def cache_file(self) -> Path | None:
        """The memory-mapped ``.npy`` cache the windows come from, or None (in memory)."""
        return self.prepared().cache_file

    @property
    def channel_names(self) -> list[str]:
        """Channel names in order (``z500``... for levels; the variable name otherwise)."""
        return [c.name for c in self.layout().channels]

    @property
    def grid(self) -> tuple[int, int]:
        lay = self.layout()
        return len(lay.y_index), len(lay.x_index)

    @property
    def num_channels(self) -> int:
        return len(self.layout().channels)

    @property
    def time_step(self) -> np.timedelta64 | float:
        """Spacing of consecutive frames of a window (after setup)."""
        return self.prepared().time_step

    def dataset(self, split: str) -> Dataset:
        return self.prepared().dataset(split, self.windows)

    def window_info(self, split: str, indices: np.ndarray) -> WindowInfo:
        """Sample labels and last-input-time labels of windows ``indices`` of ``split``."""
        return self.prepared().window_info(split, indices, self.in_steps)

    @property
    def climatology(self) -> np.ndarray:
        """Per-channel, per-pixel mean ``(C, H, W)`` of the training split (physical units), the
        reference of the anomalies in ACC; computed once, streaming over the frames. Inputs
        alone have no training split: NaN, which the checkpoint's climatology replaces."""
        if self._climatology is None and self.prepared().normalization is None:
            self._climatology = np.full((self.num_channels, *self.grid), np.nan, np.float32)
        if self._climatology is None:
            self._climatology = self.prepared().climatology()
        return self._climatology

    def check(self) -> str:
        """A summary of what training would see: files, dims, channels, statistics, windows."""
        p = self.prepared()
        name = type(self).__name__
        fields = (p.layout, p.stats, p.normalization, p.time_step, self.windows, p.plan, p.where)
        return check_report(CheckInput(name, *fields))

    # -- what callbacks see (beamvq.protocols.ForecastData) --------------------------------
    def info(self) -> DataInfo:
        """Labels of the channels, the time axis and the grid (after setup)."""
        return self.prepared().info(str(self.path), self.windows)

    def state_dict(self) -> dict:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state)

    def training_windows(self, max_windows: int | None = None, seed: Any = 0) -> Windows:
        """Indices and physical ``(x, y)`` of (a random subset of) training windows."""
        return pick_windows(self.dataset("train"), max_windows, seed)

    def training_targets(self, index: Tensor) -> Tensor:
        """The recorded futures ``(N, T_total, C, H, W)`` of training windows ``index``."""
        return window_targets(self.dataset("train"), index)

    def unlabelled_inputs(self, max_inputs: int | None = None, seed: Any = 0) -> UnlabelledInputs:
        """Physical inputs ``(N, in_steps, C, H, W)`` whose future is never read, never from
        validation or test data (``beamvq.datamodules.unlabelled``): the training trajectories'
        tail (``splits.future_free_tail``), the split's unlabelled samples
        (``splits.unlabelled_samples``) and the files of ``splits.unlabelled_path``, in that
        order. A random subset of ``max_inputs`` (``seed``: anything
        ``numpy.random.default_rng`` takes), in list order; an input's id is its position in the
        full list, the same in every epoch. Reference-free scorers search these.
        """
        return draw_inputs(self._unlabelled_sources(), max_inputs, seed)

    def _unlabelled_sources(self) -> list[InputSource]:
        if self._sources is None:
            p = self.prepared()
            unlabelled = self.dataset("unlabelled") if "unlabelled" in p.plan.starts else None
            self._sources = unlabelled_sources(
                self.dataset("train"), unlabelled, p, self.splits, self.selection, self.dims,
                self.variables,
            )  # fmt: skip
        return self._sources

    def successor_windows(self, index: Tensor, shift: int) -> Tensor:
        """For training windows ``index``: the training window of the same sample starting
        ``shift`` frames later, or -1 where there is none (pushforward targets)."""
        starts = self.prepared().starts("train")
        idx = np.asarray(index.cpu(), dtype=np.int64).reshape(-1)
        return torch.from_numpy(successor_index(starts, idx, int(shift)))

    def validation_inputs(self, max_inputs: int | None = None, seed: Any = 0) -> UnlabelledInputs:
        """Inputs of (a random subset of) validation windows, ids their window indices: only for
        the authors' protocol, which leaks validation data into training."""
        picked = pick_windows(self.dataset("val"), max_inputs, seed)
        return UnlabelledInputs(picked.index, picked.x)

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=False,
            drop_last=False,
            collate_fn=collate_windows,
        )

    def train_dataloader(self) -> DataLoader:
        ds: Dataset = self.dataset("train")
        if self.pool.size:
            ds = ConcatDataset([ds, self.pool.dataset()])
        return self._loader(ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.predict_split), shuffle=False)
