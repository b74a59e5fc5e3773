"""Reading the selection into one float32 array, and the statistics gathered on the way.

The files of a ``Layout`` are read one at a time, one channel and at most ``READ_BLOCK_BYTES`` of
frames per read, into an array ``(sample, time, channel, y, x)`` (in memory, or the memory map of
``beamvq.datamodules.cache``), so files larger than memory stream through. Every block leaves its
per-frame statistics (``FrameStats``: count of finite values, mean, sum of squared deviations,
min, max); any set of frames then combines exactly (Chan, Golub and LeVeque 1979, "Updating
formulae and a pairwise algorithm for computing sample variances"), so the training split's
normalization and the value checks need no second pass over the data.

The value checks, before any work: a variable entirely NaN, or NaN beyond
``data.quality.max_nan_fraction``, stops (``check_nans``); so does one holding values millions of
typical spreads away from its typical value (``check_outliers``: undeclared fill values such as
1e30, which would set the standard deviation and flatten everything else), found from the
per-frame minimum and maximum. A variable constant in the training split is normalized by 1
(not by a std of 0) and named in a warning (``training_moments``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr
from pytorch_lightning.utilities import rank_zero_warn

from beamvq.datamodules.conventions import coord_values, fmt_time, open_netcdf
from beamvq.datamodules.scan import Channel, FileTimes, Layout

# a read block is at most this many bytes of float32, so huge files stream through
READ_BLOCK_BYTES = 64 * 2**20
# a channel whose training std is at most this fraction of its largest magnitude is constant
# (float32 holds about 7 digits: below that the "variation" is rounding); it is normalized by 1
CONSTANT_RTOL = 1e-6
# a value this many typical spreads away from the typical value is not a measurement but an
# undeclared fill value (1e20, 1e30, 9.97e36): data.quality cannot tell it from data
OUTLIER_SPREADS = 1e6


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
        # read in the file's dim order, then transpose in memory: a lazy transpose would make
        # xarray ask zarr for a point-by-point (vectorized) selection, ~20x slower
        block = var.isel(sel | {lay.time_dim: t_sel}).load().transpose(*order).values
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


def _raw_moments(stats: FrameStats, frames: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-channel mean, std (0 for constant data), finite count and largest magnitude over the
    frames ``(S, T)`` selected (exact, from frame stats)."""
    n = stats.count[frames].astype(np.float64)  # (F, C)
    total = n.sum(0)
    mean = (n * stats.mean[frames]).sum(0) / np.maximum(total, 1)
    m2 = stats.m2[frames].sum(0) + (n * (stats.mean[frames] - mean) ** 2).sum(0)
    std = np.sqrt(m2 / np.maximum(total, 1))
    ends = np.abs(np.concatenate([stats.minimum[frames], stats.maximum[frames]]))
    magnitude = np.where(np.isnan(ends), 0.0, ends).max(0, initial=0.0)
    return mean, std, total, magnitude


def constant_channels(stats: FrameStats, frames: np.ndarray) -> np.ndarray:
    """``(C,)`` True where a channel is constant over the frames selected (``CONSTANT_RTOL``;
    also where it has no finite value there)."""
    _, std, _, magnitude = _raw_moments(stats, frames)
    return std <= CONSTANT_RTOL * magnitude


def combine(stats: FrameStats, frames: np.ndarray) -> Moments:
    """Per-channel mean and std over the frames ``(S, T)`` selected (exact, from frame stats);
    the std is 1 where the data are constant (``constant_channels``)."""
    mean, std, _, _ = _raw_moments(stats, frames)
    return Moments(mean, np.where(constant_channels(stats, frames), 1.0, std))


def _channel_name(ch: Channel) -> str:
    return f"{ch.variable!r}" + (f" at level {ch.level:g}" if ch.level is not None else "")


def training_moments(lay: Layout, stats: FrameStats, frames: np.ndarray, label: str) -> Moments:
    """``combine`` over the training frames ``(S, T)``, with a warning naming each variable that
    is constant there (or has no finite value there): it is normalized by 1 instead of its std
    and the model learns to forecast it as that constant."""
    _, std, total, _ = _raw_moments(stats, frames)
    for c in np.flatnonzero(constant_channels(stats, frames)):
        what = f"{label}: variable {_channel_name(lay.channels[c])}"
        if total[c] == 0:
            rank_zero_warn(
                f"{what} has no finite value in the training split: it is normalized with "
                "mean 0 and std 1; check data.splits and the variable's NaNs"
            )
            continue
        lo = np.nanmin(stats.minimum[frames][:, c])
        hi = np.nanmax(stats.maximum[frames][:, c])
        values = f"{lo:g} everywhere" if lo == hi else f"values {lo:g} .. {hi:g}"
        rank_zero_warn(
            f"{what} is constant in the training split ({values}, std {std[c]:.3g}): it is "
            "normalized by 1 instead of its std and forecast as a constant; drop it from "
            "data.variables if it should vary"
        )
    return combine(stats, frames)


