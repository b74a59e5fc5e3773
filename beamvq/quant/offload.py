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

This module holds the public part (module selection, the step context); the parts are
:mod:`~beamvq.quant.offload_frame` (one frame's saved tensors), :mod:`~beamvq.quant.offload_replay`
(recomputation), :mod:`~beamvq.quant.offload_transfer` (host copies and prefetch) and
:mod:`~beamvq.quant.offload_accounting` (the byte counters).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

from beamvq.quant.convert import is_bottleneck
from beamvq.quant.offload_accounting import OffloadStats, StepCounters, storage_key
from beamvq.quant.offload_frame import Frame, Kept
from beamvq.quant.offload_transfer import HostTransfers

log = logging.getLogger(__name__)

__all__ = ["ActivationOffload", "OffloadStats"]


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
        self.transfers = HostTransfers(pin_memory)
        self._counters = StepCounters(set())
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
        chosen = self._matching(named) if self.patterns is not None else _in_backbone(named)
        return [(n, named[n]) for n in chosen if _may_be_frame(n, named)]

    def _matching(self, named: dict[str, nn.Module]) -> list[str]:
        regexes = [re.compile(p) for p in self.patterns or ()]
        return [n for n in named if n and any(r.search(n) for r in regexes)]

    # ---- the step context -------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, root: nn.Module) -> Iterator[None]:
        """Context around one training step's forward: install frames and count saved bytes."""
        param_ptrs = {storage_key(p)[0] for p in root.parameters()}
        counters = StepCounters(param_ptrs)
        self._counters = counters
        installed: list[tuple[nn.Module, Any]] = []
        if self.enabled:
            for name, module in self.select_modules(root):
                installed.append((module, module.__dict__.get("forward")))
                module.forward = self._frame_forward(name, module, module.forward, counters)

        def pack(t: Tensor) -> Kept:
            kept = Kept(t.detach(), t._version)
            if not counters.is_param(t):
                counters.keep(t, kept)
            return kept

        try:
            with saved_tensors_hooks(pack, Kept.get):
                yield
        finally:
            for module, previous in installed:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    @contextlib.contextmanager
    def nested(self) -> Iterator[None]:
        """Marks a frame's forward (or its recomputation) as running: no frames inside it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _frame_forward(
        self, name: str, module: nn.Module, forward: Callable[..., Any], counters: StepCounters
    ) -> Callable[..., Any]:
        def frame_forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled() or self._depth > 0:
                return forward(*args, **kwargs)
            frame = Frame(self, forward, module, args, kwargs, counters)
            with self.nested(), saved_tensors_hooks(frame.pack, frame.unpack):
                out = forward(*args, **kwargs)
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


def _in_backbone(named: dict[str, nn.Module]) -> list[str]:
    """Every module inside the backbone(s), or inside the root when there is no ``backbone``."""
    parents = [n for n in named if n.split(".")[-1] == "backbone"] or [""]
    prefixes = tuple(f"{p}." if p else "" for p in parents)
    return [n for n in named if n and n not in parents and n.startswith(prefixes)]


def _may_be_frame(name: str, named: dict[str, nn.Module]) -> bool:
    """Not a container that is never called, and nowhere inside the bottleneck."""
    if isinstance(named[name], (nn.ModuleList, nn.ModuleDict)):
        return False
    return not any(is_bottleneck(named[a], a) for a in _ancestry(name))


def _ancestry(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
