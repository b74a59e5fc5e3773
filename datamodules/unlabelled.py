"""Unlabelled inputs: ``in_steps``-frame inputs whose future is never read (BeamVQ's
reference-free search, arXiv 2502.18925 stage 3; docs/beamvq.md).

Three sources, concatenated in this order so that an input's id (its position) is stable:

1. the *tail* of the training trajectories (``future_free_starts``): the last inputs, whose
   future the file does not record — frames the training windows already hold, so not new;
2. the *unlabelled samples* of the split (``data.splits.unlabelled_samples``): trajectories of
   the training portion set aside as inputs only, every admissible ``in_steps``-frame start;
3. *files* the user names (``data.splits.unlabelled_path``), with the variables and grid of the
   training data; every admissible ``in_steps``-frame start is an input.

Validation and test data are never a source. A random subset (``max_inputs``) is drawn per call
from the whole list; ids are positions in the list, the same in every epoch and on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from beamvq.datamodules.config import DimsConfig, SelectionConfig, SplitConfig
from beamvq.datamodules.conventions import one_step_pairs
from beamvq.datamodules.reading import read_into
from beamvq.datamodules.scan import Layout, scan_layout
from beamvq.datamodules.splits import Admissible, Block, future_free_starts, window_starts
from beamvq.datamodules.windows import WindowDataset
from beamvq.protocols import UnlabelledInputs


class InputSource(NamedTuple):
    """One source of unlabelled inputs: a dataset whose ``inputs(starts)`` reads the frames, and
    the ``(sample, t0)`` starts of its inputs."""

    dataset: Any
    starts: np.ndarray


def tail_source(train: Any, target_steps: int) -> InputSource:
    """The training trajectories' last inputs (no recorded future)."""
    return InputSource(train, future_free_starts(np.asarray(train.starts), target_steps))


def file_source(
    path: str | Sequence[str],
    variables: Sequence[str],
    selection: SelectionConfig,
    dims: DimsConfig,
    like: Layout,
    in_steps: int,
    step: Any,
) -> InputSource:
    """Every admissible ``in_steps``-frame input of the files at ``path`` (read once into memory),
    which must hold the channels and grid of the training data ``like``."""
    label = str(path)
    lay = scan_layout(
        path, list(variables), selection, dims, f"data.splits.unlabelled_path {label}"
    )
    mine = [c.name for c in lay.channels]
    theirs = [c.name for c in like.channels]
    if mine != theirs:
        raise ValueError(
            f"data.splits.unlabelled_path {label}: channels {mine} differ from the training "
            f"data's {theirs}"
        )
    grid, want = (len(lay.y_index), len(lay.x_index)), (len(like.y_index), len(like.x_index))
    if grid != want:
        raise ValueError(
            f"data.splits.unlabelled_path {label}: grid {grid} differs from the training data's "
            f"{want} (y, x)"
        )
    data = np.empty(lay.shape, np.float32)
    stats = read_into(lay, data)
    n_s, n_t = lay.shape[0], lay.shape[1]
    gaps = (
        np.concatenate([[0], np.cumsum(~one_step_pairs(lay.time, step))])
        if n_t > 1
        else np.zeros(1, np.int64)
    )
    nan = stats.nonfinite.sum(axis=2) > 0  # (S, T): inputs that touch a NaN frame are skipped
    admissible = Admissible(
        gaps, np.concatenate([np.zeros((n_s, 1), np.int64), np.cumsum(nan, axis=1)], axis=1)
    )
    starts = window_starts(Block(np.arange(n_s), 0, n_t), in_steps, 1, admissible)
    if len(starts) == 0:
        raise ValueError(
            f"data.splits.unlabelled_path {label}: no input of {in_steps} consecutive, complete "
            f"frames one time step apart ({n_t} time steps)"
        )
    return InputSource(WindowDataset(data, starts, in_steps, 0), starts)


def unlabelled_sources(
    train: Any,
    unlabelled: Any | None,
    prepared: Any,
    splits: SplitConfig,
    selection: SelectionConfig,
    dims: DimsConfig,
    variables: Sequence[str],
) -> list[InputSource]:
    """The sources ``splits`` asks for: the training dataset's tail, the split's unlabelled
    samples (dataset ``unlabelled``), the files of ``splits.unlabelled_path`` read with the
    training data's level and box selection (``prepared``: the training data after setup)."""
    sources = [tail_source(train, train.target_steps)]
    sources = sources if splits.future_free_tail else []
    if unlabelled is not None:
        sources.append(InputSource(unlabelled, np.asarray(unlabelled.starts)))
    if splits.unlabelled_path is not None:
        box = SelectionConfig(
            levels=selection.levels, lat_range=selection.lat_range, lon_range=selection.lon_range
        )
        sources.append(
            file_source(splits.unlabelled_path, variables, box, dims, prepared.layout,
                        train.in_steps, prepared.time_step)
        )  # fmt: skip
    return sources


def draw_inputs(
    sources: Sequence[InputSource], max_inputs: int | None, seed: Any
) -> UnlabelledInputs:
    """A random subset of ``max_inputs`` of the sources' inputs (all with ``None``), in list order;
    ``seed``: anything ``numpy.random.default_rng`` takes."""
    sizes = [len(s.starts) for s in sources]
    total = int(sum(sizes))
    ids = np.arange(total, dtype=np.int64)
    if max_inputs is not None and total > max_inputs:
        ids = np.sort(np.random.default_rng(seed).choice(total, max_inputs, replace=False))
    if ids.size == 0:
        return UnlabelledInputs(torch.empty(0, dtype=torch.long), torch.empty(0))
    edges = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for k, source in enumerate(sources):
        mine = ids[(ids >= edges[k]) & (ids < edges[k + 1])] - edges[k]
        if mine.size:
            parts.append(source.dataset.inputs(source.starts[mine]))
    return UnlabelledInputs(torch.from_numpy(ids), torch.from_numpy(np.concatenate(parts)))
