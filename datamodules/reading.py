"""Reading the selection into one float32 array, and the statistics gathered on the way.

The files of a ``Layout`` are read one at a time, one channel and at most ``READ_BLOCK_BYTES`` of
frames per read, into an array ``(sample, time, channel, y, x)`` (in memory, or the memory map of
``beamvq.datamodules.cache``), so files larger than memory stream through. Every block leaves its
per-frame statistics (``FrameStats``: count of finite values, mean, sum of squared deviations,
min, max); any set of frames then combines exactly (Chan, Golub and LeVeque 1979, "Updating
formulae and a pairwise algorithm for computing sample variances"), so the training split's
normalization and the NaN checks need no second pass over the data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

from beamvq.datamodules.conventions import coord_values, open_netcdf
from beamvq.datamodules.scan import Channel, FileTimes, Layout

# a read block is at most this many bytes of float32, so huge files stream through
READ_BLOCK_BYTES = 64 * 2**20


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


class Moments(NamedTuple):
    """Per-channel mean and standard deviation (1 where the data are constant)."""

    mean: np.ndarray
    std: np.ndarray


def empty_stats(n_samples: int, n_times: int, n_channels: int) -> FrameStats:
    shape = (n_samples, n_times, n_channels)
    return FrameStats(
        count=np.zeros(shape, np.int64),
        nonfinite=np.zeros(shape, np.int64),
        mean=np.zeros(shape),
        m2=np.zeros(shape),
        minimum=np.full(shape, np.nan),
        maximum=np.full(shape, np.nan),
    )


def index_plan(index: np.ndarray) -> tuple[slice, np.ndarray | None]:
    """Read ``index`` as one slice (a step slice when regular), plus a numpy re-index if needed."""
    lo = int(index[0])
    if index.size == 1:
        return slice(lo, lo + 1), None
    step = int(index[1] - index[0])
    if step > 0 and np.array_equal(index, np.arange(lo, lo + step * index.size, step)):
        return slice(lo, int(index[-1]) + 1, step), None
    lo, hi = int(index.min()), int(index.max())
    return slice(lo, hi + 1), index - lo


def _channel_selection(
    ds: xr.Dataset, var: xr.DataArray, lay: Layout, ch: Channel, box: dict[str, slice]
) -> dict[str, object]:
    """``isel`` positions of one channel: the box, its level, position 0 of size-1 extra dims."""
    sel: dict[str, object] = dict(box)
    if ch.level is not None:
        assert lay.level_dim is not None
        have = coord_values(ds, lay.level_dim)
        sel[lay.level_dim] = int(np.flatnonzero(np.isclose(have, ch.level))[0])
    known = (lay.time_dim, lay.y_dim, lay.x_dim, lay.level_dim, lay.sample_dim)
    for d in var.dims:
        if d not in known:
            sel[d] = 0  # a size-1 extra dim (ERA5's ``number``/``expver``)
    return sel


def _read_block(
    var: xr.DataArray,
    sel: dict[str, object],
    t_idx: np.ndarray,
    lay: Layout,
    post: tuple[np.ndarray | None, np.ndarray | None],
    path: str,
) -> np.ndarray:
    """Frames ``t_idx`` of one channel as float32 ``(S, t, y, x)`` in the box's order;
    ``post`` re-indexes y and x after the read (a box that is not one slice)."""
    t_sel, t_post = index_plan(t_idx)
    order = [d for d in (lay.sample_dim, lay.time_dim, lay.y_dim, lay.x_dim) if d]
    try:
        block = var.isel(sel | {lay.time_dim: t_sel}).transpose(*order).values
    except Exception as err:
        raise ValueError(
            f"{path}: cannot read variable {var.name!r} (time positions "
            f"{int(t_idx[0])}..{int(t_idx[-1])}): {type(err).__name__}: {err}"
        ) from err
    if block.dtype.kind not in "fiu":
        raise ValueError(f"{path}: variable {var.name!r} has type {block.dtype}; expected numbers")
    block = block.astype(np.float32, copy=False)
    if lay.sample_dim is None:
        block = block[None]
    if t_post is not None:
        block = block[:, t_post]
    y_post, x_post = post
    if y_post is not None:
        block = block[:, :, y_post]
    if x_post is not None:
        block = block[:, :, :, x_post]
    return block


def _read_file(ft: FileTimes, lay: Layout, out: np.ndarray, stats: FrameStats, offset: int) -> None:
    """Every channel of one file into ``out[:, offset:...]``, block by block."""
    n_s, _, _, n_h, n_w = lay.shape
    frames_per_block = max(1, READ_BLOCK_BYTES // (4 * n_s * n_h * n_w))
    y_sel, y_post = index_plan(lay.y_index)
    x_sel, x_post = index_plan(lay.x_index)
    box = {lay.y_dim: y_sel, lay.x_dim: x_sel}
    with open_netcdf(ft.path) as ds:
        for c, ch in enumerate(lay.channels):
            var = ds[ch.variable]
            sel = _channel_selection(ds, var, lay, ch, box)
            for a in range(0, ft.time_index.size, frames_per_block):
                t_idx = ft.time_index[a : a + frames_per_block]
                block = _read_block(var, sel, t_idx, lay, (y_post, x_post), ft.path)
                t0 = offset + a
                t1 = t0 + block.shape[1]
                out[:, t0:t1, c] = block
                block_stats(block, stats, (slice(None), slice(t0, t1), c))


def read_into(lay: Layout, out: np.ndarray) -> FrameStats:
    """Read the selection into ``out (S, T, C, H, W)`` block by block; per-frame statistics.

    Files are opened one at a time and closed after reading; a block is at most
    ``READ_BLOCK_BYTES``, so this streams files larger than memory into a memory map.
    """
    n_s, n_t, n_c, _, _ = lay.shape
    stats = empty_stats(n_s, n_t, n_c)
    offset = 0
    for ft in lay.files:
        _read_file(ft, lay, out, stats, offset)
        offset += ft.time_index.size
    return stats


def block_stats(block: np.ndarray, stats: FrameStats, where: tuple) -> None:
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


def combine(stats: FrameStats, frames: np.ndarray) -> Moments:
    """Per-channel mean and std over the frames ``(S, T)`` selected (exact, from frame stats)."""
    n = stats.count[frames].astype(np.float64)  # (F, C)
    total = n.sum(0)
    mean = (n * stats.mean[frames]).sum(0) / np.maximum(total, 1)
    m2 = stats.m2[frames].sum(0) + (n * (stats.mean[frames] - mean) ** 2).sum(0)
    std = np.sqrt(m2 / np.maximum(total, 1))
    return Moments(mean, np.where(std > 0, std, 1.0))


def check_nans(lay: Layout, stats: FrameStats, max_nan_fraction: float) -> None:
    """Stop on an all-NaN variable or a NaN fraction above the threshold, naming the file."""
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
            if bad / total > max_nan_fraction:
                raise ValueError(
                    f"{ft.path}: {what} has {bad} NaN/Inf/_FillValue values "
                    f"({100 * bad / total:.3g}% of it), above data.quality.max_nan_fraction="
                    f"{max_nan_fraction:g}; clean the file, or raise "
                    "data.quality.max_nan_fraction and choose data.quality.nan_policy "
                    "('fill' or 'mask')"
                )


def fill_nans(data: np.ndarray, fill: np.ndarray) -> None:
    """Replace the NaNs of ``data (S, T, C, H, W)`` by ``fill[c]``, in place, channel by channel."""
    for c in range(data.shape[2]):
        channel = data[:, :, c]
        channel[~np.isfinite(channel)] = fill[c]


def frame_mean(data: np.ndarray, frames: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """NaN-ignoring mean ``(C, H, W)`` over the frames ``(S, T)`` selected, per channel and pixel;
    a pixel never finite there takes ``fallback[c]``. Streams over ``data`` (a memory map too)."""
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
    return np.where(count > 0, mean, np.broadcast_to(fallback[:, None, None], mean.shape)).astype(
        np.float32
    )
