"""Recomputation of one offload frame: replay a module call to get back dropped activations.

Part of the activation offload of :mod:`beamvq.quant.offload` (MEMO, arXiv 2407.12117: the
part of each activation that is not offloaded is recomputed). A :class:`CallReplay` keeps what
one call needs to run again identically: its inputs (detached, sharing the version counter, so
an in-place change after the forward is detected), the CPU/CUDA RNG states (dropout masks
match) and the autocast state; after the replay the module's buffers are restored, so
BatchNorm statistics and VQ code banks are updated once, not twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_map


def _versions(tree: Any) -> list[int]:
    return [a._version for a in tree_flatten(tree)[0] if isinstance(a, Tensor)]


class CallReplay:
    """One module call, kept so that its forward can run again in backward."""

    def __init__(
        self,
        forward: Callable[..., Any],
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.forward = forward
        self.module = module
        self.inputs = tree_map(
            lambda a: a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a,
            (args, kwargs),
        )
        # detach() shares the version counter: an in-place change of an input shows up
        self.versions = _versions(self.inputs)
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

    @contextlib.contextmanager
    def _call_state(self) -> Iterator[None]:
        """The RNG and autocast state of the original call, with grad enabled."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=list(range(len(self.cuda_rng)))))
            torch.set_rng_state(self.cpu_rng)
            for d, state in enumerate(self.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            for dev, (enabled, dtype) in self.autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(dev, dtype=dtype))
            stack.enter_context(torch.enable_grad())
            yield

    def run(self, needed: set[int], packed: int, nested: Callable[[], Any]) -> dict[int, Tensor]:
        """Saved tensors number ``needed`` (pack order) of a replay of the call.

        ``packed``: how many tensors the original forward saved (for the error message);
        ``nested``: a context manager factory marking the replay as running inside a frame.
        """
        name = type(self.module).__name__
        if _versions(self.inputs) != self.versions:
            raise RuntimeError(
                f"an input of {name} was modified in place after its forward; "
                "it cannot be recomputed (use offload alpha=1 for this module)"
            )
        store: dict[int, Tensor] = {}
        counter = [0]

        def pack(t: Tensor) -> None:
            i = counter[0]
            counter[0] += 1
            if i in needed:
                base = t._base if type(t) is torch.Tensor and t._base is not None else t
                store[i] = base.detach()

        def unpack(_: Any) -> Tensor:
            raise RuntimeError("the recomputation graph of an offload frame is never run")

        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        args, kwargs = self.inputs
        with self._call_state(), saved_tensors_hooks(pack, unpack), nested():
            self.forward(*args, **kwargs)
        # the first forward already updated running statistics / code banks
        with torch.no_grad():
            for n, b in self.module.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        if needed - store.keys():
            raise RuntimeError(
                f"recomputing {name} saved {counter[0]} tensors where the forward saved "
                f"{packed}: its forward is not deterministic in structure"
            )
        return store
