"""One offload frame: the tensors autograd saves inside one call of one chosen module.

Part of the activation offload of :mod:`beamvq.quant.offload` (MEMO, arXiv 2407.12117). While
the module's forward runs, every saved tensor is packed into a :class:`Handle` (views of one
base share it, so the base moves once); after the forward, :meth:`Frame.finalize` keeps the
call's inputs/outputs and anything it cannot rebuild on the device, moves the leading fraction
``alpha`` of each other tensor (along ``token_dim``) to the host and drops the rest, which
backward gets back by replaying the call once (:mod:`beamvq.quant.offload_replay`). When
backward reaches a frame, the previous frame's host parts are prefetched.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from beamvq.quant.offload_accounting import StepCounters, storage_key
from beamvq.quant.offload_replay import CallReplay

if TYPE_CHECKING:
    from beamvq.quant.offload import ActivationOffload


class Handle:
    """What autograd stores in place of one saved tensor of a frame."""

    __slots__ = (
        "frame",
        "index",
        "tensor",
        "host",
        "event",
        "prefetched",
        "dim",
        "length",
        "split",
        "device",
        "shape",
        "stride",
        "dtype",
        "uses",
        "cache",
        "version",
        "__weakref__",
    )

    def __init__(self, frame: Frame, index: int, tensor: Tensor) -> None:
        self.frame = frame
        self.index = index  # position in the frame's pack order, matched again by recompute
        self.tensor: Tensor | None = tensor
        self.host: Tensor | None = None
        self.event: Any = None
        self.prefetched: Tensor | None = None
        self.dim = 0
        self.length = 0
        self.split = 0  # leading entries along ``dim`` that were offloaded; the rest recomputed
        self.device = tensor.device
        self.shape = tensor.shape
        self.stride = tensor.stride()
        self.dtype = tensor.dtype
        self.uses = 0
        self.cache: Tensor | None = None
        # detach() shares the version counter: in-place changes after the save are visible
        self.version = tensor._version


INPLACE_ERROR = (
    "one of the variables needed for gradient computation has been modified by an inplace "
    "operation (seen by the beamvq activation-offload hooks)"
)


class Kept:
    """A tensor left on the device, with the version it had when autograd saved it."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: Tensor, version: int) -> None:
        self.tensor = tensor
        self.version = version

    def get(self) -> Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(INPLACE_ERROR)
        return self.tensor


