"""Byte accounting of the tensors autograd saves during one training step.

Part of the activation offload of :mod:`beamvq.quant.offload` (MEMO, arXiv 2407.12117): every
saved tensor is counted once per distinct storage while a graph holds it, parameters (and their
views) are never counted as activations, and the frames add what they moved to the host, what
they dropped for recomputation and what backward fetched back.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from beamvq.quant.offload_frame import Frame


class OffloadStats(NamedTuple):
    """Bytes of saved activations in one training step (parameters excluded)."""

    kept_bytes: int
    offloaded_bytes: int
    recompute_bytes: int
    fetched_bytes: int
    frames: int

    @property
    def saved_bytes(self) -> int:
        """Everything autograd saved: kept + offloaded + recomputed."""
        return self.kept_bytes + self.offloaded_bytes + self.recompute_bytes


def storage_key(t: Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory a tensor keeps alive."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    # tensor subclasses (e.g. torchao float8 tensors) have no plain storage
    return id(t), t.numel() * t.element_size()


class StepCounters:
    """Mutable counters of one step; frames keep a reference and update it during backward."""

    def __init__(self, param_ptrs: set[int]) -> None:
        self.param_ptrs = param_ptrs
        # storages kept on the device and still referenced by a graph -> how many holders;
        # a storage is counted once while alive, again if its memory is reused after it died
        self.live: dict[int, int] = {}
        self.kept = 0
        self.offloaded = 0
        self.recompute = 0
        self.fetched = 0
        self.frames = 0
        self.frame_names: list[str] = []
        # forward order, weak: a frame must die with its autograd graph
        self.frame_refs: list[weakref.ref[Frame]] = []

    def is_param(self, t: Tensor) -> bool:
        return storage_key(t)[0] in self.param_ptrs

    def keep(self, t: Tensor, holder: object) -> None:
        """Count ``t``'s storage as kept while ``holder`` (what the graph stores) lives."""
        key, nbytes = storage_key(t)
        if key in self.live:
            self.live[key] += 1
        else:
            self.live[key] = 1
            self.kept += nbytes
        weakref.finalize(holder, self._release, key)

    def _release(self, key: int) -> None:
        count = self.live.get(key, 0) - 1
        if count > 0:
            self.live[key] = count
        else:
            self.live.pop(key, None)

    def stats(self) -> OffloadStats:
        return OffloadStats(self.kept, self.offloaded, self.recompute, self.fetched, self.frames)
