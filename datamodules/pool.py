"""BeamVQ's augmented pool: (input, pseudo-target) pairs that join the training set.

BeamVQ (arXiv 2502.18925, stage 3) adds the self-ensembled pseudo-targets of the beam search to
the training data, round after round. The pool holds them in physical units, capped at
``capacity``: beyond it the oldest (``policy="oldest"``) or the lowest-scoring (``"worst"``;
among equal scores the older) samples are dropped. It remembers each sample's source
(``beamvq.protocols.SOURCE_KINDS``: a training window with its index in the train split, or an
unlabelled input with its id), so reports find the recorded future of a pseudo-target by index,
never by comparing pixels.

The pool is part of the datamodule's ``state_dict`` (checkpoints restore it) and must be the same
on every DDP rank: callers gather before ``add``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor
from torch.utils.data import Dataset

from beamvq.datamodules.config import PoolConfig
from beamvq.datamodules.io import grid_axes
from beamvq.protocols import SOURCE_KINDS, Batch, DataInfo, PoolSamples


class AugmentedPool:
    """A capped pool of pseudo-labelled samples (``beamvq.protocols.Pool``).

    ``from_config`` builds it from the datamodule's ``data.pool`` settings (``PoolConfig``).

    Args:
        capacity: most samples kept (0 keeps none).
        policy: which samples to drop beyond ``capacity``: ``"oldest"`` or ``"worst"``.
        weight: loss weight of pool samples relative to real windows.
    """

    def __init__(self, capacity: int = 256, policy: str = "worst", weight: float = 0.5) -> None:
        config = PoolConfig(capacity, policy, weight)  # checks the values, naming data.pool.*
        self.capacity = config.capacity
        self.policy = config.policy
        self.weight = config.weight
        self._samples = _empty()
        self._counter = 0

    share: float | None = None  # data.pool.share: the capacity follows the training windows

    @classmethod
    def from_config(cls, config: PoolConfig) -> AugmentedPool:
        pool = cls(config.capacity, config.policy, config.weight)
        pool.share = config.share
        return pool

    def fit_to_training(self, training_windows: int) -> None:
        """With ``share`` set: capacity = round(share x training windows) (at least 1); the
        samples beyond it are dropped by the next ``add``'s policy."""
        if self.share is not None:
            self.capacity = max(1, round(self.share * int(training_windows)))

    @property
    def size(self) -> int:
        return int(self._samples.x.shape[0])

    def samples(self) -> PoolSamples:
        return self._samples

    def add(
        self, x: Tensor, y: Tensor, score: Tensor, source_kind: Tensor, source_index: Tensor
    ) -> int:
        """Add physical (input, pseudo-target) pairs; returns how many of them were kept.

        Beyond ``capacity`` the oldest or the worst-scoring samples are dropped (new ones too,
        when they are the worst). Every rank must pass the same tensors.
        """
        n = int(x.shape[0])
        if n == 0:
            return 0
        for name, t in (("y", y), ("score", score), ("source_kind", source_kind),
                        ("source_index", source_index)):  # fmt: skip
            if int(t.shape[0]) != n:
                raise ValueError(f"AugmentedPool.add: {name} has {t.shape[0]} rows, x has {n}")
        kinds = source_kind.detach().cpu().long()
        if bool(((kinds < 0) | (kinds >= len(SOURCE_KINDS))).any()):
            raise ValueError(f"AugmentedPool.add: source_kind must index {SOURCE_KINDS}")
        first_new = self._counter
        new = PoolSamples(
            x.detach().float().cpu(),
            y.detach().float().cpu(),
            score.detach().float().cpu(),
            torch.arange(first_new, first_new + n),
            kinds,
            source_index.detach().cpu().long(),
        )
        self._counter += n
        merged = new if self.size == 0 else PoolSamples(
            *(torch.cat([old, add]) for old, add in zip(self._samples, new))
        )  # fmt: skip
        if merged.x.shape[0] > self.capacity:
            keep = self._kept(merged)
            merged = PoolSamples(*(t[keep] for t in merged))
        self._samples = merged
        return int((merged.age >= first_new).sum())

    def _kept(self, merged: PoolSamples) -> Tensor:
        """Positions of the ``capacity`` samples kept, in order of addition: the newest
        (``"oldest"`` drops the oldest), or the highest scores (``"worst"``), the newer sample
        first among equal scores (it comes from the later, better-trained model)."""
        order = torch.argsort(merged.age, descending=True)
        if self.policy == "worst":
            # a stable sort by score keeps the newest-first order among equal scores
            order = order[torch.sort(merged.score[order], descending=True, stable=True).indices]
        return torch.sort(order[: self.capacity]).values

    def dataset(self) -> Dataset:
        """The pool as a training dataset of ``Batch`` items (index -1, the pool's weight)."""
        return PoolDataset(self._samples.x, self._samples.y, self.weight)

    def state_dict(self) -> dict[str, Any]:
        s = self._samples
        return {
            "pool_x": s.x,
            "pool_y": s.y,
            "pool_score": s.score,
            "pool_age": s.age,
            "pool_source_kind": s.source_kind,
            "pool_source_index": s.source_index,
            "pool_counter": self._counter,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        n = int(state["pool_x"].shape[0])
        # checkpoints written before sources were recorded: sources unknown (-1)
        unknown = torch.full((n,), -1, dtype=torch.long)
        self._samples = PoolSamples(
            state["pool_x"],
            state["pool_y"],
            state["pool_score"],
            state["pool_age"],
            state.get("pool_source_kind", torch.zeros(n, dtype=torch.long)),
            state.get("pool_source_index", unknown),
        )
        self._counter = int(state["pool_counter"])

    def to_dataset(self, info: DataInfo) -> xr.Dataset:
        """The pool as a CF-style dataset for inspection, physical units:
        ``<channel>_input (pool, input_time, y, x)``, ``<channel>_pseudo_target (pool, lead_time,
        y, x)``, ``score``, ``age`` (order of addition), ``source_kind`` and ``source_index``;
        a lat-lon grid keeps its dim names (``latitude``/``longitude``) with CF attributes."""
        n = self.size
        if n == 0:
            raise ValueError("the augmented pool is empty; nothing to write")
        s = self._samples
        x, y = s.x.float().numpy(), s.y.float().numpy()
        # the grid as in predictions.nc: lat-lon keeps its names with CF attributes (grid_axes)
        axes = grid_axes(info)
        (y_dim, y_attrs), (x_dim, x_attrs) = axes["y"], axes["x"]
        coords: dict[str, Any] = {
            "pool": ("pool", np.arange(n), {"long_name": "pool sample"}),
            "input_time": (
                "input_time",
                np.arange(-x.shape[1] + 1, 1),
                {"long_name": "input frame in time steps, 0 = last input frame", "units": "1"},
            ),
            "lead_time": (
                "lead_time",
                np.arange(1, y.shape[1] + 1),
                {"long_name": "forecast lead time in time steps", "units": "1"},
            ),
            y_dim: (y_dim, np.asarray(info.y.values), y_attrs),
            x_dim: (x_dim, np.asarray(info.x.values), x_attrs),
        }
        kinds = "; ".join(f"{i}: {k}" for i, k in enumerate(SOURCE_KINDS))
        data_vars: dict[str, Any] = {
            "score": ("pool", s.score.float().numpy(), {"long_name": "ensemble score"}),
            "age": ("pool", s.age.numpy(), {"long_name": "order of addition to the pool"}),
            "source_kind": (
                "pool",
                s.source_kind.numpy(),
                {"long_name": f"source of the input ({kinds})"},
            ),  # fmt: skip
            "source_index": (
                "pool",
                s.source_index.numpy(),
                {"long_name": "train-split window index or unlabelled input id of the input"},
            ),
        }
        keep = ("units", "long_name", "standard_name")
        for c, channel in enumerate(info.channels):
            attrs = {k: v for k, v in channel.attrs.items() if k in keep}
            data_vars[f"{channel.name}_input"] = (
                ("pool", "input_time", y_dim, x_dim), x[:, :, c], attrs,
            )  # fmt: skip
            data_vars[f"{channel.name}_pseudo_target"] = (
                ("pool", "lead_time", y_dim, x_dim), y[:, :, c], attrs,
            )  # fmt: skip
        return xr.Dataset(
            data_vars,
            coords=coords,
            attrs={
                "title": "beamvq augmented pool (BeamVQ self-training pseudo-targets)",
                "Conventions": "CF-1.8",
                "source": f"beam-searched self-ensembles of forecasts on {info.path}",
            },
        )


class PoolDataset(Dataset):
    """Pseudo-labelled samples as ``Batch`` items (index -1, loss weight ``weight``)."""

    def __init__(self, x: Tensor, y: Tensor, weight: float) -> None:
        self.x, self.y, self.weight = x, y, weight

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return Batch(self.x[i], self.y[i], torch.tensor(self.weight), torch.tensor(-1))


def _empty() -> PoolSamples:
    long = torch.empty(0, dtype=torch.long)
    return PoolSamples(torch.empty(0), torch.empty(0), torch.empty(0), long, long, long)
