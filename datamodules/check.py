"""The data check: a text summary of what training would see (``--data.init_args.check_only``).

Files and the time steps used of each, detected dims, grid and latitude order, time span, step
and gaps, the array's shape and where it lives, per channel its units, training mean/std,
min/max and NaN fraction, the windows of every split (docs/data.md shows one), and warnings:
variables constant in the training split, a fit without validation windows.

The checks of a split that a run needs (``require_windows``: ``validate``, ``test`` and
``predict`` refuse a split without windows before any work; ``validation_warning``: ``fit``
without validation windows trains without validation) also live here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from beamvq.checkpoint_files import Refusal
from beamvq.datamodules.config import SPLITS, SplitConfig, WindowConfig
from beamvq.datamodules.conventions import fmt_step, fmt_time
from beamvq.datamodules.reading import FrameStats, constant_channels
from beamvq.datamodules.scan import Layout
from beamvq.datamodules.splits import SplitPlan
from beamvq.protocols import Normalization


class EmptySplit(Refusal, ValueError):
    """A run that needs the windows of a split without any (the console prints it in one line)."""


def _split_setting(splits: SplitConfig, split: str) -> str:
    if splits.by_date:
        return f"data.splits.{split}_period={splits.periods[split]}"
    return f"data.splits.fractions={list(splits.fractions)}"


def _split_content(plan: SplitPlan, split: str) -> str:
    frames = plan.frames[split]
    if not frames.any():
        return "holds no frame"
    samples = int(frames.any(axis=1).sum())
    return f"holds {int(frames.sum())} frames ({samples} sample(s)) but no complete window"


def require_windows(plan: SplitPlan, split: str, splits: SplitConfig, label: str, run: str) -> None:
    """Refuse ``run`` (``"beamvq predict"``...) on ``split`` when it has no window, naming the
    split, what it holds and the setting that made it so."""
    if len(plan.starts[split]) > 0:
        return
    also = " or set data.splits.predict_split" if "predict" in run else ""
    raise EmptySplit(
        f"{label}: {run} needs windows of the {split} split, but it "
        f"{_split_content(plan, split)} ({_split_setting(splits, split)}): it would write "
        f"nothing. Give the {split} split data{also}."
    )


def check_stage_windows(
    plan: SplitPlan, splits: SplitConfig, stage: str | None, label: str
) -> str | None:
    """Before ``stage`` runs: refuse ``validate``/``test``/``predict`` on a split without
    windows (``require_windows``); for ``fit`` (or no stage) return the ``validation_warning``
    to give, if any."""
    if stage == "predict":
        split = splits.predict_split
        run = f"beamvq predict (data.splits.predict_split={split!r})"
        require_windows(plan, split, splits, label, run)
    elif stage in ("validate", "test"):
        require_windows(
            plan, "val" if stage == "validate" else "test", splits, label, f"beamvq {stage}"
        )
    elif stage in (None, "fit"):
        return validation_warning(plan, splits, label)
    return None


def validation_warning(plan: SplitPlan, splits: SplitConfig, label: str) -> str | None:
    """What ``fit`` does without validation windows, or None when there are some."""
    if len(plan.starts["val"]) > 0:
        return None
    return (
        f"{label}: the val split {_split_content(plan, 'val')} "
        f"({_split_setting(splits, 'val')}): fit trains without validation, so no val/* metric "
        "is logged and a ModelCheckpoint monitoring one saves no checkpoint (LastCheckpoint "
        "still writes last.ckpt every epoch)"
    )


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
    lines += _warning_lines(data)
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


def _warning_lines(data: CheckInput) -> list[str]:
    plan, warnings = data.plan, []
    if "train" in plan.frames:
        constant = constant_channels(data.stats, plan.frames["train"])
        warnings += [
            f"variable {ch.name!r} is constant in the training split: normalized by 1, "
            "forecast as a constant"
            for ch, flag in zip(data.layout.channels, constant)
            if flag
        ]
    if "val" in plan.starts and len(plan.starts["val"]) == 0:
        warnings.append("no validation window: fit trains without validation")
    return [f"  warning: {w}" for w in warnings]
