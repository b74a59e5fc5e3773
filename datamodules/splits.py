"""Split planning and window starts: which frames each split owns, where its windows start.

A window is ``in_steps + out_steps × rollout_steps`` consecutive frames one ``time_step`` apart
(``WindowConfig``). It never bridges a gap in the time axis (a pair of consecutive frames that
is not exactly one step apart), never crosses a split boundary and never mixes samples; with the
``"mask"`` NaN policy it touches no frame holding a NaN. Splits (``SplitConfig``) never overlap:

- date splits (``train_period``...): every sample in each period;
- otherwise, with a sample dim of more than one sample: by sample (trajectory), shuffled with
  ``seed``, in ``fractions`` (at least one sample in every split that asks for some);
- otherwise (one series): contiguous time blocks in ``fractions``.

A split that asks for data but has no window stops with one message saying why (empty, shorter
than a window, gaps, NaN frames). Inputs after a split's last window that hold only that split's
frames have no recorded future (``future_free_starts``): reference-free scorers search them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from beamvq.datamodules.config import SPLITS, SplitConfig, WindowConfig
from beamvq.datamodules.conventions import (
    fmt_step,
    fmt_time,
    label_slice,
    most_common_step,
    one_step_pairs,
    parse_time_step,
)


class SplitError(ValueError):
    """A split that asks for data has no window, or too few samples to split: what a file of
    inputs alone meets (``beamvq predict`` then says how to forecast from its inputs)."""


class Block(NamedTuple):
    """The frames of one split: ``samples`` (positions along the sample dim), times ``[lo, hi)``."""

    samples: np.ndarray
    lo: int
    hi: int


class Admissible(NamedTuple):
    """Cumulative counts that say in O(1) whether a window is admissible: ``gaps (T,)`` counts
    the gaps before each frame, ``nan (S, T + 1)`` the NaN frames (mask policy) before each."""

    gaps: np.ndarray
    nan: np.ndarray


class SplitPlan(NamedTuple):
    """Per split: ``samples``, the window ``starts (N, 2)`` of ``(sample, t0)`` and the
    ``frames (S, T)`` it owns; ``one_step (T - 1,)`` marks the consecutive frames one step apart
    (the others are gaps)."""

    samples: dict[str, np.ndarray]
    starts: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    one_step: np.ndarray


def resolve_step(time: np.ndarray, time_step: str | None) -> np.timedelta64 | float:
    """The spacing of a window's frames: ``time_step`` when given, else the most common one."""
    if time_step is not None:
        return parse_time_step(time_step, time)
    return most_common_step(time)


def window_starts(block: Block, length: int, stride: int, admissible: Admissible) -> np.ndarray:
    """Starts ``(N, 2)`` of ``(sample, t0)`` of every admissible window inside ``block``."""
    cand = np.arange(block.lo, block.hi - length + 1, stride)
    cand = cand[admissible.gaps[cand + length - 1] - admissible.gaps[cand] == 0]
    rows = [
        np.stack([np.full(cand.size, s), cand], axis=1)[
            admissible.nan[s, cand + length] - admissible.nan[s, cand] == 0
        ]
        for s in block.samples
    ]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)


def period_blocks(time: np.ndarray, n_samples: int, splits: SplitConfig, label: str) -> dict:
    """Date splits: every sample inside each split's period; periods must not overlap."""
    blocks: dict[str, Block] = {}
    for split, period in splits.periods.items():
        if period is None:
            blocks[split] = Block(np.zeros(0, np.int64), 0, 0)
            continue
        lo, hi, _ = label_slice(time, *period, f"splits.{split}_period").indices(time.size)
        if hi <= lo:
            raise ValueError(
                f"data.splits.{split}_period={period} selects no time step of {label}: the "
                f"selected data span {fmt_time(time[0])} .. {fmt_time(time[-1])}; "
                f"the {split} split would be empty"
            )
        blocks[split] = Block(np.arange(n_samples), lo, hi)
    spans = sorted((b.lo, b.hi, s) for s, b in blocks.items() if b.hi > b.lo)
    for (_, hi_a, a), (lo_b, _, b) in zip(spans, spans[1:]):
        if lo_b < hi_a:
            raise ValueError(
                f"data.splits.{a}_period={splits.periods[a]} and "
                f"data.splits.{b}_period={splits.periods[b]} overlap; splits must not share "
                "time steps"
            )
    return blocks


def sample_blocks(
    n_samples: int, n_times: int, splits: SplitConfig, sample_dim: str | None, label: str
) -> dict:
    """Splits by sample (trajectory): a seeded shuffle cut in ``fractions``."""
    fr = np.asarray(splits.fractions) / sum(splits.fractions)
    order = np.random.default_rng(splits.seed).permutation(n_samples)
    # at least one trajectory in every split that asks for some
    counts = np.where(fr > 0, np.maximum(1, np.round(fr * n_samples)), 0).astype(int)
    counts[0] = n_samples - counts[1:].sum()
    if counts[0] < 1:
        raise SplitError(
            f"{label}: {n_samples} samples along {sample_dim!r} are too few for "
            f"data.splits.fractions={splits.fractions}; the train split would be empty"
        )
    parts = np.split(order, np.cumsum(counts)[:-1])
    blocks = {split: Block(np.sort(part), 0, n_times) for split, part in zip(SPLITS, parts)}
    if splits.subsets_samples:
        blocks.update(labelled_blocks(parts[0], n_times, splits, label))
    return blocks