class ViewOf(NamedTuple):
    """A saved view, rebuilt from its base tensor's handle in backward."""

    handle: Handle
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def owns_storage(t: Tensor) -> bool:
    """A dense tensor that covers exactly its storage from offset 0 (safe to move and rebuild)."""
    return (
        type(t) is torch.Tensor
        and t.storage_offset() == 0
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def split_dim(t: Tensor, token_dim: int) -> int:
    return token_dim % t.dim() if t.dim() >= 2 else 0


class Frame:
    """Saved tensors of one call of one chosen module."""

    def __init__(
        self,
        owner: ActivationOffload,
        forward: Callable[..., Any],
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        counters: StepCounters,
    ) -> None:
        self.owner = owner
        self.counters = counters
        self.pack_count = 0
        self.pending: list[Handle] = []
        self.by_key: dict[tuple[Any, ...], Handle] = {}
        self.needed: set[int] = set()
        self.recomputed: dict[int, Tensor] = {}
        # weak: the graph owns the handles, and a handle owns its frame
        self.offloaded: weakref.WeakSet[Handle] = weakref.WeakSet()
        self.prefetch_done = False
        self.prefetch_issued = False
        self.position = len(counters.frame_refs)
        # recomputation needs the inputs and the RNG/autocast state of this call
        self.replay = CallReplay(forward, module, args, kwargs) if owner.alpha < 1.0 else None

    # ---- forward ----------------------------------------------------------------------------
    def pack(self, t: Tensor) -> Any:
        index = self.pack_count
        self.pack_count += 1
        if self.counters.is_param(t):
            return Kept(t.detach(), t._version)
        # ops often save views (e.g. the 2-D fold of a 3-D input): move the base once and
        # rebuild each view from it
        base = t._base if type(t) is torch.Tensor and t._base is not None else t
        key = (storage_key(base)[0], tuple(base.shape), base.dtype)
        handle = self.by_key.get(key)
        if handle is None:
            handle = Handle(self, index, base.detach())
            self.by_key[key] = handle
            self.pending.append(handle)
        handle.uses += 1
        if base is t:
            return handle
        return ViewOf(handle, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def finalize(self, inputs: Any, outputs: Any) -> None:
        """After the module's forward: decide per tensor what stays, moves, or is dropped."""
        alive = {
            storage_key(t)[0] for t in tree_flatten((inputs, outputs))[0] if isinstance(t, Tensor)
        }
        owner = self.owner
        for handle in self.pending:
            t = handle.tensor
            assert t is not None
            if t._version != handle.version:
                raise RuntimeError(INPLACE_ERROR)
            key = storage_key(t)[0]
            if key in alive or t.dim() == 0 or t.numel() == 0 or not owns_storage(t):
                self.counters.keep(t, handle)
                continue
            dim = split_dim(t, owner.token_dim)
            length = t.shape[dim]
            split = min(length, math.floor(owner.alpha * length + 0.5))
            handle.dim, handle.length, handle.split = dim, length, split
            row_bytes = t.numel() // length * t.element_size()
            if split > 0:
                handle.host, handle.event = owner.transfers.to_host(t.narrow(dim, 0, split))
                self.counters.offloaded += split * row_bytes
                self.offloaded.add(handle)
            if split < length:
                self.needed.add(handle.index)
                self.counters.recompute += (length - split) * row_bytes
            handle.tensor = None
        # no cycle frame -> handles -> frame: the graph holds the handles, they hold the frame
        self.pending = []
        self.by_key = {}
        if not self.needed:
            self.replay = None
        self.counters.frames += 1
        self.counters.frame_refs.append(weakref.ref(self))

    # ---- backward ---------------------------------------------------------------------------
    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, ViewOf):
            return self._resolve(packed.handle).as_strided(
                packed.size, packed.stride, packed.offset
            )
        if isinstance(packed, Handle):
            return self._resolve(packed)
        return packed.get()

    def _resolve(self, handle: Handle) -> Tensor:
        if handle.tensor is not None:
            if handle.tensor._version != handle.version:
                raise RuntimeError(INPLACE_ERROR)
            return handle.tensor
        self._prefetch_previous()
        if handle.cache is not None:
            out = handle.cache
        else:
            # same strides as the original, so views rebuild with as_strided
            out = torch.empty_strided(
                handle.shape, handle.stride, dtype=handle.dtype, device=handle.device
            )
            if handle.split > 0:
                out.narrow(handle.dim, 0, handle.split).copy_(self._fetch(handle))
            if handle.split < handle.length:
                rest = handle.length - handle.split
                recomputed = self._recomputed(handle.index)
                out.narrow(handle.dim, handle.split, rest).copy_(
                    recomputed.narrow(handle.dim, handle.split, rest)
                )
        handle.uses -= 1
        handle.cache = out if handle.uses > 0 else None
        if handle.uses <= 0:
            # last use: release the host copy now rather than when the graph goes
            handle.host = handle.prefetched = None
        return out

    def _prefetch_previous(self) -> None:
        if self.prefetch_done:
            return
        self.prefetch_done = True
        if self.position > 0:
            previous = self.counters.frame_refs[self.position - 1]()
            if previous is not None:
                previous.prefetch()

    def prefetch(self) -> None:
        """Start host-to-device copies of this frame's offloaded parts (GPU only)."""
        if self.prefetch_issued:
            return
        self.prefetch_issued = True
        transfers = self.owner.transfers
        for handle in list(self.offloaded):
            if handle.host is None or handle.prefetched is not None:
                continue
            if handle.device.type == "cuda":
                handle.prefetched = transfers.start_to_device(
                    handle.host, handle.event, handle.device
                )

    def _fetch(self, handle: Handle) -> Tensor:
        host = handle.host
        if host is None:
            raise RuntimeError(
                "an offloaded activation was already released: backward through the same graph "
                "twice (retain_graph) is not supported with activation offload"
            )
        self.counters.fetched += host.numel() * host.element_size()
        if handle.prefetched is not None:
            out, handle.prefetched = handle.prefetched, None
            self.owner.transfers.wait(out)
            return out
        return self.owner.transfers.to_device(host, handle.event, handle.device)

    def _recomputed(self, index: int) -> Tensor:
        if index not in self.recomputed:
            assert self.replay is not None
            self.recomputed = self.replay.run(self.needed, self.pack_count, self.owner.nested)
        return self.recomputed.pop(index)
