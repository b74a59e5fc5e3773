"""The window datasets: training/evaluation windows served from memory or the memory map.

A window is the ``in_steps`` input frames and the ``out_steps × rollout_steps`` target frames
that follow, cut from the array ``(sample, time, channel, y, x)`` at a start ``(sample, t0)`` of
the split plan (``beamvq.datamodules.splits``). A DataLoader batch is gathered by
``__getitems__`` straight into one preallocated array per field (one copy of the frames) and
passed on as it is by ``collate_windows``. The memory-mapped dataset opens its map lazily in the
process that reads (each DataLoader worker maps the file itself; nothing open is pickled), so no
file handle is shared across worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from beamvq.datamodules.splits import future_free_starts
from beamvq.protocols import Batch, UnlabelledInputs, Windows

# one window (the fields of beamvq.protocols.Batch without the batch dim)
Sample = Batch


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
# what callbacks take from the training windows (beamvq.protocols.ForecastData)
# ------------------------------------------------------------------------------------------
def pick_windows(
    ds: WindowDataset | MemmapWindowDataset, max_windows: int | None, seed: Any
) -> Windows:
    """Indices and physical ``(x, y)`` of (a random subset of ``max_windows``) windows of ``ds``,
    sorted by index; ``seed``: anything ``numpy.random.default_rng`` takes."""
    idx = np.arange(len(ds))
    if max_windows is not None and max_windows < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_windows, replace=False))
    if idx.size == 0:
        return Windows(torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0))
    xs, ys = zip(*[(ds[i].x, ds[i].y) for i in idx])
    return Windows(torch.from_numpy(idx.astype(np.int64)), torch.stack(xs), torch.stack(ys))


def window_targets(ds: WindowDataset | MemmapWindowDataset, index: Tensor) -> Tensor:
    """The recorded futures ``(N, T_total, C, H, W)`` of the windows ``index`` of ``ds``."""
    idx = np.asarray(index.cpu(), dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return torch.empty(0)
    return torch.stack([ds[int(i)].y for i in idx])


def future_free_inputs(
    ds: WindowDataset | MemmapWindowDataset, max_inputs: int | None, seed: Any
) -> UnlabelledInputs:
    """The inputs of ``ds``'s frames that have no recorded future (``future_free_starts``): a
    random subset of ``max_inputs``, in time order; an input's id is its position in the full
    list, so the same input has the same id in every epoch."""
    starts = future_free_starts(np.asarray(ds.starts), ds.target_steps)
    ids = np.arange(len(starts), dtype=np.int64)
    if max_inputs is not None and len(starts) > max_inputs:
        ids = np.sort(np.random.default_rng(seed).choice(len(starts), max_inputs, replace=False))
    return UnlabelledInputs(torch.from_numpy(ids), torch.from_numpy(ds.inputs(starts[ids])))
