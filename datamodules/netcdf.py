"""A forecasting datamodule over xarray-readable NetCDF.

Data stay labelled (xarray) until one conversion to a float32 array with the fixed dim order
``(sample, time, channel, y, x)``; windows are cut by position along ``time`` inside one sample
(trajectory), so they never mix samples. Splits are by trajectory (never overlapping); when the
file has no trajectory dim the single series is split into contiguous time blocks. Normalization
statistics come from the training split only.

The file is opened once in ``setup`` (main process), read fully into memory and closed: no NetCDF
handle survives into DataLoader worker processes, and no item opens a file.

The datamodule also owns BeamVQ's augmented pool of (input, pseudo-target) pairs: capped, part of
``state_dict`` (so checkpoints restore it), concatenated to the training windows each epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import xarray as xr
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class Sample(NamedTuple):
    """One window: physical input ``x (T_in, C, H, W)``, target ``y (T_total, C, H, W)``,
    loss ``weight`` (1 for real windows, the pool weight for pseudo-targets) and ``index`` of the
    window in its split (-1 for pool samples)."""

    x: Tensor
    y: Tensor
    weight: Tensor
    index: Tensor


class Normalization(NamedTuple):
    """Per-channel mean and standard deviation of the training split, shape ``(C,)``."""

    mean: np.ndarray
    std: np.ndarray


class WindowInfo(NamedTuple):
    """Labels of windows: the sample (trajectory) label and the last input time label."""

    sample: np.ndarray
    init_time: np.ndarray


class WindowDataset(Dataset):
    """Windows over an in-memory array ``(S, T, C, H, W)``; ``starts`` holds ``(sample, t0)``."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, in_steps: int, target_steps: int) -> None:
        self.data = data
        self.starts = starts
        self.in_steps = in_steps
        self.target_steps = target_steps

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Sample:
        s, t0 = self.starts[i]
        x = self.data[s, t0 : t0 + self.in_steps]
        y = self.data[s, t0 + self.in_steps : t0 + self.in_steps + self.target_steps]
        return Sample(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(1.0), torch.tensor(i))


class PoolDataset(Dataset):
    """The augmented pool as a dataset of pseudo-labelled samples (index -1)."""

    def __init__(self, x: Tensor, y: Tensor, weight: float) -> None:
        self.x, self.y, self.weight = x, y, weight

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.x[i], self.y[i], torch.tensor(self.weight), torch.tensor(-1))


