"""A forecasting datamodule over xarray-readable NetCDF: one file, a glob or a list of files.

Conventions accepted (the reanalysis, WeatherBench and simulation files of the field, see the
ERA5 documentation, https://confluence.ecmwf.int/display/CKB/ERA5, and WeatherBench,
Rasp et al. 2020, arXiv 2002.00469; WeatherBench 2, Rasp et al. 2024, arXiv 2308.15560):

- dims ``time``/``valid_time``, optional ``level``/``pressure_level``, ``latitude``/``lat``/``y``,
  ``longitude``/``lon``/``x`` and an optional trajectory (ensemble) dim, found by name or by the CF
  ``axis``/``standard_name`` attributes unless given explicitly; extra size-1 dims are dropped;
- latitude ascending or descending (kept in the file's order; ``latitude`` exposes it);
- int16 packing with ``scale_factor``/``add_offset``/``_FillValue`` (decoded by xarray; fill
  values become NaN and go through the NaN policy);
- several variables and pressure levels stacked as channels (``z`` at ``levels=[500, 850]`` gives
  channels ``z500``, ``z850``; a variable without a level dim gives one channel);
- many files along time (opened one at a time, so every error names its file and no dask is
  needed), a lat/lon box, a time range and a time step (e.g. ``6h``: frames on that grid only).

Data stay labelled (xarray) until one conversion to a float32 array with the fixed dim order
``(sample, time, channel, y, x)``. Below ``cache_above_mb`` the array lives in memory: the files
are read once in ``setup`` (main process) and closed, so no NetCDF handle reaches a DataLoader
worker and no item opens a file. Above it, a one-time conversion writes a memory-mapped ``.npy``
cache (``beamvq.datamodules.cache``) that each worker process opens lazily.

Windows are ``in_steps + out_steps × rollout_steps`` consecutive frames one ``time_step`` apart:
a window never bridges a gap in the time axis, never crosses a split boundary and never mixes
samples. Splits are by trajectory, by contiguous time blocks (one series) or by explicit date
ranges (``train_period``...); they never overlap. Normalization statistics and the climatology
(for ACC) come from the training split only.

Every check on the input runs in ``setup``, before training, and stops with one message naming
the file and the variable: unreadable file, missing variable or level, dims that cannot map to
``(time, y, x)``, non-monotonic or duplicated time, grids or levels that differ across files,
all-NaN variables, NaN fractions above ``max_nan_fraction``, empty splits and splits shorter
than one window.

The datamodule also owns BeamVQ's augmented pool of (input, pseudo-target) pairs: capped, part of
``state_dict`` (so checkpoints restore it), concatenated to the training windows each epoch.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import xarray as xr
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from beamvq.datamodules import cache as cache_mod
from beamvq.datamodules.io import DataGenerator
from beamvq.datamodules.pool import AugmentedPool
from beamvq.protocols import (
    AxisInfo,
    Batch,
    ChannelInfo,
    DataInfo,
    Normalization,
    UnlabelledInputs,
    WindowInfo,
    Windows,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NAN_POLICIES = ("fill", "mask")

# names that real files use for each role, in order of preference
TIME_NAMES = ("time", "valid_time", "Time", "t")
LEVEL_NAMES = ("level", "pressure_level", "plev", "isobaricInhPa", "lev")
Y_NAMES = ("latitude", "lat", "y", "rlat", "south_north")
X_NAMES = ("longitude", "lon", "x", "rlon", "west_east")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")
LAT_UNITS = ("degrees_north", "degree_north", "degree_N", "degrees_N", "degreeN", "degreesN")
LON_UNITS = ("degrees_east", "degree_east", "degree_E", "degrees_E", "degreeE", "degreesE")
# a read block is at most this many bytes of float32, so huge files stream through
READ_BLOCK_BYTES = 64 * 2**20


# one window (the fields of beamvq.protocols.Batch without the batch dim)
Sample = Batch


class Channel(NamedTuple):
    """One channel of the stacked array: its name, source variable and level label (or None)."""

    name: str
    variable: str
    level: float | None


class FileTimes(NamedTuple):
    """A data file and the positions along its time axis that the selection keeps."""

    path: str
    time_index: np.ndarray


class Layout(NamedTuple):
    """What the files hold after selection, read from metadata only (no data values).

    ``y_index``/``x_index`` are positions in every file's y/x axis (the lat/lon box).
    """

    files: list[FileTimes]
    time_dim: str
    y_dim: str
    x_dim: str
    level_dim: str | None
    sample_dim: str | None
    channels: list[Channel]
    time: np.ndarray
    y_index: np.ndarray
    x_index: np.ndarray
    coords: dict[str, xr.DataArray]
    var_attrs: dict[str, dict]
    latitude: np.ndarray | None
    n_samples: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (
            self.n_samples,
            len(self.time),
            len(self.channels),
            len(self.y_index),
            len(self.x_index),
        )


class FrameStats(NamedTuple):
    """Per ``(sample, time, channel)`` statistics of the finite values of each frame.

    ``mean``/``m2`` (sum of squared deviations from the frame mean) combine exactly over any set
    of frames (Chan et al.'s parallel variance), so the training-split statistics need no second
    pass over the data.
    """

    count: np.ndarray
    nonfinite: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray


class WindowBatch(Sequence):
    """What ``__getitems__`` returns: a batch gathered once into preallocated arrays.

    ``collated`` is the batch ``collate_windows`` hands on as it is; indexing gives per-window
    views, so PyTorch's ``default_collate`` (a DataLoader built elsewhere) still gets samples.
    """

    def __init__(self, collated: Sample) -> None:
        self.collated = collated

    def __len__(self) -> int:
        return int(self.collated.x.shape[0])

    def __getitem__(self, j: int) -> Sample:  # type: ignore[override]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        return Sample(*(field[j] for field in self.collated))


def collate_windows(batch: Sequence[Sample]) -> Sample:
    """Collate of the datamodule's loaders: a gathered ``WindowBatch`` passes as it is (no second
    copy of the frames); a list of samples (the pool mixed in) goes through ``default_collate``."""
    if isinstance(batch, WindowBatch):
        return batch.collated
    return default_collate(batch)


def future_free_starts(starts: np.ndarray, target_steps: int) -> np.ndarray:
    """Start indices ``(M, 2)`` of (sample, t0) inputs that have no training target.

    ``starts`` are a split's window starts ``(sample, t0)``. Per sample, the inputs starting
    after its last window start ``t_last`` and at most ``target_steps`` later end no later than
    that window's last frame (``t_last + in_steps + target_steps - 1``): their frames are all in
    the split, their futures are not.
    """
    out = []
    for s in np.unique(starts[:, 0]):
        t_last = int(starts[starts[:, 0] == s, 1].max())
        t0 = np.arange(t_last + 1, t_last + target_steps + 1)
        out.append(np.stack([np.full_like(t0, s), t0], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(out).astype(np.int64)


class _Windows(Dataset):
    """Windows over an array-like ``(S, T, C, H, W)``; ``starts`` holds ``(sample, t0)``.

    A DataLoader batch is gathered by ``__getitems__`` straight into one preallocated array per
    field: one copy of the frames, one Python loop step per window.
    """

    def __init__(
        self, starts: np.ndarray, in_steps: int, target_steps: int, fill: np.ndarray | None = None
    ) -> None:
        self.starts = starts
        self.in_steps = in_steps
        self.target_steps = target_steps
        self.fill = fill

    def _source(self) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must define _source()")

    def __len__(self) -> int:
        return len(self.starts)

    def _filled(self, frames: np.ndarray) -> np.ndarray:
        if self.fill is not None:
            bad = ~np.isfinite(frames)
            if bad.any():
                shape = (1,) * (frames.ndim - 3) + (-1, 1, 1)
                frames[bad] = np.broadcast_to(self.fill.reshape(shape), frames.shape)[bad]
        return frames

    def inputs(self, starts: np.ndarray) -> np.ndarray:
        """The ``in_steps`` input frames ``(N, in_steps, C, H, W)`` (float32, missing values
        filled) starting at each ``(sample, t0)`` of ``starts``: windows need not exist there."""
        data = self._source()
        x = np.empty((len(starts), self.in_steps, *data.shape[2:]), np.float32)
        for j, (s, t0) in enumerate(np.asarray(starts, dtype=np.int64).tolist()):
            x[j] = data[s, t0 : t0 + self.in_steps]
        return self._filled(x)

    def __getitem__(self, i: int) -> Sample:
        s, t0 = (int(v) for v in self.starts[i])
        mid = t0 + self.in_steps
        data = self._source()
        x = self._filled(np.array(data[s, t0:mid]))
        y = self._filled(np.array(data[s, mid : mid + self.target_steps]))
        return Sample(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(1.0), torch.tensor(i))

    def __getitems__(self, indices: Sequence[int]) -> WindowBatch:
        data = self._source()
        idx = np.asarray(indices, dtype=np.int64)
        frame = data.shape[2:]
        x = np.empty((idx.size, self.in_steps, *frame), np.float32)
        y = np.empty((idx.size, self.target_steps, *frame), np.float32)
        for j, (s, t0) in enumerate(self.starts[idx].tolist()):
            mid = t0 + self.in_steps
            x[j] = data[s, t0:mid]
            y[j] = data[s, mid : mid + self.target_steps]
        return WindowBatch(
            Sample(
                torch.from_numpy(self._filled(x)),
                torch.from_numpy(self._filled(y)),
                torch.ones(idx.size),
                torch.from_numpy(idx),
            )
        )


class WindowDataset(_Windows):
    """Windows over an in-memory array ``(S, T, C, H, W)``; ``starts`` holds ``(sample, t0)``."""

    def __init__(
        self, data: np.ndarray, starts: np.ndarray, in_steps: int, target_steps: int
    ) -> None:
        super().__init__(starts, in_steps, target_steps)
        self.data = data

    def _source(self) -> np.ndarray:
        return self.data


class MemmapWindowDataset(_Windows):
    """Windows over the memory-mapped cache ``data_file`` (``np.load(mmap_mode="r")``).

    The map is opened lazily in the process that reads the first item (each DataLoader worker
    maps the file itself; nothing open is pickled). ``fill`` (per channel) replaces NaNs when the
    NaN policy is ``"fill"``; the cache itself is left as read.
    """

    def __init__(
        self,
        data_file: Path,
        starts: np.ndarray,
        in_steps: int,
        target_steps: int,
        fill: np.ndarray | None = None,
    ) -> None:
        super().__init__(starts, in_steps, target_steps, fill)
        self.data_file = Path(data_file)
        self._array: np.ndarray | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_pid": -1}

    @property
    def data(self) -> np.ndarray:
        """The mapped ``(S, T, C, H, W)`` array, as read (``WindowDataset.data``'s counterpart)."""
        return self._source()

    def _source(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            self._array = np.load(self.data_file, mmap_mode="r")
            self._pid = os.getpid()
        return self._array


# ------------------------------------------------------------------------------------------
# metadata helpers
# ------------------------------------------------------------------------------------------
def resolve_paths(path: str | Sequence[str]) -> list[str]:
    """Files named by ``path``: one file, a glob pattern, or a list of files/patterns."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise ValueError("data.path: give a NetCDF file, a glob pattern or a list of files")
    files: list[str] = []
    for item in items:
        item = str(item)
        if any(ch in item for ch in "*?["):
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"data.path: no file matches the pattern {item}")
            files.extend(matched)
        elif not Path(item).is_file():
            raise FileNotFoundError(f"data.path: NetCDF file not found: {item}")
        else:
            files.append(item)
    if len(set(files)) != len(files):
        raise ValueError(f"data.path: a file is listed twice in {files}")
    return files


def open_netcdf(path: str) -> xr.Dataset:
    """Open lazily; any failure becomes one message naming the file."""
    try:
        return xr.open_dataset(path, cache=False)
    except Exception as err:  # netCDF4/HDF5 raise several types for unreadable files
        raise ValueError(
            f"{path}: cannot read the file as NetCDF ({type(err).__name__}: {err})"
        ) from err


def _coord_attr(ds: xr.Dataset, dim: str, key: str) -> str:
    return str(ds[dim].attrs.get(key, "")) if dim in ds.variables else ""


def _find_dim(
    ds: xr.Dataset,
    dims: Sequence[str],
    names: Sequence[str],
    axis: str,
    std_names: Sequence[str],
    units: Sequence[str] = (),
) -> str | None:
    """The dim of ``dims`` playing a role: by conventional name, then by CF attributes."""
    for name in names:
        if name in dims:
            return name
    for dim in dims:
        if (
            _coord_attr(ds, dim, "axis").upper() == axis
            or _coord_attr(ds, dim, "standard_name") in std_names
            or (units and _coord_attr(ds, dim, "units") in units)
        ):
            return dim
    return None


def is_latitude(ds: xr.Dataset, dim: str) -> bool:
    return (
        dim in LAT_NAMES
        or _coord_attr(ds, dim, "standard_name") == "latitude"
        or _coord_attr(ds, dim, "units") in LAT_UNITS
    )


def is_longitude(ds: xr.Dataset, dim: str) -> bool:
    return (
        dim in LON_NAMES
        or _coord_attr(ds, dim, "standard_name") == "longitude"
        or _coord_attr(ds, dim, "units") in LON_UNITS
    )


def _time_values(ds: xr.Dataset, dim: str, path: str) -> np.ndarray:
    """Time labels as datetime64[ns] or float64 (positions when the dim has no coordinate)."""
    if dim not in ds.variables:
        return np.arange(ds.sizes[dim], dtype=np.float64)
    values = ds[dim].values
    if values.dtype.kind == "M":
        return values.astype("datetime64[ns]")
    if values.dtype.kind == "O":
        # cftime dates (non-standard calendars of climate models)
        try:
            return xr.CFTimeIndex(values).to_datetimeindex(time_unit="ns").values
        except Exception as err:
            raise ValueError(
                f"{path}: coordinate {dim!r} holds dates that cannot be converted to the standard "
                f"calendar ({err}); convert the time axis before training"
            ) from err
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    raise ValueError(
        f"{path}: coordinate {dim!r} has type {values.dtype}; expected dates or numbers"
    )


def _fmt_time(value: object) -> str:
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="m")).replace("T00:00", "")
    return f"{float(value):g}"  # type: ignore[arg-type]


def _check_monotonic(time: np.ndarray, dim: str, path: str) -> None:
    if time.size < 2:
        return
    diff = np.diff(time)
    zero = np.zeros((), dtype=diff.dtype)
    dup = np.flatnonzero(diff == zero)
    if dup.size:
        i = int(dup[0])
        raise ValueError(
            f"{path}: coordinate {dim!r} has the duplicated value {_fmt_time(time[i])} "
            f"(positions {i} and {i + 1}); remove the duplicate frames"
        )
    back = np.flatnonzero(diff < zero)
    if back.size:
        i = int(back[0])
        raise ValueError(
            f"{path}: coordinate {dim!r} is not monotonic: {_fmt_time(time[i + 1])} at position "
            f"{i + 1} comes after {_fmt_time(time[i])}; sort the file along {dim!r}"
        )


def parse_time_step(step: str | float, time: np.ndarray) -> np.timedelta64 | float:
    """``step`` in the time axis' units: a pandas duration (``6h``) for dates, a number otherwise."""
    try:
        if time.dtype.kind == "M":
            value = pd.Timedelta(str(step)).to_timedelta64().astype("timedelta64[ns]")
            ok = value > np.timedelta64(0, "ns")
        else:
            value = float(step)
            ok = value > 0
    except (ValueError, TypeError) as err:
        kind = "a duration such as '6h'" if time.dtype.kind == "M" else "a number"
        raise ValueError(f"data.time_step={step!r} must be {kind}: {err}") from err
    if not ok:
        raise ValueError(f"data.time_step={step!r} must be positive")
    return value


def label_slice(time: np.ndarray, start: str, end: str, arg: str) -> slice:
    """Positions of ``time`` inside ``[start, end]`` (inclusive; partial dates like ``2015``
    cover the whole year, as in pandas/xarray label selection)."""
    try:
        if time.dtype.kind == "M":
            index = pd.DatetimeIndex(time)
            return index.slice_indexer(str(start), str(end))
        return pd.Index(time).slice_indexer(float(start), float(end))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"data.{arg}=({start!r}, {end!r}) cannot select time labels: {err}"
        ) from err


def _index_plan(index: np.ndarray) -> tuple[slice, np.ndarray | None]:
    """Read ``index`` as one slice (a step slice when regular), plus a numpy re-index if needed."""
    lo = int(index[0])
    if index.size == 1:
        return slice(lo, lo + 1), None
    step = int(index[1] - index[0])
    if step > 0 and np.array_equal(index, np.arange(lo, lo + step * index.size, step)):
        return slice(lo, int(index[-1]) + 1, step), None
    lo, hi = int(index.min()), int(index.max())
    return slice(lo, hi + 1), index - lo


def _box_index(values: np.ndarray, lo: float, hi: float, periodic: bool) -> np.ndarray:
    """Positions of ``values`` inside ``[lo, hi]``; for longitudes the box may wrap (350, 20)."""
    if periodic:
        width = (hi - lo) % 360.0
        offset = (values - lo) % 360.0
        keep = np.flatnonzero(offset <= width + 1e-9)
        # order by distance from the western edge, so a wrapping box stays contiguous west to east
        return keep[np.argsort(offset[keep], kind="stable")]
    a, b = min(lo, hi), max(lo, hi)
    return np.flatnonzero((values >= a) & (values <= b))


# ------------------------------------------------------------------------------------------
# the datamodule
# ------------------------------------------------------------------------------------------
class NetCDFDataModule(pl.LightningDataModule):
    """Forecasting windows from NetCDF files (ERA5/WeatherBench grids, radar mosaics, simulations).

    Args:
        path: a NetCDF file, a glob pattern (``data/era5_*.nc``) or a list of files, concatenated
            along time (files may come in any order; they must not overlap in time).
        variables: data variables stacked as channels (in this order).
        levels: level labels (e.g. hPa) selected for every variable that has a level dim; None
            keeps all levels. Each (variable, level) is one channel named ``f"{var}{level:g}"``.
        in_steps: input frames ``T_in``.
        out_steps: frames per forecast step ``T_out``.
        rollout_steps: autoregressive steps per window; the target holds ``rollout_steps × T_out``.
        stride: time steps between consecutive window starts.
        time_step: spacing of the frames of a window, a duration for dated axes (``"6h"``) or a
            number for numeric ones; frames off this grid (counted from the first kept time) are
            skipped. None: the most common spacing of the file.
        time_range: ``(start, end)`` labels (inclusive) of the time span to use.
        lat_range, lon_range: ``(lo, hi)`` box on the y/x coordinate (degrees for lat/lon grids;
            a longitude box may wrap, e.g. ``(340, 40)``).
        split_fractions: fractions of samples (trajectories) for train/val/test, or of the time
            axis (contiguous blocks) for a single series; ignored when periods are given.
        train_period, val_period, test_period: ``(start, end)`` time labels (inclusive, partial
            dates allowed) of each split; giving ``train_period`` switches to date splits, and a
            split without a period is empty.
        sample_dim: the trajectory/ensemble dim; absent in the file means one series.
        time_dim, y_dim, x_dim, level_dim: dim names in the files; None detects them from the
            conventional names and the CF ``axis``/``standard_name`` attributes.
        max_nan_fraction: largest fraction of NaN/Inf (or ``_FillValue``) values allowed per
            variable and file; above it setup stops. An all-NaN variable always stops.
        nan_policy: what happens to the NaNs that are allowed: ``"fill"`` replaces them with the
            channel's training mean; ``"mask"`` drops every window that touches a frame with NaNs.
        cache_above_mb: above this array size (MiB), convert once to a memory-mapped cache instead
            of loading into memory (0: always use the cache).
        cache_dir: folder of the cache; None is ``$BEAMVQ_CACHE`` or ``~/.cache/beamvq``. For a
            multi-node run point it at a shared filesystem (or set ``cache_per_node``).
        cache_per_node: True when ``cache_dir`` is node-local: every node converts its own copy
            (local rank 0); False: global rank 0 converts once for all nodes.
        check_only: the CLI prints ``check()`` and exits before training when True.
        batch_size, num_workers: DataLoader settings.
        predict_split: the split whose windows ``predict`` forecasts.
        pool_capacity: most pseudo-labelled samples kept in the augmented pool.
        pool_policy: which to drop when full: ``"oldest"`` or ``"worst"`` (lowest score).
        pool_weight: loss weight of pool samples relative to real ones.
        seed: seed of the trajectory shuffle before splitting.
        generator: a built-in dataset (``beamvq.datamodules.synthetic.NavierStokesGenerator``,
            ``beamvq.datamodules.storm.StormGenerator``, ...) that writes ``path`` when it is missing.
    """

    def __init__(
        self,
        path: str | list[str],
        variables: list[str],
        levels: list[float] | None = None,
        in_steps: int = 5,
        out_steps: int = 5,
        rollout_steps: int = 1,
        stride: int = 1,
        time_step: str | None = None,
        time_range: tuple[str, str] | None = None,
        lat_range: tuple[float, float] | None = None,
        lon_range: tuple[float, float] | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        train_period: tuple[str, str] | None = None,
        val_period: tuple[str, str] | None = None,
        test_period: tuple[str, str] | None = None,
        sample_dim: str = "trajectory",
        time_dim: str | None = None,
        y_dim: str | None = None,
        x_dim: str | None = None,
        level_dim: str | None = None,
        max_nan_fraction: float = 0.0,
        nan_policy: str = "fill",
        cache_above_mb: float = 2048.0,
        cache_dir: str | None = None,
        cache_per_node: bool = False,
        check_only: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        predict_split: str = "test",
        pool_capacity: int = 256,
        pool_policy: str = "worst",
        pool_weight: float = 0.5,
        seed: int = 0,
        generator: DataGenerator | None = None,
    ) -> None:
        super().__init__()
        if not variables:
            raise ValueError("data.variables: give at least one variable name")
        if len(set(variables)) != len(variables):
            raise ValueError(f"data.variables lists a variable twice: {list(variables)}")
        for name, value in (
            ("in_steps", in_steps),
            ("out_steps", out_steps),
            ("rollout_steps", rollout_steps),
            ("stride", stride),
            ("batch_size", batch_size),
        ):
            if int(value) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
            raise ValueError(
                f"data.split_fractions must be three non-negative numbers, got {split_fractions}"
            )
        if predict_split not in SPLITS:
            raise ValueError(f"data.predict_split must be one of {SPLITS}, got {predict_split!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"data.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if not 0.0 <= max_nan_fraction <= 1.0:
            raise ValueError(f"data.max_nan_fraction must be in [0, 1], got {max_nan_fraction}")
        periods = {"train": train_period, "val": val_period, "test": test_period}
        if train_period is None and (val_period is not None or test_period is not None):
            raise ValueError("data.val_period/test_period need data.train_period (date splits)")
        for name, value in [
            ("time_range", time_range),
            ("lat_range", lat_range),
            ("lon_range", lon_range),
        ] + [(f"{k}_period", v) for k, v in periods.items()]:
            if value is not None and len(value) != 2:
                raise ValueError(f"data.{name} must be (start, end), got {value}")
        self.path = str(path) if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
        self.variables = list(variables)
        self.levels = None if levels is None else [float(v) for v in levels]
        self.in_steps, self.out_steps, self.rollout_steps = (
            int(in_steps),
            int(out_steps),
            int(rollout_steps),
        )
        self.stride = int(stride)
        self.time_step_arg = time_step
        self.time_range = None if time_range is None else tuple(str(v) for v in time_range)
        self.lat_range = None if lat_range is None else tuple(float(v) for v in lat_range)
        self.lon_range = None if lon_range is None else tuple(float(v) for v in lon_range)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.periods = {
            k: (None if v is None else (str(v[0]), str(v[1]))) for k, v in periods.items()
        }
        self.sample_dim_arg = sample_dim
        self.sample_dim = sample_dim
        # resolved in setup (auto-detection); the arguments are kept to detect again per file
        self.time_dim: str | None = time_dim
        self.y_dim: str | None = y_dim
        self.x_dim: str | None = x_dim
        self.level_dim: str | None = level_dim
        self._dim_args = {"time": time_dim, "y": y_dim, "x": x_dim, "level": level_dim}
        self.max_nan_fraction, self.nan_policy = float(max_nan_fraction), nan_policy
        self.cache_above_mb, self.cache_dir = float(cache_above_mb), cache_dir
        self.cache_per_node = bool(cache_per_node)
        # Lightning reads this attribute: prepare_data (the cache conversion) per node or once
        self.prepare_data_per_node = self.cache_per_node
        self.check_only = bool(check_only)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.predict_split = predict_split
        self.pool = AugmentedPool(pool_capacity, pool_policy, pool_weight)
        self.seed = int(seed)
        self.generator = generator
        if generator is not None and not isinstance(self.path, str):
            raise ValueError("data.generator writes one file: give data.path as a single file name")
        self._layout: Layout | None = None
        self._data: np.ndarray | None = None
        self._cache_file: Path | None = None
        self._stats: FrameStats | None = None
        self._fill: np.ndarray | None = None
        self._time_step: np.timedelta64 | float | None = None
        self._samples: dict[str, np.ndarray] = {}
        self._starts: dict[str, np.ndarray] = {}
        self._frames: dict[str, np.ndarray] = {}
        self._climatology: np.ndarray | None = None
        self.normalization: Normalization | None = None
        self.latitude: np.ndarray | None = None
        self.coords: dict[str, xr.DataArray] = {}
        self.var_attrs: dict[str, dict] = {}

    # -- sizes -------------------------------------------------------------------------------
    @property
    def target_steps(self) -> int:
        return self.out_steps * self.rollout_steps

    @property
    def window(self) -> int:
        return self.in_steps + self.target_steps

    @property
    def files(self) -> list[str]:
        return resolve_paths(self.path)

    def _label(self) -> str:
        """The data files, as named in messages."""
        files = self._layout.files if self._layout is not None else None
        names = [f.path for f in files] if files else [str(p) for p in np.atleast_1d(self.path)]
        return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more files)"

    # -- metadata scan -----------------------------------------------------------------------
    def _detect_dims(self, ds: xr.Dataset, var: xr.DataArray, path: str) -> dict[str, str | None]:
        dims = list(var.dims)
        found: dict[str, str | None] = {}
        rules = {
            "time": (TIME_NAMES, "T", ("time",), ()),
            "y": (
                Y_NAMES,
                "Y",
                ("latitude", "projection_y_coordinate", "grid_latitude"),
                LAT_UNITS,
            ),
            "x": (
                X_NAMES,
                "X",
                ("longitude", "projection_x_coordinate", "grid_longitude"),
                LON_UNITS,
            ),
            "level": (LEVEL_NAMES, "Z", ("air_pressure", "model_level_number", "height"), ()),
        }
        for role, (names, axis, std, units) in rules.items():
            explicit = self._dim_args[role]
            if explicit is not None:
                found[role] = explicit if explicit in dims else None
            else:
                rest = [d for d in dims if d not in found.values() and d != self.sample_dim_arg]
                found[role] = _find_dim(ds, rest, names, axis, std, units)
        missing = [role for role in ("time", "y", "x") if found[role] is None]
        if missing:
            hint = ", ".join(
                f"data.{r}_dim={self._dim_args[r]!r} not in dims"
                if self._dim_args[r]
                else f"no {r} dim found"
                for r in missing
            )
            raise ValueError(
                f"{path}: variable {var.name!r} has dims {tuple(var.dims)} that cannot map to "
                f"(time, y, x): {hint}; set data.time_dim / data.y_dim / data.x_dim"
            )
        return found

    def _scan(self) -> Layout:
        """Validate the files' metadata and work out the selection; reads no data values."""
        files = resolve_paths(self.path)
        dims: dict[str, str | None] | None = None
        first: dict[str, object] = {}
        per_file: list[tuple[str, np.ndarray]] = []
        channels: list[Channel] = []
        var_attrs: dict[str, dict] = {}
        coords: dict[str, xr.DataArray] = {}
        latitude = False
        longitude = False
        for path in files:
            with open_netcdf(path) as ds:
                missing = [v for v in self.variables if v not in ds.data_vars]
                if missing:
                    raise ValueError(
                        f"{path}: variable(s) {missing} not in the file; it has {sorted(map(str, ds.data_vars))}"
                    )
                if dims is None:
                    dims = self._detect_dims(ds, ds[self.variables[0]], path)
                    first_path = path
                t_dim, y_dim, x_dim = dims["time"], dims["y"], dims["x"]
                for name in self.variables:
                    var = ds[name]
                    found = self._detect_dims(ds, var, path)
                    for role in ("time", "y", "x"):
                        if found[role] != dims[role]:
                            raise ValueError(
                                f"{path}: variable {name!r} has {role} dim {found[role]!r} but "
                                f"{first_path} uses {dims[role]!r}; set data.{role}_dim"
                            )
                    allowed = {t_dim, y_dim, x_dim, self.sample_dim_arg, found["level"]}
                    for d in var.dims:
                        if d not in allowed and var.sizes[d] != 1:
                            raise ValueError(
                                f"{path}: variable {name!r} has dims {tuple(var.dims)}: dim {d!r} "
                                f"(size {var.sizes[d]}) cannot map to (time, [level], y, x); "
                                "set data.level_dim / data.sample_dim or select it away"
                            )
                    level_dim = found["level"]
                    if level_dim is not None and dims.get("level") is None:
                        dims["level"] = level_dim
                    if level_dim is not None:
                        have = (
                            ds[level_dim].values
                            if level_dim in ds.variables
                            else np.arange(var.sizes[level_dim])
                        ).astype(np.float64)
                        wanted = have if self.levels is None else np.asarray(self.levels)
                        absent = [f"{v:g}" for v in wanted if not np.isclose(have, v).any()]
                        if absent:
                            raise ValueError(
                                f"{path}: variable {name!r} has no level {', '.join(absent)} along "
                                f"{level_dim!r}; it has {[f'{v:g}' for v in have]}"
                            )
                        levels = [float(v) for v in wanted]
                    else:
                        levels = [None]
                    chans = [
                        Channel(name if lv is None else f"{name}{lv:g}", name, lv) for lv in levels
                    ]
                    key = f"channels:{name}"
                    if key not in first:
                        first[key] = chans
                        channels.extend(chans)
                        attrs = dict(var.attrs)
                        var_attrs[name] = attrs
                        for ch in chans:
                            var_attrs[ch.name] = (
                                attrs if ch.level is None else dict(attrs, level=ch.level)
                            )
                    elif first[key] != chans:
                        raise ValueError(
                            f"{path}: variable {name!r} has levels {[c.level for c in chans]} but "
                            f"{first_path} has {[c.level for c in first[key]]} (levels differ across "
                            "files); set data.levels"
                        )
                has_sample = self.sample_dim_arg in ds[self.variables[0]].dims
                for name in self.variables:
                    if (self.sample_dim_arg in ds[name].dims) != has_sample:
                        raise ValueError(
                            f"{path}: variable {name!r} and {self.variables[0]!r} disagree on the "
                            f"sample dim {self.sample_dim_arg!r}"
                        )
                # the grid, the sample labels and the time axis
                for role, dim in (("y", y_dim), ("x", x_dim)):
                    values = (
                        ds[dim].values if dim in ds.variables else np.arange(ds.sizes[dim])
                    ).astype(np.float64)
                    ref = first.setdefault(role, values)
                    if ref.shape != values.shape or not np.allclose(
                        ref, values, rtol=1e-6, atol=1e-9
                    ):
                        raise ValueError(
                            f"{path}: variable {self.variables[0]!r} is on a different grid than "
                            f"{first_path}: {dim!r} has {values.size} points "
                            f"[{values[0]:g} .. {values[-1]:g}] vs {ref.size} [{ref[0]:g} .. {ref[-1]:g}]"
                        )
                    if role not in coords:
                        attrs = dict(ds[dim].attrs) if dim in ds.variables else {}
                        coords[role] = xr.DataArray(values, dims=(dim,), attrs=attrs, name=dim)
                if has_sample:
                    sd = self.sample_dim_arg
                    labels = ds[sd].values if sd in ds.variables else np.arange(ds.sizes[sd])
                    ref = first.setdefault("sample", labels)
                    if not np.array_equal(ref, labels):
                        raise ValueError(
                            f"{path}: the samples along {sd!r} differ from those of {first_path}"
                        )
                    if "sample" not in coords:
                        attrs = dict(ds[sd].attrs) if sd in ds.variables else {}
                        coords["sample"] = xr.DataArray(labels, dims=(sd,), attrs=attrs, name=sd)
                if len(files) > 1 and t_dim not in ds.variables:
                    raise ValueError(
                        f"{path}: dim {t_dim!r} has no coordinate values; several files can only be "
                        "joined along a labelled time axis"
                    )
                time = _time_values(ds, t_dim, path)
                _check_monotonic(time, t_dim, path)
                if time.size == 0:
                    raise ValueError(f"{path}: variable {self.variables[0]!r} has no time steps")
                if "time_attrs" not in first:
                    first["time_attrs"] = dict(ds[t_dim].attrs) if t_dim in ds.variables else {}
                    latitude = is_latitude(ds, y_dim)
                    longitude = is_longitude(ds, x_dim)
                per_file.append((path, time))
        assert dims is not None
        # files in time order; they must not overlap
        per_file.sort(key=lambda item: item[1][0])
        kinds = {t.dtype.kind for _, t in per_file}
        if len(kinds) > 1:
            raise ValueError(f"{self._label()}: the files mix dated and numeric time axes")
        for (pa, ta), (pb, tb) in zip(per_file, per_file[1:]):
            if tb[0] <= ta[-1]:
                raise ValueError(
                    f"{pb}: its time axis ({_fmt_time(tb[0])} .. {_fmt_time(tb[-1])}) overlaps that "
                    f"of {pa} ({_fmt_time(ta[0])} .. {_fmt_time(ta[-1])}); duplicated or "
                    "non-monotonic time across files"
                )
        names = [c.name for c in channels]
        if len(set(names)) != len(names):
            raise ValueError(f"{self._label()}: channel names collide: {names}; rename a variable")
        full_time = np.concatenate([t for _, t in per_file])
        owner = np.concatenate([np.full(t.size, i) for i, (_, t) in enumerate(per_file)])
        local = np.concatenate([np.arange(t.size) for _, t in per_file])
        keep = np.arange(full_time.size)
        if self.time_range is not None:
            keep = keep[label_slice(full_time, *self.time_range, "time_range")]
            if keep.size == 0:
                raise ValueError(
                    f"data.time_range={self.time_range} selects no time step of {self._label()}: "
                    f"its time axis spans {_fmt_time(full_time[0])} .. {_fmt_time(full_time[-1])}"
                )
        if self.time_step_arg is not None:
            step = parse_time_step(self.time_step_arg, full_time)
            offset = full_time[keep] - full_time[keep[0]]
            if full_time.dtype.kind == "M":
                on_grid = offset.astype(np.int64) % np.int64(step.astype(np.int64)) == 0
            else:
                ratio = offset / step
                on_grid = np.abs(ratio - np.round(ratio)) < 1e-6
            keep = keep[on_grid]
        time = full_time[keep]
        files_sel = []
        for i, (path, _) in enumerate(per_file):
            mine = owner[keep] == i
            if mine.any():
                files_sel.append(FileTimes(path, local[keep][mine]))
        # the lat/lon box
        y_values, x_values = coords["y"].values, coords["x"].values
        y_index = np.arange(y_values.size)
        x_index = np.arange(x_values.size)
        if self.lat_range is not None:
            y_index = _box_index(y_values, *self.lat_range, periodic=False)
        if self.lon_range is not None:
            x_index = _box_index(x_values, *self.lon_range, periodic=longitude)
        for arg, idx, dim, values in (
            ("lat_range", y_index, dims["y"], y_values),
            ("lon_range", x_index, dims["x"], x_values),
        ):
            if idx.size == 0:
                raise ValueError(
                    f"data.{arg}={getattr(self, arg)} selects no point of {dim!r} in {self._label()} "
                    f"(it spans {values.min():g} .. {values.max():g})"
                )
        out_coords: dict[str, xr.DataArray] = {
            dims["time"]: xr.DataArray(
                time, dims=(dims["time"],), attrs=first["time_attrs"], name=dims["time"]
            ),
            dims["y"]: coords["y"].isel({dims["y"]: y_index}),
            dims["x"]: coords["x"].isel({dims["x"]: x_index}),
        }
        sample_dim = self.sample_dim_arg if "sample" in coords else None
        if sample_dim is not None:
            out_coords[sample_dim] = coords["sample"]
        return Layout(
            files=files_sel,
            time_dim=dims["time"],
            y_dim=dims["y"],
            x_dim=dims["x"],
            level_dim=dims.get("level"),
            sample_dim=sample_dim,
            channels=channels,
            time=time,
            y_index=y_index,
            x_index=x_index,
            coords=out_coords,
            var_attrs=var_attrs,
            latitude=y_values[y_index].copy() if latitude else None,
            n_samples=int(coords["sample"].size) if sample_dim is not None else 1,
        )

    def layout(self) -> Layout:
        """The files' layout after selection (metadata only; cached)."""
        if self._layout is None:
            self._layout = self._scan()
        return self._layout

    # -- reading -----------------------------------------------------------------------------
    def read_into(self, out: np.ndarray) -> FrameStats:
        """Read the selection into ``out (S, T, C, H, W)`` block by block; per-frame statistics.

        Files are opened one at a time and closed after reading; a block is at most
        ``READ_BLOCK_BYTES``, so this streams files larger than memory into a memory map.
        """
        lay = self.layout()
        n_s, n_t, n_c, n_h, n_w = lay.shape
        stats = FrameStats(
            count=np.zeros((n_s, n_t, n_c), np.int64),
            nonfinite=np.zeros((n_s, n_t, n_c), np.int64),
            mean=np.zeros((n_s, n_t, n_c)),
            m2=np.zeros((n_s, n_t, n_c)),
            minimum=np.full((n_s, n_t, n_c), np.nan),
            maximum=np.full((n_s, n_t, n_c), np.nan),
        )
        frames_per_block = max(1, READ_BLOCK_BYTES // (4 * n_s * n_h * n_w))
        y_sel, y_post = _index_plan(lay.y_index)
        x_sel, x_post = _index_plan(lay.x_index)
        offset = 0
        for ft in lay.files:
            with open_netcdf(ft.path) as ds:
                for c, ch in enumerate(lay.channels):
                    var = ds[ch.variable]
                    sel: dict[str, object] = {lay.y_dim: y_sel, lay.x_dim: x_sel}
                    if ch.level is not None:
                        have = (
                            ds[lay.level_dim].values
                            if lay.level_dim in ds.variables
                            else np.arange(var.sizes[lay.level_dim])
                        ).astype(np.float64)
                        sel[lay.level_dim] = int(np.flatnonzero(np.isclose(have, ch.level))[0])
                    for d in var.dims:
                        if d not in (
                            lay.time_dim,
                            lay.y_dim,
                            lay.x_dim,
                            lay.level_dim,
                            lay.sample_dim,
                        ):
                            sel[d] = 0  # a size-1 extra dim (ERA5's ``number``/``expver``)
                    order = [d for d in (lay.sample_dim, lay.time_dim, lay.y_dim, lay.x_dim) if d]
                    for a in range(0, ft.time_index.size, frames_per_block):
                        t_idx = ft.time_index[a : a + frames_per_block]
                        t_sel, t_post = _index_plan(t_idx)
                        try:
                            block = var.isel(sel | {lay.time_dim: t_sel}).transpose(*order).values
                        except Exception as err:
                            raise ValueError(
                                f"{ft.path}: cannot read variable {ch.variable!r} (time positions "
                                f"{int(t_idx[0])}..{int(t_idx[-1])}): {type(err).__name__}: {err}"
                            ) from err
                        if block.dtype.kind not in "fiu":
                            raise ValueError(
                                f"{ft.path}: variable {ch.variable!r} has type {block.dtype}; expected numbers"
                            )
                        block = block.astype(np.float32, copy=False)
                        if lay.sample_dim is None:
                            block = block[None]
                        if t_post is not None:
                            block = block[:, t_post]
                        if y_post is not None:
                            block = block[:, :, y_post]
                        if x_post is not None:
                            block = block[:, :, :, x_post]
                        t0 = offset + a
                        t1 = t0 + block.shape[1]
                        out[:, t0:t1, c] = block
                        _block_stats(block, stats, (slice(None), slice(t0, t1), c))
            offset += ft.time_index.size
        return stats

    def _check_nans(self, stats: FrameStats) -> None:
        """Stop on an all-NaN variable or a NaN fraction above the threshold, naming the file."""
        lay = self.layout()
        offset = 0
        pixels = len(lay.y_index) * len(lay.x_index)
        for ft in lay.files:
            sl = slice(offset, offset + ft.time_index.size)
            offset += ft.time_index.size
            for c, ch in enumerate(lay.channels):
                bad = int(stats.nonfinite[:, sl, c].sum())
                total = stats.nonfinite[:, sl, c].size * pixels
                what = f"variable {ch.variable!r}" + (
                    f" at level {ch.level:g}" if ch.level is not None else ""
                )
                if bad == total:
                    raise ValueError(
                        f"{ft.path}: {what} is entirely NaN/_FillValue ({total} values); "
                        "drop it from data.variables or fix the file"
                    )
                if bad / total > self.max_nan_fraction:
                    raise ValueError(
                        f"{ft.path}: {what} has {bad} NaN/Inf/_FillValue values "
                        f"({100 * bad / total:.3g}% of it), above data.max_nan_fraction="
                        f"{self.max_nan_fraction:g}; clean the file, or raise data.max_nan_fraction "
                        "and choose data.nan_policy ('fill' or 'mask')"
                    )

    def _use_cache(self) -> bool:
        size_mb = float(np.prod(self.layout().shape)) * 4 / 2**20
        return size_mb > self.cache_above_mb

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(os.environ.get("BEAMVQ_CACHE", Path.home() / ".cache" / "beamvq"))

    def _cache_key(self) -> str:
        lay = self.layout()
        return cache_mod.cache_key(
            files=[(f.path, f.time_index) for f in lay.files],
            selection={
                "channels": [list(c) for c in lay.channels],
                "dims": [lay.time_dim, lay.y_dim, lay.x_dim, lay.level_dim, lay.sample_dim],
                "y_index": lay.y_index.tolist(),
                "x_index": lay.x_index.tolist(),
            },
        )

    def _generate_if_missing(self) -> None:
        if self.generator is not None and not Path(self.path).is_file():
            log.info(
                "%s is missing: generating it with %s", self.path, type(self.generator).__name__
            )
            self.generator.write(self.path)

    def prepare_data(self) -> None:
        """Generate a missing built-in file; convert to the memory-mapped cache once when large
        (rank 0; see ``cache_per_node``)."""
        self._generate_if_missing()
        if self._use_cache():
            self._ensure_cache()

    def _ensure_cache(self) -> cache_mod.CacheEntry:
        lay = self.layout()
        stem = Path(lay.files[0].path).stem
        return cache_mod.ensure_cache(
            self._cache_root(),
            f"{stem}-{self._cache_key()}",
            lay.shape,
            self.read_into,
            description=f"{self._label()}: {[c.name for c in lay.channels]}",
        )

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._stats is not None:
            return
        # setup without prepare_data (a notebook, a test) still finds a built-in file
        self._generate_if_missing()
        lay = self.layout()
        self.time_dim, self.y_dim, self.x_dim = lay.time_dim, lay.y_dim, lay.x_dim
        self.level_dim = lay.level_dim
        self.sample_dim = lay.sample_dim or self.sample_dim_arg
        self.coords = dict(lay.coords)
        self.var_attrs = dict(lay.var_attrs)
        self.latitude = lay.latitude
        if self._use_cache():
            entry = self._ensure_cache()
            stats = FrameStats(**entry.stats)
            self._cache_file = entry.data_file
            data = None
        else:
            data = np.empty(lay.shape, np.float32)
            stats = self.read_into(data)
        self._check_nans(stats)
        self._time_step = self._resolve_step(lay.time)
        self._split(lay, stats)
        self._stats = stats
        mean, std = _combine(stats, self._frames["train"])
        self.normalization = Normalization(mean.astype(np.float32), std.astype(np.float32))
        has_nan = bool(stats.nonfinite.sum())
        if has_nan and self.nan_policy == "fill":
            self._fill = mean.astype(np.float32)
            if data is not None:
                # once, in place: the windows then hold no NaN and need no per-item work
                for c in range(data.shape[2]):
                    channel = data[:, :, c]
                    channel[~np.isfinite(channel)] = self._fill[c]
                self._fill = None
        self._data = data
        log.info(
            "%s: %s windows (train/val/test) of %d+%d steps, %d channel(s) %s, %s",
            self._label(),
            [len(self._starts[s]) for s in SPLITS],
            self.in_steps,
            self.target_steps,
            len(lay.channels),
            [c.name for c in lay.channels],
            f"memory-mapped cache {self._cache_file}" if data is None else "in memory",
        )

    def _resolve_step(self, time: np.ndarray) -> np.timedelta64 | float:
        if self.time_step_arg is not None:
            return parse_time_step(self.time_step_arg, time)
        if time.size < 2:
            return np.timedelta64(1, "h") if time.dtype.kind == "M" else 1.0
        values, counts = np.unique(np.diff(time), return_counts=True)
        return values[np.argmax(counts)]

    def _split(self, lay: Layout, stats: FrameStats) -> None:
        """Assign samples/time blocks to splits and list every split's window starts."""
        n_s, n_t = lay.n_samples, len(lay.time)
        diff = np.diff(lay.time)
        # pairs of consecutive frames exactly one step apart: a window may not cross any other pair
        ok_pair = (
            diff == self._time_step
            if lay.time.dtype.kind == "M"
            else np.isclose(diff, self._time_step)
        )
        bad_cum = np.concatenate([[0], np.cumsum(~ok_pair)])
        nan_frame = stats.nonfinite.sum(axis=2) > 0  # (S, T)
        if self.nan_policy != "mask":
            nan_frame = np.zeros_like(nan_frame)
        nan_cum = np.concatenate(
            [np.zeros((n_s, 1), np.int64), np.cumsum(nan_frame, axis=1)], axis=1
        )
        w = self.window

        def starts_in(samples: np.ndarray, lo: int, hi: int) -> np.ndarray:
            cand = np.arange(lo, hi - w + 1, self.stride)
            cand = cand[bad_cum[cand + w - 1] - bad_cum[cand] == 0]
            rows = [
                np.stack([np.full(cand.size, s), cand], axis=1)[
                    nan_cum[s, cand + w] - nan_cum[s, cand] == 0
                ]
                for s in samples
            ]
            return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)

        blocks: dict[str, tuple[np.ndarray, int, int]] = {}
        if self.periods["train"] is not None:
            for split in SPLITS:
                period = self.periods[split]
                if period is None:
                    blocks[split] = (np.zeros(0, np.int64), 0, 0)
                    continue
                sl = label_slice(lay.time, *period, f"{split}_period")
                lo, hi, _ = sl.indices(n_t)
                if hi <= lo:
                    raise ValueError(
                        f"data.{split}_period={period} selects no time step of {self._label()}: the "
                        f"selected data span {_fmt_time(lay.time[0])} .. {_fmt_time(lay.time[-1])}; "
                        f"the {split} split would be empty"
                    )
                blocks[split] = (np.arange(n_s), lo, hi)
            spans = sorted(
                (blocks[s][1], blocks[s][2], s) for s in SPLITS if blocks[s][2] > blocks[s][1]
            )
            for (_, hi_a, a), (lo_b, _, b) in zip(spans, spans[1:]):
                if lo_b < hi_a:
                    raise ValueError(
                        f"data.{a}_period={self.periods[a]} and data.{b}_period={self.periods[b]} "
                        "overlap; splits must not share time steps"
                    )
        elif n_s > 1:
            fr = np.asarray(self.split_fractions) / sum(self.split_fractions)
            order = np.random.default_rng(self.seed).permutation(n_s)
            # at least one trajectory in every split that asks for some
            counts = np.where(fr > 0, np.maximum(1, np.round(fr * n_s)), 0).astype(int)
            counts[0] = n_s - counts[1:].sum()
            if counts[0] < 1:
                raise ValueError(
                    f"{self._label()}: {n_s} samples along {lay.sample_dim!r} are too few for "
                    f"data.split_fractions={self.split_fractions}; the train split would be empty"
                )
            parts = np.split(order, np.cumsum(counts)[:-1])
            for split, part in zip(SPLITS, parts):
                blocks[split] = (np.sort(part), 0, n_t)
        else:
            # one series: contiguous time blocks; windows never cross a block edge
            fr = np.asarray(self.split_fractions) / sum(self.split_fractions)
            edges = np.concatenate([[0], np.cumsum(np.round(fr * n_t).astype(int))])
            edges[-1] = n_t
            for i, split in enumerate(SPLITS):
                blocks[split] = (np.array([0]), int(edges[i]), int(edges[i + 1]))
        for i, split in enumerate(SPLITS):
            samples, lo, hi = blocks[split]
            frames = np.zeros((n_s, n_t), bool)
            frames[np.ix_(samples, np.arange(lo, hi))] = True
            self._frames[split] = frames
            self._samples[split] = samples
            self._starts[split] = starts_in(samples, lo, hi)
            wanted = (
                self.periods[split] is not None
                if self.periods["train"] is not None
                else self.split_fractions[i] > 0
            )
            if wanted and len(self._starts[split]) == 0:
                raise ValueError(
                    self._empty_split_message(split, lo, hi, ok_pair, nan_frame, samples)
                )

    def _empty_split_message(
        self,
        split: str,
        lo: int,
        hi: int,
        ok_pair: np.ndarray,
        nan_frame: np.ndarray,
        samples: np.ndarray,
    ) -> str:
        n = hi - lo
        need = (
            f"one window needs in_steps + out_steps x rollout_steps = {self.in_steps} + "
            f"{self.out_steps} x {self.rollout_steps} = {self.window} consecutive steps"
        )
        where = f"{self._label()}: the {split} split"
        if self.periods["train"] is not None:
            where += f" (data.{split}_period={self.periods[split]})"
        if n == 0:
            return f"{where} is empty (no time step); change data.split_fractions or the periods"
        run, best = 0, 1
        for ok in ok_pair[lo : hi - 1]:
            run = run + 1 if ok else 0
            best = max(best, run + 1)
        fix = "reduce data.in_steps / data.out_steps / data.rollout_steps or enlarge the split"
        if best < self.window:
            return (
                f"{where} has {n} time steps, the longest run without a gap in the time axis is "
                f"{best} steps of {_fmt_step(self._time_step)}, but {need}: the window is longer "
                f"than the split; {fix}"
            )
        if nan_frame[samples, lo:hi].any():
            return (
                f"{where} has no window free of NaN frames (data.nan_policy='mask'); {need}; "
                "use data.nan_policy='fill' or clean the file"
            )
        return f"{where} has {n} time steps but no complete window: {need}; {fix}"

    # -- shapes and labels -------------------------------------------------------------------
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
        if self._time_step is None:
            self.setup()
        assert self._time_step is not None
        return self._time_step

    def dataset(self, split: str) -> Dataset:
        if self._stats is None:
            self.setup()
        if self._data is not None:
            return WindowDataset(self._data, self._starts[split], self.in_steps, self.target_steps)
        assert self._cache_file is not None
        return MemmapWindowDataset(
            self._cache_file, self._starts[split], self.in_steps, self.target_steps, self._fill
        )

    def window_info(self, split: str, indices: np.ndarray) -> WindowInfo:
        """Sample labels and last-input-time labels of windows ``indices`` of ``split``."""
        starts = self._starts[split][np.asarray(indices, dtype=np.int64)]
        time = self.coords[self.time_dim].values
        if self.sample_dim in self.coords:
            sample = self.coords[self.sample_dim].values[starts[:, 0]]
        else:
            sample = starts[:, 0]
        return WindowInfo(sample, time[starts[:, 1] + self.in_steps - 1])

    @property
    def climatology(self) -> np.ndarray:
        """Per-channel, per-pixel mean ``(C, H, W)`` of the training split (physical units), the
        reference of the anomalies in ACC; computed once, streaming over the frames."""
        if self._climatology is None:
            if self._stats is None:
                self.setup()
            self._climatology = self._frame_mean(self._frames["train"])
        return self._climatology

    def _frame_mean(self, frames: np.ndarray) -> np.ndarray:
        """NaN-ignoring mean over the frames ``(S, T)`` selected, per channel and pixel."""
        data = self._data if self._data is not None else np.load(self._cache_file, mmap_mode="r")
        n_s, n_t, n_c, n_h, n_w = data.shape
        total = np.zeros((n_c, n_h, n_w))
        count = np.zeros((n_c, n_h, n_w))
        per_block = max(1, READ_BLOCK_BYTES // (4 * n_c * n_h * n_w))
        for s in range(n_s):
            times = np.flatnonzero(frames[s])
            for a in range(0, times.size, per_block):
                block = np.asarray(data[s, times[a : a + per_block]], dtype=np.float64)
                finite = np.isfinite(block)
                total += np.where(finite, block, 0.0).sum(0)
                count += finite.sum(0)
        mean = total / np.maximum(count, 1)
        # a pixel never finite in training falls back to the channel mean
        assert self.normalization is not None
        fallback = np.broadcast_to(self.normalization.mean[:, None, None], mean.shape)
        return np.where(count > 0, mean, fallback).astype(np.float32)

    # -- the data check ----------------------------------------------------------------------
    def check(self) -> str:
        """A summary of what training would see: files, dims, channels, statistics, windows."""
        if self._stats is None:
            self.setup()
        lay, stats = self.layout(), self._stats
        assert stats is not None and self.normalization is not None
        time = lay.time
        lines = [f"data check: {type(self).__name__}"]
        lines.append(f"  files ({len(lay.files)}):")
        lines += [f"    {f.path}  ({f.time_index.size} time steps used)" for f in lay.files]
        y = lay.coords[lay.y_dim].values
        x = lay.coords[lay.x_dim].values
        order = "descending" if y.size > 1 and y[0] > y[-1] else "ascending"
        lines.append(
            f"  dims: time={lay.time_dim!r} level={lay.level_dim!r} y={lay.y_dim!r} x={lay.x_dim!r} "
            f"sample={lay.sample_dim!r}"
        )
        lines.append(
            f"  grid: {len(y)} x {len(x)}; {lay.y_dim} {y[0]:g} .. {y[-1]:g} ({order}), "
            f"{lay.x_dim} {x[0]:g} .. {x[-1]:g}; latitude weighting: "
            f"{'yes' if lay.latitude is not None else 'no'}"
        )
        gaps = int((~self._ok_pairs()).sum())
        lines.append(
            f"  time: {time.size} steps {_fmt_time(time[0])} .. {_fmt_time(time[-1])}, step "
            f"{_fmt_step(self.time_step)}, {gaps} gap(s)"
        )
        size_mb = float(np.prod(lay.shape)) * 4 / 2**20
        where = "in memory" if self._data is not None else f"memory-mapped cache {self._cache_file}"
        lines.append(
            f"  array (sample, time, channel, y, x): {lay.shape} float32, {size_mb:.1f} MiB, {where}"
        )
        lines.append(
            f"  {'channel':<12}{'variable':<16}{'level':>7}{'units':>12}{'train mean':>14}"
            f"{'train std':>12}{'min':>12}{'max':>12}{'NaN %':>8}"
        )
        pixels = len(lay.y_index) * len(lay.x_index)
        for c, ch in enumerate(lay.channels):
            units = str(lay.var_attrs.get(ch.variable, {}).get("units", ""))
            nan_pct = 100 * stats.nonfinite[..., c].sum() / (stats.nonfinite[..., c].size * pixels)
            lo = (
                np.nanmin(stats.minimum[..., c])
                if np.isfinite(stats.minimum[..., c]).any()
                else np.nan
            )
            hi = (
                np.nanmax(stats.maximum[..., c])
                if np.isfinite(stats.maximum[..., c]).any()
                else np.nan
            )
            level = "" if ch.level is None else f"{ch.level:g}"
            lines.append(
                f"  {ch.name:<12}{ch.variable:<16}{level:>7}{units[:11]:>12}"
                f"{self.normalization.mean[c]:>14.5g}{self.normalization.std[c]:>12.5g}"
                f"{lo:>12.5g}{hi:>12.5g}{nan_pct:>8.3g}"
            )
        lines.append(
            f"  windows: {self.in_steps} in + {self.out_steps} out x {self.rollout_steps} rollout "
            f"= {self.window} steps, stride {self.stride}"
        )
        for split in SPLITS:
            frames = self._frames[split]
            t_used = np.flatnonzero(frames.any(axis=0))
            span = (
                f"{_fmt_time(time[t_used[0]])} .. {_fmt_time(time[t_used[-1]])}"
                if t_used.size
                else "-"
            )
            lines.append(
                f"    {split:<6}{len(self._starts[split]):>8} windows  samples "
                f"{len(self._samples[split]):>4}  time {span}"
            )
        return "\n".join(lines)

    def _ok_pairs(self) -> np.ndarray:
        diff = np.diff(self.layout().time)
        if diff.dtype.kind == "m":
            return diff == self.time_step
        return np.isclose(diff, self.time_step)

    # -- what callbacks see (beamvq.protocols.ForecastData) --------------------------------
    def info(self) -> DataInfo:
        """Labels of the channels, the time axis and the grid (after setup)."""
        if self._stats is None:
            self.setup()
        lay = self.layout()
        channels = tuple(
            ChannelInfo(c.name, c.variable, c.level, dict(self.var_attrs.get(c.variable, {})))
            for c in lay.channels
        )

        def axis(dim: str | None, size: int) -> AxisInfo:
            if dim is not None and dim in self.coords:
                coord = self.coords[dim]
                return AxisInfo(dim, np.asarray(coord.values), dict(coord.attrs))
            return AxisInfo(dim or "", np.arange(size), {})

        ny, nx = self.grid
        return DataInfo(
            path=str(self.path),
            channels=channels,
            time=axis(self.time_dim, len(lay.time)),
            time_step=self.time_step,
            y=axis(self.y_dim, ny),
            x=axis(self.x_dim, nx),
            latitude=self.latitude,
            in_steps=self.in_steps,
            target_steps=self.target_steps,
        )

    def state_dict(self) -> dict:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state)

    def training_windows(self, max_windows: int | None = None, seed: Any = 0) -> Windows:
        """Indices and physical ``(x, y)`` of (a random subset of) training windows."""
        ds = self.dataset("train")
        idx = np.arange(len(ds))
        if max_windows is not None and max_windows < len(ds):
            idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_windows, replace=False))
        if idx.size == 0:
            return Windows(torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0))
        xs, ys = zip(*[(ds[i].x, ds[i].y) for i in idx])
        return Windows(torch.from_numpy(idx.astype(np.int64)), torch.stack(xs), torch.stack(ys))

    def training_targets(self, index: Tensor) -> Tensor:
        """The recorded futures ``(N, T_total, C, H, W)`` of training windows ``index``."""
        ds = self.dataset("train")
        idx = np.asarray(index.cpu(), dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return torch.empty(0)
        return torch.stack([ds[int(i)].y for i in idx])

    def unlabelled_inputs(self, max_inputs: int | None = None, seed: Any = 0) -> UnlabelledInputs:
        """Physical inputs ``(N, in_steps, C, H, W)`` of the training split with no recorded future.

        Per training sample, the inputs that start after its last window and end within that
        window's frames (``future_free_starts``): only frames the training windows already hold,
        never validation or test data. A random subset of ``max_inputs`` (``seed``: anything
        ``numpy.random.default_rng`` takes), in time order; an input's id is its position in the
        full list, the same in every epoch. Reference-free scorers search these.
        """
        ds = self.dataset("train")
        starts = future_free_starts(np.asarray(ds.starts), self.target_steps)
        ids = np.arange(len(starts), dtype=np.int64)
        if max_inputs is not None and len(starts) > max_inputs:
            ids = np.sort(
                np.random.default_rng(seed).choice(len(starts), max_inputs, replace=False)
            )
        return UnlabelledInputs(torch.from_numpy(ids), torch.from_numpy(ds.inputs(starts[ids])))

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


# ------------------------------------------------------------------------------------------
# statistics helpers
# ------------------------------------------------------------------------------------------
def _block_stats(block: np.ndarray, stats: FrameStats, where: tuple) -> None:
    """Fill ``stats[where]`` (one channel, a range of frames) from ``block (S, t, H, W)``."""
    finite = np.isfinite(block)
    count = finite.sum(axis=(2, 3))
    values = np.where(finite, block, 0.0).astype(np.float64)
    mean = values.sum(axis=(2, 3)) / np.maximum(count, 1)
    dev = np.where(finite, block - mean[:, :, None, None], 0.0)
    stats.count[where] = count
    stats.nonfinite[where] = block.shape[2] * block.shape[3] - count
    stats.mean[where] = mean
    stats.m2[where] = (dev * dev).sum(axis=(2, 3))
    with np.errstate(invalid="ignore"):
        stats.minimum[where] = np.where(
            count > 0, np.where(finite, block, np.inf).min(axis=(2, 3)), np.nan
        )
        stats.maximum[where] = np.where(
            count > 0, np.where(finite, block, -np.inf).max(axis=(2, 3)), np.nan
        )


def _combine(stats: FrameStats, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the frames ``(S, T)`` selected (exact, from frame stats)."""
    n = stats.count[frames].astype(np.float64)  # (F, C)
    total = n.sum(0)
    mean = (n * stats.mean[frames]).sum(0) / np.maximum(total, 1)
    m2 = stats.m2[frames].sum(0) + (n * (stats.mean[frames] - mean) ** 2).sum(0)
    std = np.sqrt(m2 / np.maximum(total, 1))
    return mean, np.where(std > 0, std, 1.0)


def _fmt_step(step: object) -> str:
    if isinstance(step, np.timedelta64):
        return pd.tseries.frequencies.to_offset(pd.Timedelta(step)).freqstr
    return f"{float(step):g}"  # type: ignore[arg-type]
