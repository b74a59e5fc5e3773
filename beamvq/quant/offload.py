"""Activation offload with token-wise recomputation, and saved-activation accounting.

After MEMO (Zhao et al., arXiv 2407.12117): the tensors that autograd saves inside chosen
modules ("frames", e.g. the encoder/translator/decoder of a backbone) are moved off the device
after the module's forward and brought back for its backward. A fraction ``alpha`` of every
saved activation, cut along its token/spatial axis (``token_dim``, default ``-2``: the token
axis of ``(B, N, C)`` and the row axis of ``(B, C, H, W)``), goes to host memory; the rest is
dropped and recomputed in backward by re-running the module once from its kept inputs.
``alpha = 1`` is pure offload, ``alpha = 0`` pure activation checkpointing.

Kept on the device: a frame's inputs and outputs (MEMO keeps layer inputs; outputs are alive
anyway as the next layer's input), scalars, tensor subclasses, and parameters with their views
(never offloaded, never counted as activations). On a GPU the copies go to pinned host buffers,
non-blocking on a side stream; when backward reaches a frame, the previous frame's tensors are
prefetched on that stream. Recomputation restores the RNG state (dropout masks match) and the
module's buffers (BatchNorm running statistics and VQ code banks are updated once, not twice).

Everything saved during a training step is counted (:class:`OffloadStats`): bytes kept on the
device (distinct storages), bytes moved to the host, bytes dropped for recomputation, bytes
fetched back in backward. With ``alpha=None`` nothing is offloaded and the counters measure the
saved activations of the plain step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_map

from beamvq.quant.convert import is_bottleneck

log = logging.getLogger(__name__)


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


def _storage_key(t: Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory a tensor keeps alive."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    # tensor subclasses (e.g. torchao float8 tensors) have no plain storage
    return id(t), t.numel() * t.element_size()


class _StepCounters:
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
        self.frame_refs: list[weakref.ref[_Frame]] = []

    def is_param(self, t: Tensor) -> bool:
        return _storage_key(t)[0] in self.param_ptrs

    def keep(self, t: Tensor, holder: object) -> None:
        """Count ``t``'s storage as kept while ``holder`` (what the graph stores) lives."""
        key, nbytes = _storage_key(t)
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


class _Handle:
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

    def __init__(self, frame: _Frame, index: int, tensor: Tensor) -> None:
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


_INPLACE_ERROR = (
    "one of the variables needed for gradient computation has been modified by an inplace "
    "operation (seen by the beamvq activation-offload hooks)"
)