class NetCDFDataModule(pl.LightningDataModule):
    """Forecasting windows from one NetCDF file.

    Args:
        path: NetCDF file.
        variables: data variables stacked as channels (in this order).
        in_steps: input frames ``T_in``.
        out_steps: frames per forecast step ``T_out``.
        rollout_steps: autoregressive steps per window; the target holds ``rollout_steps × T_out``.
        stride: time steps between consecutive window starts.
        split_fractions: fractions of samples (trajectories) for train/val/test.
        sample_dim: the trajectory/ensemble dim; absent in the file means one series.
        time_dim, y_dim, x_dim: dim names in the file.
        batch_size, num_workers: DataLoader settings.
        predict_split: the split whose windows ``predict`` forecasts.
        pool_capacity: most pseudo-labelled samples kept in the augmented pool.
        pool_policy: which to drop when full: ``"oldest"`` or ``"worst"`` (lowest score).
        pool_weight: loss weight of pool samples relative to real ones.
        seed: seed of the trajectory shuffle before splitting.
    """

    def __init__(
        self,
        path: str,
        variables: list[str],
        in_steps: int = 5,
        out_steps: int = 5,
        rollout_steps: int = 1,
        stride: int = 1,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        sample_dim: str = "trajectory",
        time_dim: str = "time",
        y_dim: str = "y",
        x_dim: str = "x",
        batch_size: int = 8,
        num_workers: int = 0,
        predict_split: str = "test",
        pool_capacity: int = 256,
        pool_policy: str = "worst",
        pool_weight: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not variables:
            raise ValueError("data.variables: give at least one variable name")
        for name, value in (("in_steps", in_steps), ("out_steps", out_steps),
                            ("rollout_steps", rollout_steps), ("stride", stride),
                            ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
            raise ValueError(f"data.split_fractions must be three non-negative numbers, got {split_fractions}")
        if predict_split not in SPLITS:
            raise ValueError(f"data.predict_split must be one of {SPLITS}, got {predict_split!r}")
        if pool_policy not in ("oldest", "worst"):
            raise ValueError(f"data.pool_policy must be 'oldest' or 'worst', got {pool_policy!r}")
        self.path = str(path)
        self.variables = list(variables)
        self.in_steps, self.out_steps, self.rollout_steps = int(in_steps), int(out_steps), int(rollout_steps)
        self.stride = int(stride)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.sample_dim, self.time_dim, self.y_dim, self.x_dim = sample_dim, time_dim, y_dim, x_dim
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.predict_split = predict_split
        self.pool_capacity, self.pool_policy, self.pool_weight = int(pool_capacity), pool_policy, float(pool_weight)
        self.seed = int(seed)
        self._data: np.ndarray | None = None
        self._samples: dict[str, np.ndarray] = {}
        self._starts: dict[str, np.ndarray] = {}
        self.normalization: Normalization | None = None
        self.coords: dict[str, xr.DataArray] = {}
        self.var_attrs: dict[str, dict] = {}
        self.pool_x = torch.empty(0)
        self.pool_y = torch.empty(0)
        self.pool_score = torch.empty(0)
        self.pool_age = torch.empty(0, dtype=torch.long)
        self._pool_counter = 0

    # -- sizes -------------------------------------------------------------------------------
    @property
    def target_steps(self) -> int:
        return self.out_steps * self.rollout_steps

    @property
    def window(self) -> int:
        return self.in_steps + self.target_steps

    # -- loading -----------------------------------------------------------------------------
    def _open(self) -> xr.Dataset:
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path: NetCDF file not found: {path}")
        try:
            return xr.open_dataset(path)
        except Exception as err:  # netCDF4/HDF5 raise several types for unreadable files
            raise ValueError(f"data.path: cannot read {path} as NetCDF: {err}") from err

    def _to_array(self, ds: xr.Dataset) -> np.ndarray:
        """Validate ``ds`` and convert it to float32 ``(S, T, C, H, W)``."""
        missing = [v for v in self.variables if v not in ds.data_vars]
        if missing:
            raise ValueError(
                f"{self.path}: variable(s) {missing} not in file; it has {sorted(ds.data_vars)}"
            )
        arrays = []
        for name in self.variables:
            var = ds[name]
            wanted = [self.time_dim, self.y_dim, self.x_dim]
            if self.sample_dim in var.dims:
                wanted = [self.sample_dim, *wanted]
            if set(var.dims) != set(wanted):
                raise ValueError(
                    f"{self.path}: variable {name!r} has dims {var.dims}; expected "
                    f"{tuple(wanted)} (set data.time_dim / y_dim / x_dim / sample_dim)"
                )
            var = var.transpose(*wanted)
            if self.sample_dim not in var.dims:
                var = var.expand_dims(self.sample_dim)
            values = var.values.astype(np.float32)
            nan = ~np.isfinite(values)
            if nan.any():
                raise ValueError(
                    f"{self.path}: variable {name!r} has {int(nan.sum())} NaN/Inf values "
                    f"({100 * nan.mean():.3g}% of it); clean the file before training"
                )
            arrays.append(values)
            self.var_attrs[name] = dict(var.attrs)
        time = ds[self.time_dim]
        if time.size > 1 and not bool((time.diff(self.time_dim) > 0).all()):
            raise ValueError(f"{self.path}: coordinate {self.time_dim!r} is not strictly increasing")
        self.coords = {
            dim: ds[dim].copy() for dim in (self.time_dim, self.y_dim, self.x_dim) if dim in ds.coords
        }
        if self.sample_dim in ds.dims:
            self.coords[self.sample_dim] = ds[self.sample_dim].copy()
        return np.ascontiguousarray(np.stack(arrays, axis=2))

    def _split_samples(self, n_samples: int, n_time: int) -> None:
        """Assign trajectories to splits (or contiguous time blocks for a single series)."""
        fr = np.asarray(self.split_fractions) / sum(self.split_fractions)
        if n_samples > 1:
            order = np.random.default_rng(self.seed).permutation(n_samples)
            # at least one trajectory in every split that asks for some
            counts = np.where(fr > 0, np.maximum(1, np.round(fr * n_samples)), 0).astype(int)
            counts[0] = n_samples - counts[1:].sum()
            if counts[0] < 1:
                raise ValueError(
                    f"{self.path}: {n_samples} samples along {self.sample_dim!r} are too few for "
                    f"data.split_fractions={self.split_fractions}"
                )
            bounds = np.cumsum(counts)
            parts = np.split(order, bounds[:-1])
            for split, part in zip(SPLITS, parts):
                self._samples[split] = np.sort(part)
                starts = np.arange(0, n_time - self.window + 1, self.stride)
                self._starts[split] = np.array(
                    [(s, t) for s in self._samples[split] for t in starts], dtype=np.int64
                ).reshape(-1, 2)
        else:
            # one series: contiguous time blocks; windows never cross a block edge
            edges = np.concatenate([[0], np.cumsum(np.round(fr * n_time).astype(int))])
            edges[-1] = n_time
            for i, split in enumerate(SPLITS):
                lo, hi = edges[i], edges[i + 1]
                starts = np.arange(lo, hi - self.window + 1, self.stride)
                self._samples[split] = np.array([0])
                self._starts[split] = np.stack([np.zeros_like(starts), starts], axis=1)

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        with self._open() as ds:
            data = self._to_array(ds)
        n_samples, n_time = data.shape[:2]
        if n_time < self.window:
            raise ValueError(
                f"{self.path}: {n_time} time steps but one window needs in_steps + out_steps x "
                f"rollout_steps = {self.in_steps} + {self.out_steps} x {self.rollout_steps} = {self.window}; "
                "reduce data.in_steps / data.out_steps / data.rollout_steps"
            )
        self._split_samples(n_samples, n_time)
        for split in SPLITS:
            if len(self._starts[split]) == 0 and self.split_fractions[SPLITS.index(split)] > 0:
                raise ValueError(
                    f"{self.path}: the {split} split has no complete window of {self.window} steps; "
                    "change data.split_fractions or the window length"
                )
        train = data[self._samples["train"]]
        mean = train.mean(axis=(0, 1, 3, 4), dtype=np.float64)
        std = train.std(axis=(0, 1, 3, 4), dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
        self.normalization = Normalization(mean.astype(np.float32), std.astype(np.float32))
        self._data = data
        log.info(
            "%s: %s windows (train/val/test) of %d+%d steps, %d channel(s)",
            self.path, [len(self._starts[s]) for s in SPLITS], self.in_steps, self.target_steps,
            data.shape[2],
        )

    # -- shapes ------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        assert self._data is not None, "call setup() first"
        return int(self._data.shape[-2]), int(self._data.shape[-1])

    @property
    def num_channels(self) -> int:
        return len(self.variables)

    def dataset(self, split: str) -> WindowDataset:
        if self._data is None:
            self.setup()
        return WindowDataset(self._data, self._starts[split], self.in_steps, self.target_steps)

    def window_info(self, split: str, indices: np.ndarray) -> WindowInfo:
        """Sample labels and last-input-time labels of windows ``indices`` of ``split``."""
        starts = self._starts[split][np.asarray(indices, dtype=np.int64)]
        time = self.coords[self.time_dim].values
        if self.sample_dim in self.coords:
            sample = self.coords[self.sample_dim].values[starts[:, 0]]
        else:
            sample = starts[:, 0]
        return WindowInfo(sample, time[starts[:, 1] + self.in_steps - 1])

    # -- the augmented pool ------------------------------------------------------------------
    @property
    def pool_size(self) -> int:
        return int(self.pool_x.shape[0])

    def add_to_pool(self, x: Tensor, y: Tensor, score: Tensor) -> int:
        """Add physical (input, pseudo-target) pairs; returns how many were added.

        Beyond ``pool_capacity`` the oldest or the worst-scoring samples are dropped. Callers
        must pass the same tensors on every rank (the callback gathers before calling).
        """
        if x.shape[0] == 0:
            return 0
        x, y, score = x.detach().float().cpu(), y.detach().float().cpu(), score.detach().float().cpu()
        first_new = self._pool_counter
        age = torch.arange(first_new, first_new + x.shape[0])
        self._pool_counter += x.shape[0]
        if self.pool_size:
            x, y = torch.cat([self.pool_x, x]), torch.cat([self.pool_y, y])
            score, age = torch.cat([self.pool_score, score]), torch.cat([self.pool_age, age])
        if x.shape[0] > self.pool_capacity:
            key = score if self.pool_policy == "worst" else age.float()
            keep = torch.sort(torch.topk(key, self.pool_capacity).indices).values
            x, y, score, age = x[keep], y[keep], score[keep], age[keep]
        self.pool_x, self.pool_y, self.pool_score, self.pool_age = x, y, score, age
        return int((age >= first_new).sum())

    def state_dict(self) -> dict:
        return {
            "pool_x": self.pool_x, "pool_y": self.pool_y, "pool_score": self.pool_score,
            "pool_age": self.pool_age, "pool_counter": self._pool_counter,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pool_x, self.pool_y = state["pool_x"], state["pool_y"]
        self.pool_score, self.pool_age = state["pool_score"], state["pool_age"]
        self._pool_counter = int(state["pool_counter"])

    def training_windows(self, max_windows: int | None = None, seed: int = 0) -> tuple[np.ndarray, Tensor, Tensor]:
        """Indices and physical ``(x, y)`` of (a random subset of) training windows."""
        ds = self.dataset("train")
        idx = np.arange(len(ds))
        if max_windows is not None and max_windows < len(ds):
            idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_windows, replace=False))
        xs, ys = zip(*[(ds[i].x, ds[i].y) for i in idx])
        return idx, torch.stack(xs), torch.stack(ys)

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=False,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        ds: Dataset = self.dataset("train")
        if self.pool_size:
            ds = ConcatDataset([ds, PoolDataset(self.pool_x, self.pool_y, self.pool_weight)])
        return self._loader(ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.predict_split), shuffle=False)

