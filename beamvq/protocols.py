"""The typed seams between the parts of beamvq (docs/architecture.md).

Four seams, each a small typed object or a ``Protocol`` that the other side codes against:

- ``Batch``: what a DataLoader yields and every ``ForecastModule`` step takes.
- ``ForecastData``: the datamodule as callbacks and the module see it (windows, the augmented
  pool, the labels that prediction files and figures need); ``datamodules`` implements it.
- ``Pool``: BeamVQ's augmented pool, which remembers where each pseudo-target came from.
- ``SearchableModel``: the forecasting module as the search, the callbacks and figures see it;
  ``beamvq.module.ForecastModule`` implements it.

Nothing here holds logic: NamedTuples of tensors and arrays, and protocols of public methods.
Callbacks import this module, ``beamvq.search`` and ``beamvq.metrics`` only, and use nothing
but what these protocols name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import xarray as xr
from torch import Tensor

__all__ = [
    "SOURCE_KINDS",
    "AxisInfo",
    "Batch",
    "ChannelInfo",
    "DataInfo",
    "ForecastData",
    "Members",
    "Normalization",
    "Pool",
    "PoolSamples",
    "SearchableModel",
    "StepFn",
    "UnlabelledInputs",
    "WindowInfo",
    "Windows",
]

# normalized window (N, T_in, C, H, W) -> normalized candidates (N, K, T_out, C, H, W),
# candidate 0 the nearest-code forecast (beamvq.search expands beams with it)
StepFn = Callable[[Tensor], Tensor]

# where a pool sample's input came from (Pool.add's source_kind is an index into this tuple):
# a training window (source_index: its index in the train split), an unlabelled input with no
# recorded future (source_index: the id ForecastData.unlabelled_inputs gave it), a pushforward
# input made by the model whose target is the recorded future of training window source_index,
# a validation input (source_index: its validation window; the authors' protocol, which leaks
# validation data into training and is refused unless asked for by name)
SOURCE_KINDS = ("window", "unlabelled", "pushforward", "validation")


class Batch(NamedTuple):
    """One batch of windows, physical units: input ``x (B, T_in, C, H, W)``, target
    ``y (B, T_total, C, H, W)``, loss ``weight (B,)`` (1 for real windows, the pool's weight for
    pseudo-targets) and ``index (B,)`` of each window in its split (-1 for pool samples). A single
    item has the same fields without the batch dim."""

    x: Tensor
    y: Tensor
    weight: Tensor
    index: Tensor


class Normalization(NamedTuple):
    """Per-channel mean and standard deviation of the training split, shape ``(C,)``."""

    mean: np.ndarray
    std: np.ndarray


class Windows(NamedTuple):
    """Training windows, physical units: ``index (N,)`` int64 positions in the train split,
    input ``x (N, T_in, C, H, W)`` and recorded future ``y (N, T_total, C, H, W)``."""

    index: Tensor
    x: Tensor
    y: Tensor


class UnlabelledInputs(NamedTuple):
    """Inputs with no recorded future, physical units: a stable ``id (N,)`` int64 per input (the
    same input gets the same id in every epoch and on every rank) and ``x (N, T_in, C, H, W)``."""

    id: Tensor
    x: Tensor


class WindowInfo(NamedTuple):
    """Labels of windows: the sample (trajectory) label and the time label of the last input."""

    sample: np.ndarray
    init_time: np.ndarray


class ChannelInfo(NamedTuple):
    """One channel of the stacked array: its name (``z500``), source variable (``z``), level
    label or ``None``, and the variable's attributes in the file (units, long_name, ...)."""

    name: str
    variable: str
    level: float | None
    attrs: Mapping[str, Any]


class AxisInfo(NamedTuple):
    """One axis of the data: its dim name in the files, its values and its attributes."""

    name: str
    values: np.ndarray
    attrs: Mapping[str, Any]


class DataInfo(NamedTuple):
    """What prediction files, figures and reports need to label fields.

    ``time_step`` is the spacing of a window's frames (a ``numpy.timedelta64`` for dated axes,
    a number otherwise); ``latitude`` is the latitudes in degrees for lat-lon grids, else
    ``None``; ``y`` and ``x`` carry the grid's coordinates.
    """

    path: str
    channels: tuple[ChannelInfo, ...]
    time: AxisInfo
    time_step: Any
    y: AxisInfo
    x: AxisInfo
    latitude: np.ndarray | None
    in_steps: int
    target_steps: int