class _Kept:
    """A tensor left on the device, with the version it had when autograd saved it."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: Tensor, version: int) -> None:
        self.tensor = tensor
        self.version = version

    def get(self) -> Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(_INPLACE_ERROR)
        return self.tensor


class _ViewOf(NamedTuple):
    """A saved view, rebuilt from its base tensor's handle in backward."""

    handle: _Handle
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _owns_storage(t: Tensor) -> bool:
    """A dense tensor that covers exactly its storage from offset 0 (safe to move and rebuild)."""
    return (
        type(t) is torch.Tensor
        and t.storage_offset() == 0
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def _split_dim(t: Tensor, token_dim: int) -> int:
    return token_dim % t.dim() if t.dim() >= 2 else 0


class _Frame:
    """Saved tensors of one call of one chosen module."""

    def __init__(
        self,
        owner: ActivationOffload,
        forward: Callable[..., Any],
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        counters: _StepCounters,
    ) -> None:
        self.owner = owner
        self.counters = counters
        self.pack_count = 0
        self.pending: list[_Handle] = []
        self.by_key: dict[tuple[Any, ...], _Handle] = {}
        self.needed: set[int] = set()
        self.recomputed: dict[int, Tensor] = {}
        # weak: the graph owns the handles, and a handle owns its frame
        self.offloaded: weakref.WeakSet[_Handle] = weakref.WeakSet()
        self.prefetch_done = False
        self.prefetch_issued = False
        self.position = len(counters.frame_refs)
        self.forward: Callable[..., Any] | None = None
        self.module: nn.Module | None = None
        self.args: Any = None
        if owner.alpha < 1.0:
            # recomputation needs the inputs and the RNG/autocast state of this call
            self.forward, self.module = forward, module
            self.args = tree_map(
                lambda a: (
                    a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
                ),
                (args, kwargs),
            )
            # detach() shares the version counter: an in-place change of an input shows up
            self.versions = [
                a._version for a in tree_flatten(self.args)[0] if isinstance(a, Tensor)
            ]
            self.cpu_rng = torch.get_rng_state()
            self.cuda_rng = (
                [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
                if torch.cuda.is_available() and torch.cuda.is_initialized()
                else []
            )
            self.autocast = {
                dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                for dev in ("cpu", "cuda")
            }

    # ---- forward ----------------------------------------------------------------------------
    def pack(self, t: Tensor) -> Any:
        index = self.pack_count
        self.pack_count += 1
        if self.counters.is_param(t):
            return _Kept(t.detach(), t._version)
        # ops often save views (e.g. the 2-D fold of a 3-D input): move the base once and
        # rebuild each view from it
        base = t._base if type(t) is torch.Tensor and t._base is not None else t
        key = (_storage_key(base)[0], tuple(base.shape), base.dtype)
        handle = self.by_key.get(key)
        if handle is None:
            handle = _Handle(self, index, base.detach())
            self.by_key[key] = handle
            self.pending.append(handle)
        handle.uses += 1
        if base is t:
            return handle
        return _ViewOf(handle, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def finalize(self, inputs: Any, outputs: Any) -> None:
        """After the module's forward: decide per tensor what stays, moves, or is dropped."""
        alive = {
            _storage_key(t)[0] for t in tree_flatten((inputs, outputs))[0] if isinstance(t, Tensor)
        }
        owner = self.owner
        for handle in self.pending:
            t = handle.tensor
            assert t is not None
            if t._version != handle.version:
                raise RuntimeError(_INPLACE_ERROR)
            key = _storage_key(t)[0]
            if key in alive or t.dim() == 0 or t.numel() == 0 or not _owns_storage(t):
                self.counters.keep(t, handle)
                continue
            dim = _split_dim(t, owner.token_dim)
            length = t.shape[dim]
            split = min(length, math.floor(owner.alpha * length + 0.5))
            handle.dim, handle.length, handle.split = dim, length, split
            row_bytes = t.numel() // length * t.element_size()
            if split > 0:
                handle.host, handle.event = owner.to_host(t.narrow(dim, 0, split))
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
            self.forward = self.module = self.args = None
        self.counters.frames += 1
        self.counters.frame_refs.append(weakref.ref(self))

    # ---- backward ---------------------------------------------------------------------------
    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, _ViewOf):
            return self._resolve(packed.handle).as_strided(
                packed.size, packed.stride, packed.offset
            )
        if isinstance(packed, _Handle):
            return self._resolve(packed)
        return packed.get()

    def _resolve(self, handle: _Handle) -> Tensor:
        if handle.tensor is not None:
            if handle.tensor._version != handle.version:
                raise RuntimeError(_INPLACE_ERROR)
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
        for handle in list(self.offloaded):
            self.owner.prefetch_handle(handle)

    def _fetch(self, handle: _Handle) -> Tensor:
        host = handle.host
        if host is None:
            raise RuntimeError(
                "an offloaded activation was already released: backward through the same graph "
                "twice (retain_graph) is not supported with activation offload"
            )
        self.counters.fetched += host.numel() * host.element_size()
        if handle.prefetched is not None:
            out, handle.prefetched = handle.prefetched, None
            self.owner.wait_prefetched(out)
            return out
        return self.owner.to_device(handle)

    def _recomputed(self, index: int) -> Tensor:
        if index not in self.recomputed:
            self._recompute()
        return self.recomputed.pop(index)

    def _recompute(self) -> None:
        assert self.forward is not None and self.module is not None
        store: dict[int, Tensor] = {}
        counter = [0]
        needed = self.needed

        def pack(t: Tensor) -> None:
            i = counter[0]
            counter[0] += 1
            if i in needed:
                store[i] = (
                    t._base if type(t) is torch.Tensor and t._base is not None else t
                ).detach()

        def unpack(_: Any) -> Tensor:
            raise RuntimeError("the recomputation graph of an offload frame is never run")

        args, kwargs = self.args
        versions = [a._version for a in tree_flatten(self.args)[0] if isinstance(a, Tensor)]
        if versions != self.versions:
            raise RuntimeError(
                f"an input of {type(self.module).__name__} was modified in place after its forward; "
                "it cannot be recomputed (use offload alpha=1 for this module)"
            )
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        devices = list(range(len(self.cuda_rng)))
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(self.cpu_rng)
            for d, state in enumerate(self.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            for dev, (enabled, dtype) in self.autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(dev, dtype=dtype))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(saved_tensors_hooks(pack, unpack))
            self.owner._depth += 1
            try:
                self.forward(*args, **kwargs)
            finally:
                self.owner._depth -= 1
        # the first forward already updated running statistics / code banks
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        missing = needed - store.keys()
        if missing:
            raise RuntimeError(
                f"recomputing {type(self.module).__name__} saved {counter[0]} tensors where the "
                f"forward saved {self.pack_count}: its forward is not deterministic in structure"
            )
        self.recomputed = store


class ActivationOffload:
    """Offload (fraction ``alpha``) and count the saved activations of a training step.

    ``alpha``: fraction of every saved activation moved to the host; the rest is recomputed.
    ``None`` disables offload (counting only). ``modules``: regular expressions searched in the
    qualified names of the modules whose calls may become offload frames; ``None`` takes every
    module inside the backbone (inside the root when there is no ``backbone``). A call becomes a
    frame only outside other frames, so in practice the frames are the backbone's top-level
    modules, or the deepest ones its methods call. Bottleneck modules are never frames.
    ``token_dim``: axis along which ``alpha`` splits.
    """

    def __init__(
        self,
        alpha: float | None = 1.0,
        modules: Sequence[str] | None = None,
        token_dim: int = -2,
        pin_memory: bool = True,
    ) -> None:
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"offload alpha must be in [0, 1] or None, got {alpha}")
        self.alpha: float = 1.0 if alpha is None else float(alpha)
        self.enabled = alpha is not None
        self.patterns = list(modules) if modules is not None else None
        self.token_dim = token_dim
        self.pin_memory = pin_memory
        self._counters = _StepCounters(set())
        self._stream: Any = None
        # > 0 while a frame's forward (or its recomputation) runs: nested candidates pass through
        self._depth = 0

    # ---- module selection -------------------------------------------------------------------
    def select_modules(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """Candidate frame modules (bottleneck and never-called containers excluded).

        A call of a candidate becomes a frame unless it happens inside another frame, so the
        outermost module that is actually called wins: a backbone that drives its child through
        a method (``stack.encode``) still gets frames at the cells that method calls.
        """
        named = dict(root.named_modules())
        if self.patterns is not None:
            regexes = [re.compile(p) for p in self.patterns]
            chosen = [n for n in named if n and any(r.search(n) for r in regexes)]
        else:
            parents = [n for n in named if n.split(".")[-1] == "backbone"] or [""]
            prefixes = tuple(f"{p}." if p else "" for p in parents)
            chosen = [n for n in named if n and n not in parents and n.startswith(prefixes)]
        return [
            (n, named[n])
            for n in chosen
            if not isinstance(named[n], (nn.ModuleList, nn.ModuleDict))
            and not any(is_bottleneck(named[a], a) for a in _ancestry(n))
        ]

    # ---- the step context -------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, root: nn.Module) -> Iterator[None]:
        """Context around one training step's forward: install frames and count saved bytes."""
        param_ptrs = {_storage_key(p)[0] for p in root.parameters()}
        counters = _StepCounters(param_ptrs)
        self._counters = counters
        installed: list[tuple[nn.Module, Any]] = []
        if self.enabled:
            for name, module in self.select_modules(root):
                installed.append((module, module.__dict__.get("forward")))
                module.forward = self._frame_forward(name, module, module.forward, counters)

        def pack(t: Tensor) -> _Kept:
            kept = _Kept(t.detach(), t._version)
            if not counters.is_param(t):
                counters.keep(t, kept)
            return kept

        try:
            with saved_tensors_hooks(pack, _Kept.get):
                yield
        finally:
            for module, previous in installed:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _frame_forward(
        self, name: str, module: nn.Module, forward: Callable[..., Any], counters: _StepCounters
    ) -> Callable[..., Any]:
        def frame_forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled() or self._depth > 0:
                return forward(*args, **kwargs)
            frame = _Frame(self, forward, module, args, kwargs, counters)
            self._depth += 1
            try:
                with saved_tensors_hooks(frame.pack, frame.unpack):
                    out = forward(*args, **kwargs)
            finally:
                self._depth -= 1
            frame.finalize((args, kwargs), out)
            counters.frame_names.append(name)
            return out

        return frame_forward

    @property
    def frame_names(self) -> list[str]:
        """Qualified names of the frames of the latest step, in call order."""
        return list(self._counters.frame_names)

    @property
    def stats(self) -> OffloadStats:
        """Counters of the latest step (fetched bytes grow while its backward runs)."""
        return self._counters.stats()

    # ---- transfers --------------------------------------------------------------------------
    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def to_host(self, part: Tensor) -> tuple[Tensor, Any]:
        """Copy to host memory; on CUDA pinned and non-blocking on the side stream."""
        if part.device.type != "cuda":
            # a host "device": copy all the same, so the accounting and the fetch path are real
            return part.clone(memory_format=torch.contiguous_format), None
        stream = self._side_stream(part.device)
        host = torch.empty(part.shape, dtype=part.dtype, pin_memory=self.pin_memory)
        stream.wait_stream(torch.cuda.current_stream(part.device))
        with torch.cuda.stream(stream):
            host.copy_(part, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        # the caching allocator must not hand this memory out before the copy has read it
        part.record_stream(stream)
        return host, event

    def to_device(self, handle: _Handle) -> Tensor:
        host = handle.host
        assert host is not None
        if handle.device.type != "cuda":
            return host.to(handle.device)
        stream = self._side_stream(handle.device)
        with torch.cuda.stream(stream):
            stream.wait_event(handle.event)
            out = host.to(handle.device, non_blocking=True)
        self.wait_prefetched(out)
        return out

    def prefetch_handle(self, handle: _Handle) -> None:
        """Issue the host-to-device copy of one offloaded part before backward needs it."""
        if handle.host is None or handle.prefetched is not None or handle.device.type != "cuda":
            return
        stream = self._side_stream(handle.device)
        with torch.cuda.stream(stream):
            stream.wait_event(handle.event)
            handle.prefetched = handle.host.to(handle.device, non_blocking=True)

    def wait_prefetched(self, out: Tensor) -> None:
        if out.device.type == "cuda":
            current = torch.cuda.current_stream(out.device)
            current.wait_stream(self._side_stream(out.device))
            out.record_stream(current)


def _ancestry(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