def labelled_blocks(train: np.ndarray, n_times: int, splits: SplitConfig, label: str) -> dict:
    """The training split's first ``train_samples`` samples (in shuffle order) as ``train`` and
    the next ``unlabelled_samples`` as ``unlabelled`` (inputs only)."""
    n = len(train) if splits.train_samples is None else int(splits.train_samples)
    m = int(splits.unlabelled_samples)
    if n + m > len(train):
        raise ValueError(
            f"{label}: data.splits.train_samples={splits.train_samples} + "
            f"data.splits.unlabelled_samples={m} exceed the {len(train)} samples of the training "
            "split"
        )
    return {
        "train": Block(np.sort(train[:n]), 0, n_times),
        "unlabelled": Block(np.sort(train[n : n + m]), 0, n_times),
    }


def time_blocks(n_times: int, splits: SplitConfig) -> dict:
    """One series: contiguous time blocks in ``fractions``; windows never cross a block edge."""
    fr = np.asarray(splits.fractions) / sum(splits.fractions)
    edges = np.concatenate([[0], np.cumsum(np.round(fr * n_times).astype(int))])
    edges[-1] = n_times
    return {
        split: Block(np.array([0]), int(edges[i]), int(edges[i + 1]))
        for i, split in enumerate(SPLITS)
    }


class SplitInput(NamedTuple):
    """What split planning needs of the data: the time axis after selection, the number of
    samples and their dim, which frames hold a NaN ``(S, T)``, and the files' label."""

    time: np.ndarray
    n_samples: int
    sample_dim: str | None
    nan_frames: np.ndarray
    label: str


def plan_splits(
    data: SplitInput,
    windows: WindowConfig,
    splits: SplitConfig,
    nan_policy: str,
    step: np.timedelta64 | float,
) -> SplitPlan:
    """Assign samples/time blocks to splits and list every split's window starts."""
    n_s, n_t = data.n_samples, len(data.time)
    ok_pair = one_step_pairs(data.time, step)
    nan_frame = data.nan_frames if nan_policy == "mask" else np.zeros_like(data.nan_frames)
    admissible = Admissible(
        np.concatenate([[0], np.cumsum(~ok_pair)]),
        np.concatenate([np.zeros((n_s, 1), np.int64), np.cumsum(nan_frame, axis=1)], axis=1),
    )
    if splits.subsets_samples and n_s < 2:
        raise ValueError(
            f"{data.label}: data.splits.train_samples / unlabelled_samples pick samples along "
            f"{data.sample_dim!r}, but the data are one series"
        )
    if splits.by_date:
        blocks = period_blocks(data.time, n_s, splits, data.label)
    elif n_s > 1:
        blocks = sample_blocks(n_s, n_t, splits, data.sample_dim, data.label)
    else:
        blocks = time_blocks(n_t, splits)
    plan = SplitPlan({}, {}, {}, ok_pair)
    for i, split in enumerate(SPLITS):
        block = blocks[split]
        frames = np.zeros((n_s, n_t), bool)
        frames[np.ix_(block.samples, np.arange(block.lo, block.hi))] = True
        plan.frames[split] = frames
        plan.samples[split] = block.samples
        plan.starts[split] = window_starts(block, windows.length, windows.stride, admissible)
        wanted = splits.periods[split] is not None if splits.by_date else splits.fractions[i] > 0
        if wanted and len(plan.starts[split]) == 0:
            where = f"{data.label}: the {split} split"
            if splits.by_date:
                where += f" (data.splits.{split}_period={splits.periods[split]})"
            raise SplitError(empty_split_message(where, block, ok_pair, nan_frame, windows, step))
    if "unlabelled" in blocks:
        # inputs only: every admissible start of in_steps frames (their futures are not read)
        block = blocks["unlabelled"]
        plan.samples["unlabelled"] = block.samples
        plan.starts["unlabelled"] = window_starts(
            block, windows.in_steps, windows.stride, admissible
        )
    return plan


def empty_split_message(
    where: str,
    block: Block,
    ok_pair: np.ndarray,
    nan_frame: np.ndarray,
    windows: WindowConfig,
    step: np.timedelta64 | float,
) -> str:
    """Why a split that asks for data has no window: empty, too short, gaps or NaN frames."""
    lo, hi = block.lo, block.hi
    n = hi - lo
    need = (
        f"one window needs in_steps + out_steps x rollout_steps = {windows.in_steps} + "
        f"{windows.out_steps} x {windows.rollout_steps} = {windows.length} consecutive steps"
    )
    if n == 0:
        return f"{where} is empty (no time step); change data.splits.fractions or the periods"
    run, best = 0, 1
    for ok in ok_pair[lo : hi - 1]:
        run = run + 1 if ok else 0
        best = max(best, run + 1)
    fix = (
        "reduce data.windows.in_steps / data.windows.out_steps / data.windows.rollout_steps "
        "or enlarge the split"
    )
    if best < windows.length:
        return (
            f"{where} has {n} time steps, the longest run without a gap in the time axis is "
            f"{best} steps of {fmt_step(step)}, but {need}: the window is longer "
            f"than the split; {fix}"
        )
    if nan_frame[block.samples, lo:hi].any():
        return (
            f"{where} has no window free of NaN frames (data.quality.nan_policy='mask'); {need}; "
            "use data.quality.nan_policy='fill' or clean the file"
        )
    return f"{where} has {n} time steps but no complete window: {need}; {fix}"


def successor_index(starts: np.ndarray, index: np.ndarray, shift: int) -> np.ndarray:
    """For windows ``index`` of a split with starts ``(N, 2)`` of ``(sample, t0)``: the index of
    the window of the same sample that starts ``shift`` frames later, or -1 where there is none."""
    lookup = {(int(s), int(t)): i for i, (s, t) in enumerate(np.asarray(starts).tolist())}
    out = [lookup.get((int(starts[i, 0]), int(starts[i, 1]) + shift), -1) for i in index]
    return np.asarray(out, dtype=np.int64)


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