class PoolSamples(NamedTuple):
    """Everything the pool holds, in order of addition (oldest first), physical units: inputs
    ``x (N, T_in, C, H, W)``, pseudo-targets ``y (N, T_total, C, H, W)``, ensemble ``score (N,)``,
    ``age (N,)`` (running number of addition), ``source_kind (N,)`` (index into ``SOURCE_KINDS``)
    and ``source_index (N,)`` (train-split window index or unlabelled input id)."""

    x: Tensor
    y: Tensor
    score: Tensor
    age: Tensor
    source_kind: Tensor
    source_index: Tensor


@runtime_checkable
class Pool(Protocol):
    """BeamVQ's augmented pool: capped, checkpointed, identical on every DDP rank."""

    capacity: int
    weight: float

    @property
    def size(self) -> int: ...

    def add(
        self, x: Tensor, y: Tensor, score: Tensor, source_kind: Tensor, source_index: Tensor
    ) -> int:
        """Add physical (input, pseudo-target) pairs with their sources; returns how many of
        them are still in the pool after the capacity policy ran. Every rank passes the same
        tensors (callers gather first)."""
        ...

    def samples(self) -> PoolSamples: ...

    def to_dataset(self, info: DataInfo) -> xr.Dataset:
        """The pool as a CF-style dataset (inputs, pseudo-targets, scores, sources)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class ForecastData(Protocol):
    """The datamodule as callbacks and the module see it (``beamvq.datamodules``)."""

    pool: Pool
    normalization: Normalization | None
    batch_size: int
    predict_split: str

    def info(self) -> DataInfo: ...

    def training_windows(self, max_windows: int | None = None, seed: Any = 0) -> Windows:
        """A random subset of ``max_windows`` training windows (all with ``None``), sorted by
        index; ``seed`` is anything ``numpy.random.default_rng`` takes."""
        ...

    def training_targets(self, index: Tensor) -> Tensor:
        """The recorded futures ``(N, T_total, C, H, W)`` of training windows ``index``."""
        ...

    def unlabelled_inputs(
        self, max_inputs: int | None = None, seed: Any = 0
    ) -> UnlabelledInputs: ...

    def window_info(self, split: str, indices: np.ndarray) -> WindowInfo: ...

    def successor_windows(self, index: Tensor, shift: int) -> Tensor:
        """For training windows ``index``: the training window of the same sample that starts
        ``shift`` frames later, or -1 where there is none."""
        ...

    def validation_inputs(self, max_inputs: int | None = None, seed: Any = 0) -> UnlabelledInputs:
        """Inputs of validation windows (ids: their window indices): only for the authors'
        protocol, which leaks validation data into training."""
        ...


class Members(NamedTuple):
    """Ensemble members ``(B, M, T, C, H, W)`` (physical) and their beam-search scores ``(B, M)``
    (``None`` for rank-aligned code-bank members, which have no score)."""

    fields: Tensor
    scores: Tensor | None


@runtime_checkable
class SearchableModel(Protocol):
    """The forecasting module as search, callbacks and figures see it.

    Fields: ``normalize``/``denormalize`` map physical fields ``(..., C, H, W)`` to model space
    and back; ``forecast`` is the deterministic autoregressive rollout of a normalized input;
    ``search_step_fn(k)`` the K-candidate step the beam search expands; ``ensemble_members`` the
    ``predict`` ensemble of physical inputs, ``ensemble_size`` the members it gives by default
    (0 or 1: deterministic only); ``code_indices`` the nearest-code indices of a normalized input
    (``None`` without a code bank) and ``codebook_size`` its size (0: none).
    """

    rollout_steps: int
    candidate_k: int
    codebook_size: int
    ensemble_size: int

    def normalize(self, field: Tensor) -> Tensor: ...

    def denormalize(self, field: Tensor) -> Tensor: ...

    def forecast(self, x: Tensor, steps: int) -> Tensor: ...

    def search_step_fn(self, k: int | None = None) -> StepFn: ...

    def ensemble_members(self, x: Tensor, members: int | None = None) -> Members: ...

    def code_indices(self, x: Tensor) -> Tensor | None: ...