def check_nans(lay: Layout, stats: FrameStats, max_nan_fraction: float) -> None:
    """The value checks before any work, naming the file and the variable: stop on an all-NaN
    variable, a NaN fraction above the threshold, or values far outside the variable's range
    (``check_outliers``)."""
    offset = 0
    pixels = len(lay.y_index) * len(lay.x_index)
    for ft in lay.files:
        sl = slice(offset, offset + ft.time_index.size)
        offset += ft.time_index.size
        for c, ch in enumerate(lay.channels):
            bad = int(stats.nonfinite[:, sl, c].sum())
            total = stats.nonfinite[:, sl, c].size * pixels
            what = f"variable {_channel_name(ch)}"
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
    check_outliers(lay, stats)


class Typical(NamedTuple):
    """A channel's typical value (median of the frame means) and spread (median range of the
    frames that vary, at least the median deviation of the frame means): a few frames holding
    wild values change neither."""

    center: float
    spread: float


def typical_values(stats: FrameStats, c: int) -> Typical:
    """The ``Typical`` value and spread of channel ``c`` from its per-frame statistics."""
    ok = stats.count[..., c] > 0
    means = stats.mean[..., c][ok]
    if means.size == 0:
        return Typical(0.0, 1.0)
    ranges = (stats.maximum[..., c] - stats.minimum[..., c])[ok]
    center = float(np.median(means))
    varying = ranges[ranges > 0]
    spread = max(
        float(np.median(varying)) if varying.size else 0.0,
        float(np.median(np.abs(means - center))),
    )
    return Typical(center, spread if spread > 0 else max(abs(center), 1.0))


def check_outliers(lay: Layout, stats: FrameStats) -> None:
    """Stop on a variable holding values ``OUTLIER_SPREADS`` typical spreads away from its
    typical value, naming the file, the variable and where the first such value is (frames from
    the per-frame statistics; the one frame is read again for the grid position)."""
    for c, ch in enumerate(lay.channels):
        typ = typical_values(stats, c)
        limit = OUTLIER_SPREADS * typ.spread
        with np.errstate(invalid="ignore"):
            wild = (stats.maximum[..., c] > typ.center + limit) | (
                stats.minimum[..., c] < typ.center - limit
            )
        if not wild.any():
            continue
        t, s = (int(v) for v in np.argwhere(wild.T)[0])  # the first in time
        where, value = _locate_value(lay, ch, t, s, typ.center)
        ft = _file_of(lay, t)[0]
        std = _raw_moments(stats, np.ones(stats.count.shape[:2], bool))[1]
        raise ValueError(
            f"{ft.path}: variable {_channel_name(ch)} holds values far outside its range: "
            f"{value:.4g} at {where}, while its typical values are {typ.center:.4g} +- "
            f"{typ.spread:.3g}; {int(wild.sum())} frame(s) hold such values, which would make "
            f"the std {std[c]:.3g} and flatten every other value. If they mark missing data, "
            "make them NaN (declare the value as the variable's _FillValue or missing_value "
            "attribute, or write NaN): data.quality.nan_policy then fills or masks them"
        )


def _file_of(lay: Layout, t: int) -> tuple[FileTimes, int]:
    """The file holding frame ``t`` of the selection, and the frame's position in the selection
    of that file."""
    offset = 0
    for ft in lay.files:
        if t < offset + ft.time_index.size:
            return ft, t - offset
        offset += ft.time_index.size
    raise IndexError(t)


def _label(value: object) -> str:
    try:
        return f"{float(value):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def _locate_value(lay: Layout, ch: Channel, t: int, s: int, center: float) -> tuple[str, float]:
    """``"time ... (time index i of the file), sample ..., y=... x=..."`` of the value farthest
    from ``center`` in frame ``t`` of sample ``s``, and that value (that frame is read again)."""
    ft, local = _file_of(lay, t)
    y_sel, y_post = index_plan(lay.y_index)
    x_sel, x_post = index_plan(lay.x_index)
    t_file = ft.time_index[local : local + 1]
    with open_netcdf(ft.path) as ds:
        var = ds[ch.variable]
        sel = _channel_selection(ds, var, lay, ch, {lay.y_dim: y_sel, lay.x_dim: x_sel})
        frame = _read_block(var, sel, t_file, lay, (y_post, x_post), ft.path)[s, 0]
    dev = np.where(np.isfinite(frame), np.abs(frame.astype(np.float64) - center), -1.0)
    iy, ix = np.unravel_index(int(np.argmax(dev)), frame.shape)
    sample = ""
    if lay.sample_dim is not None:
        sample = f", {lay.sample_dim} {_label(lay.coords[lay.sample_dim].values[s])}"
    where = (
        f"time {fmt_time(lay.time[t])} (time index {int(t_file[0])} of the file){sample}, "
        f"{lay.y_dim}={_label(lay.coords[lay.y_dim].values[iy])} "
        f"{lay.x_dim}={_label(lay.coords[lay.x_dim].values[ix])}"
    )
    return where, float(frame[iy, ix])


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
