"""Forecasts from the user's own inputs: ``beamvq predict`` on a file with no split and no future.

``data.predict`` (``PredictConfig``) chooses what ``predict`` forecasts from. The windows of a
split (``"split"``) need a training split, a validation and test split and a recorded future; a
file of inputs alone has none of them. Its inputs are instead every sample's latest ``in_steps``
consecutive frames (``"last"``), every such input (``"every"``, ``data.windows.stride`` apart) or
the inputs ending at chosen init times (``"times"``). They form one split named ``"inputs"``
(``INPUTS``), whose windows carry no target frames.

Nothing is computed from the inputs' values but the NaN check: the statistics that normalize
them are the checkpoint's (``beamvq.normalization``: the module's buffers, restored with the
weights), so the datamodule's ``normalization`` is ``None``; the variables, their order and the
grid are compared with the checkpoint's data identity when the weights load
(``beamvq.checkpointing.check_checkpoint``). Every refusal names the file (or the YAML key) and
comes before any forecast: too few frames, an init time the file does not hold, inputs across a
gap in the time axis or NaNs that only the training mean could fill.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from beamvq.datamodules.config import PredictConfig, QualityConfig, WindowConfig
from beamvq.datamodules.conventions import fmt_step, fmt_time, one_step_pairs
from beamvq.datamodules.prepared import INPUTS, PreparedData
from beamvq.datamodules.reading import FrameStats, check_nans
from beamvq.datamodules.scan import Layout
from beamvq.datamodules.splits import (
    Admissible,
    Block,
    SplitError,
    SplitPlan,
    resolve_step,
    window_starts,
)

__all__ = ["INPUTS", "check_frames", "inputs_hint", "inputs_mode", "prepare_inputs"]

log = logging.getLogger(__name__)

# stages that need the splits (and a recorded future): own inputs are for predict only
SPLIT_STAGES = ("fit", "validate", "test")


def inputs_mode(
    config: PredictConfig, stage: str | None, n_times: int, windows: WindowConfig
) -> str | None:
    """The own-inputs mode (``"last"``, ``"every"``, ``"times"``) for ``stage``, or None for the
    windows of the splits; ``n_times`` is the file's frame count after selection (metadata)."""
    if config.init == "split":
        return None
    if config.from_inputs:
        if stage in SPLIT_STAGES:
            raise ValueError(
                f"data.predict.init={config.init!r} forecasts from inputs alone (beamvq "
                f"predict); beamvq {stage} needs the train/val/test splits: set "
                "data.predict.init: auto (or split)"
            )
        return config.init
    if stage != "predict":  # auto: the splits, as before
        return None
    if config.times is not None:
        return "times"
    # a file shorter than one window records no future: its inputs are all it offers
    return "last" if n_times < windows.length else None


@contextlib.contextmanager
def inputs_hint(stage: str | None) -> Iterator[None]:
    """In ``predict``, a refusal of the splits (a split without a window, too few samples) says
    how to forecast from the file's inputs alone instead."""
    try:
        yield
    except SplitError as err:
        if stage != "predict":
            raise
        raise SplitError(
            f"{err}\n(to forecast from this file's inputs alone, with no splits and no recorded "
            "future, set data.predict.init: last, every or times)"
        ) from err


def check_frames(n_times: int, in_steps: int, label: str) -> None:
    """Refuse a file with fewer frames than one input, naming it and the count."""
    if n_times < in_steps:
        raise ValueError(
            f"{label}: {n_times} time step(s), but a forecast starts from in_steps={in_steps} "
            "input frames (data.windows.in_steps, the model's T_in); give at least "
            f"{in_steps} consecutive frames"
        )


def _admissible(lay: Layout, stats: FrameStats, step: object, mask: bool) -> Admissible:
    """Gaps in the time axis and (under the ``"mask"`` policy) NaN frames, as ``splits`` counts
    them."""
    n_s, n_t = lay.n_samples, len(lay.time)
    ok_pair = one_step_pairs(lay.time, step)
    nan = (stats.nonfinite.sum(axis=2) > 0) if mask else np.zeros((n_s, n_t), bool)
    return Admissible(
        np.concatenate([[0], np.cumsum(~ok_pair)]),
        np.concatenate([np.zeros((n_s, 1), np.int64), np.cumsum(nan, axis=1)], axis=1),
    )


def _sample_label(lay: Layout, s: int) -> str:
    if lay.sample_dim is None:
        return "the series"
    return f"sample {lay.coords[lay.sample_dim].values[s]!r} along {lay.sample_dim!r}"


def _no_input(label: str, in_steps: int, step: object, where: str) -> str:
    return (
        f"{label}: {where} has no input of in_steps={in_steps} consecutive frames one time "
        f"step ({fmt_step(step)}) apart and free of NaN frames"
    )


