"""What ``setup`` makes of the files: the array or its memory map, statistics, splits, labels.

``prepare`` runs the checks and plans that need the values (the NaN checks, the time step, the
split plan), the training split's normalization, and the NaN policy ``"fill"`` (in place in
memory; per item for the memory map, which stays as read). The result, ``PreparedData``, cuts
the windows of a split and labels them (``beamvq.protocols.DataInfo``, ``WindowInfo``).
Forecasts from inputs alone (``beamvq.datamodules.own_inputs``) make a ``PreparedData`` of one
split, ``INPUTS``, whose windows hold no target frames and whose ``normalization`` is None.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from beamvq.datamodules.config import SPLITS, QualityConfig, SplitConfig, WindowConfig
from beamvq.datamodules.reading import (
    FrameStats,
    check_nans,
    fill_nans,
    frame_mean,
    training_moments,
)
from beamvq.datamodules.scan import Layout, files_label
from beamvq.datamodules.splits import SplitInput, SplitPlan, plan_splits, resolve_step
from beamvq.datamodules.windows import MemmapWindowDataset, WindowDataset
from beamvq.protocols import AxisInfo, ChannelInfo, DataInfo, Normalization, WindowInfo

log = logging.getLogger(__name__)

# the one split of a forecast from inputs alone (beamvq.datamodules.own_inputs): no target frames
INPUTS = "inputs"


class PreparedData(NamedTuple):
    """The data after setup: ``data`` is the in-memory array ``(S, T, C, H, W)`` or None when the
    windows come from the memory-mapped ``cache_file``; ``fill`` the per-channel values that
    replace NaNs per item (memory map and ``"fill"`` policy only); ``normalization`` is the
    training split's, or None for inputs alone (the checkpoint's statistics normalize them)."""

    layout: Layout
    data: np.ndarray | None
    cache_file: Path | None
    stats: FrameStats
    fill: np.ndarray | None
    time_step: np.timedelta64 | float
    plan: SplitPlan
    normalization: Normalization | None

    @property
    def where(self) -> str:
        """Where the array lives, as the data check and the log say it."""
        return "in memory" if self.data is not None else f"memory-mapped cache {self.cache_file}"

    def source(self) -> np.ndarray:
        """The array the windows are cut from (the memory map opened read-only when cached)."""
        if self.data is not None:
            return self.data
        return np.load(self.cache_file, mmap_mode="r")

    def starts(self, split: str) -> np.ndarray:
        """The window starts ``(N, 2)`` of ``split``; inputs alone have no other split."""
        if split not in self.plan.starts and INPUTS in self.plan.starts:
            label = files_label([f.path for f in self.layout.files])
            raise ValueError(
                f"{label}: no {split!r} windows: the data were set up to forecast from inputs alone "
                "(data.predict.init: last / every / times, for beamvq predict), which have no "
                "splits and no recorded future; what needs them needs data.predict.init: split"
            )
        return self.plan.starts[split]

    def dataset(self, split: str, windows: WindowConfig) -> WindowDataset | MemmapWindowDataset:
        starts = self.starts(split)
        # the inputs' windows hold no future (y has 0 frames)
        target = 0 if split == INPUTS else windows.target_steps
        if self.data is not None:
            return WindowDataset(self.data, starts, windows.in_steps, target)
        assert self.cache_file is not None
        return MemmapWindowDataset(self.cache_file, starts, windows.in_steps, target, self.fill)

    def climatology(self) -> np.ndarray:
        """Per-channel, per-pixel training mean ``(C, H, W)``; a pixel never finite in training
        falls back to the channel mean."""
        assert self.normalization is not None, "inputs alone have no training split"
        return frame_mean(self.source(), self.plan.frames["train"], self.normalization.mean)

    def window_info(self, split: str, indices: np.ndarray, in_steps: int) -> WindowInfo:
        """Sample labels and last-input-time labels of windows ``indices`` of ``split``."""
        lay = self.layout
        starts = self.starts(split)[np.asarray(indices, dtype=np.int64)]
        time = lay.coords[lay.time_dim].values
        if lay.sample_dim is not None:
            sample = lay.coords[lay.sample_dim].values[starts[:, 0]]
        else:
            sample = starts[:, 0]
        return WindowInfo(sample, time[starts[:, 1] + in_steps - 1])

    def info(self, path: str, windows: WindowConfig) -> DataInfo:
        """Labels of the channels, the time axis and the grid."""
        lay = self.layout
        channels = tuple(
            ChannelInfo(c.name, c.variable, c.level, dict(lay.var_attrs.get(c.variable, {})))
            for c in lay.channels
        )
        return DataInfo(
            path=path,
            channels=channels,
            time=self._axis(lay.time_dim),
            time_step=self.time_step,
            y=self._axis(lay.y_dim),
            x=self._axis(lay.x_dim),
            latitude=lay.latitude,
            in_steps=windows.in_steps,
            target_steps=windows.target_steps,
        )

    def _axis(self, dim: str) -> AxisInfo:
        coord = self.layout.coords[dim]
        return AxisInfo(dim, np.asarray(coord.values), dict(coord.attrs))


def prepare(
    lay: Layout,
    data: np.ndarray | None,
    cache_file: Path | None,
    stats: FrameStats,
    windows: WindowConfig,
    splits: SplitConfig,
    quality: QualityConfig,
    time_step: str | None,
    label: str,
) -> PreparedData:
    """Check the values, plan the splits, take the training statistics, apply ``"fill"``."""
    check_nans(lay, stats, quality.max_nan_fraction)
    step = resolve_step(lay.time, time_step)
    nan_frames = stats.nonfinite.sum(axis=2) > 0
    split_input = SplitInput(lay.time, lay.n_samples, lay.sample_dim, nan_frames, label)
    plan = plan_splits(split_input, windows, splits, quality.nan_policy, step)
    mean, std = training_moments(lay, stats, plan.frames["train"], label)
    fill = None
    if stats.nonfinite.sum() and quality.nan_policy == "fill":
        if data is None:
            fill = mean.astype(np.float32)  # the memory-mapped windows fill per item
        else:
            # once, in place: the windows then hold no NaN and need no per-item work
            fill_nans(data, mean.astype(np.float32))
    normalization = Normalization(mean.astype(np.float32), std.astype(np.float32))
    ready = PreparedData(lay, data, cache_file, stats, fill, step, plan, normalization)
    log.info(
        "%s: %s windows (train/val/test) of %d+%d steps, %d channel(s) %s, %s",
        label,
        [len(plan.starts[s]) for s in SPLITS],
        windows.in_steps,
        windows.target_steps,
        len(lay.channels),
        [c.name for c in lay.channels],
        ready.where,
    )
    return ready
