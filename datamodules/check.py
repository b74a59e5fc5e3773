"""The data check: a text summary of what training would see (``--data.init_args.check_only``).

Files and the time steps used of each, detected dims, grid and latitude order, time span, step
and gaps, the array's shape and where it lives, per channel its units, training mean/std,
min/max and NaN fraction, and the windows of every split (docs/data.md shows one).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from beamvq.datamodules.config import SPLITS, WindowConfig
from beamvq.datamodules.conventions import fmt_step, fmt_time
from beamvq.datamodules.reading import FrameStats
from beamvq.datamodules.scan import Layout
from beamvq.datamodules.splits import SplitPlan
from beamvq.protocols import Normalization


class CheckInput(NamedTuple):
    """Everything the report reads, after setup: ``where`` says where the array lives."""

    name: str
    layout: Layout
    stats: FrameStats
    normalization: Normalization
    time_step: np.timedelta64 | float
    windows: WindowConfig
    plan: SplitPlan
    where: str


def check_report(data: CheckInput) -> str:
    """The summary, one line per item (``NetCDFDataModule.check``)."""
    lines = [f"data check: {data.name}"]
    lines += _file_lines(data.layout)
    lines += _axis_lines(data)
    lines += _channel_lines(data)
    lines += _window_lines(data)
    return "\n".join(lines)


def _file_lines(lay: Layout) -> list[str]:
    lines = [f"  files ({len(lay.files)}):"]
    lines += [f"    {f.path}  ({f.time_index.size} time steps used)" for f in lay.files]
    lines.append(
        f"  dims: time={lay.time_dim!r} level={lay.level_dim!r} y={lay.y_dim!r} x={lay.x_dim!r} "
        f"sample={lay.sample_dim!r}"
    )
    return lines


def _axis_lines(data: CheckInput) -> list[str]:
    lay = data.layout
    y = lay.coords[lay.y_dim].values
    x = lay.coords[lay.x_dim].values
    order = "descending" if y.size > 1 and y[0] > y[-1] else "ascending"
    time = lay.time
    gaps = int((~data.plan.one_step).sum())
    size_mb = float(np.prod(lay.shape)) * 4 / 2**20
    return [
        f"  grid: {len(y)} x {len(x)}; {lay.y_dim} {y[0]:g} .. {y[-1]:g} ({order}), "
        f"{lay.x_dim} {x[0]:g} .. {x[-1]:g}; latitude weighting: "
        f"{'yes' if lay.latitude is not None else 'no'}",
        f"  time: {time.size} steps {fmt_time(time[0])} .. {fmt_time(time[-1])}, step "
        f"{fmt_step(data.time_step)}, {gaps} gap(s)",
        f"  array (sample, time, channel, y, x): {lay.shape} float32, {size_mb:.1f} MiB, "
        f"{data.where}",
    ]


def _extreme(values: np.ndarray, reduce: object) -> float:
    """NaN-ignoring min or max, NaN when no value is finite."""
    return reduce(values) if np.isfinite(values).any() else np.nan  # type: ignore[operator]


def _channel_lines(data: CheckInput) -> list[str]:
    lay, stats, norm = data.layout, data.stats, data.normalization
    lines = [
        f"  {'channel':<12}{'variable':<16}{'level':>7}{'units':>12}{'train mean':>14}"
        f"{'train std':>12}{'min':>12}{'max':>12}{'NaN %':>8}"
    ]
    pixels = len(lay.y_index) * len(lay.x_index)
    for c, ch in enumerate(lay.channels):
        units = str(lay.var_attrs.get(ch.variable, {}).get("units", ""))
        nonfinite = stats.nonfinite[..., c]
        nan_pct = 100 * nonfinite.sum() / (nonfinite.size * pixels)
        lo = _extreme(stats.minimum[..., c], np.nanmin)
        hi = _extreme(stats.maximum[..., c], np.nanmax)
        level = "" if ch.level is None else f"{ch.level:g}"
        lines.append(
            f"  {ch.name:<12}{ch.variable:<16}{level:>7}{units[:11]:>12}"
            f"{norm.mean[c]:>14.5g}{norm.std[c]:>12.5g}"
            f"{lo:>12.5g}{hi:>12.5g}{nan_pct:>8.3g}"
        )
    return lines


def _window_lines(data: CheckInput) -> list[str]:
    w, plan, time = data.windows, data.plan, data.layout.time
    lines = [
        f"  windows: {w.in_steps} in + {w.out_steps} out x {w.rollout_steps} rollout "
        f"= {w.length} steps, stride {w.stride}"
    ]
    for split in SPLITS:
        t_used = np.flatnonzero(plan.frames[split].any(axis=0))
        span = (
            f"{fmt_time(time[t_used[0]])} .. {fmt_time(time[t_used[-1]])}" if t_used.size else "-"
        )
        lines.append(
            f"    {split:<6}{len(plan.starts[split]):>8} windows  samples "
            f"{len(plan.samples[split]):>4}  time {span}"
        )
    return lines