def _last_starts(lay: Layout, adm: Admissible, in_steps: int, step: object, label: str):
    """Every sample's latest admissible input."""
    every = window_starts(Block(np.arange(lay.n_samples), 0, len(lay.time)), in_steps, 1, adm)
    rows = []
    for s in range(lay.n_samples):
        mine = every[every[:, 0] == s]
        if len(mine) == 0:
            raise ValueError(_no_input(label, in_steps, step, _sample_label(lay, s)))
        rows.append(mine[-1])
    return np.stack(rows).astype(np.int64)


def _time_position(time: np.ndarray, value: str, label: str) -> int:
    """The position of the init time ``value`` on the file's time axis."""
    dated = time.dtype.kind == "M"
    try:
        if dated:
            target = pd.Timestamp(value).to_datetime64().astype("datetime64[ns]")
            hit = np.flatnonzero(time == target)
        else:
            hit = np.flatnonzero(np.isclose(time, float(value)))
    except (ValueError, TypeError) as err:
        kind = "an ISO date such as 2000-01-03T06:00" if dated else "a number"
        raise ValueError(f"data.predict.times: {value!r} must be {kind} ({err})") from err
    if hit.size == 0:
        raise ValueError(
            f"data.predict.times: {value} is not a time of {label} (its {time.size} time steps "
            f"span {fmt_time(time[0])} .. {fmt_time(time[-1])})"
        )
    return int(hit[0])


def _time_starts(
    lay: Layout, adm: Admissible, times: list[str], in_steps: int, label: str
) -> np.ndarray:
    """The inputs ending at each init time of ``times``, for every sample (sample-major)."""
    rows = []
    t0s = []
    for value in times:
        end = _time_position(lay.time, value, label)
        t0 = end - in_steps + 1
        if t0 < 0:
            raise ValueError(
                f"data.predict.times: {value}: {label} has {end + 1} frame(s) up to it, but a "
                f"forecast starts from in_steps={in_steps} input frames"
            )
        if adm.gaps[end] - adm.gaps[t0] != 0:
            raise ValueError(
                f"data.predict.times: {value}: the {in_steps} frames of {label} ending there "
                "are not one time step apart (a gap in the time axis)"
            )
        t0s.append((value, t0))
    for s in range(lay.n_samples):
        for value, t0 in t0s:
            if adm.nan[s, t0 + in_steps] - adm.nan[s, t0] != 0:
                raise ValueError(
                    f"data.predict.times: {value}: the input of {_sample_label(lay, s)} in "
                    f"{label} touches a frame with NaNs (data.quality.nan_policy='mask')"
                )
            rows.append((s, t0))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def input_starts(
    mode: str,
    lay: Layout,
    adm: Admissible,
    windows: WindowConfig,
    config: PredictConfig,
    step: object,
    label: str,
) -> np.ndarray:
    """The ``(sample, t0)`` starts of the inputs of ``mode``."""
    if mode == "last":
        return _last_starts(lay, adm, windows.in_steps, step, label)
    if mode == "times":
        assert config.times is not None
        return _time_starts(lay, adm, list(config.times), windows.in_steps, label)
    block = Block(np.arange(lay.n_samples), 0, len(lay.time))
    starts = window_starts(block, windows.in_steps, windows.stride, adm)
    if len(starts) == 0:
        raise ValueError(_no_input(label, windows.in_steps, step, "the file"))
    return starts


def prepare_inputs(
    lay: Layout,
    data: np.ndarray | None,
    cache_file: Path | None,
    stats: FrameStats,
    windows: WindowConfig,
    config: PredictConfig,
    quality: QualityConfig,
    time_step: str | None,
    label: str,
    mode: str,
) -> PreparedData:
    """The file's inputs of ``mode`` as the one split ``INPUTS``, with no statistics of their
    own (``normalization`` is None: the checkpoint's normalize them)."""
    check_nans(lay, stats, quality.max_nan_fraction)
    if stats.nonfinite.sum() and quality.nan_policy == "fill":
        raise ValueError(
            f"{label}: {int(stats.nonfinite.sum())} NaN/Inf values in the inputs; "
            "data.quality.nan_policy='fill' replaces them by the training mean, which the data "
            "alone do not give: use data.quality.nan_policy='mask' (inputs that touch a NaN "
            "frame are skipped) or fill the file"
        )
    step = resolve_step(lay.time, time_step)
    adm = _admissible(lay, stats, step, quality.nan_policy == "mask")
    starts = input_starts(mode, lay, adm, windows, config, step, label)
    frames = np.zeros((lay.n_samples, len(lay.time)), bool)
    for s, t0 in starts.tolist():
        frames[s, t0 : t0 + windows.in_steps] = True
    samples = np.unique(starts[:, 0])
    one_step = one_step_pairs(lay.time, step)
    plan = SplitPlan({INPUTS: samples}, {INPUTS: starts}, {INPUTS: frames}, one_step)
    log.info(
        "%s: %d input(s) of %d frames (data.predict.init: %s), channel(s) %s; the checkpoint's "
        "statistics normalize them",
        label, len(starts), windows.in_steps, mode, [c.name for c in lay.channels],
    )  # fmt: skip
    return PreparedData(lay, data, cache_file, stats, None, step, plan, None)
