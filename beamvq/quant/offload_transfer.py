"""Device <-> host copies of offloaded activations (pinned, non-blocking, on a side stream).

Part of the activation offload of :mod:`beamvq.quant.offload` (MEMO, arXiv 2407.12117). On a
GPU the copies run on one side CUDA stream, so they overlap with compute; the caching allocator
is told which stream uses which memory (``record_stream``). On a host "device" the copies are
plain clones, so the accounting and the fetch path are the same everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class HostTransfers:
    """Copies to pinned host buffers and back, ordered through one side stream per device."""

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory
        self._stream: Any = None

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def to_host(self, part: Tensor) -> tuple[Tensor, Any]:
        """Copy to host memory; on CUDA pinned and non-blocking on the side stream.

        Returns the host tensor and the CUDA event that marks the end of the copy (``None``
        off CUDA).
        """
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

    def start_to_device(self, host: Tensor, event: Any, device: torch.device) -> Tensor:
        """Issue the host-to-device copy on the side stream (call :meth:`wait` before use)."""
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            stream.wait_event(event)
            return host.to(device, non_blocking=True)

    def to_device(self, host: Tensor, event: Any, device: torch.device) -> Tensor:
        """The host copy back on ``device``, ready for the current stream."""
        if device.type != "cuda":
            return host.to(device)
        out = self.start_to_device(host, event, device)
        self.wait(out)
        return out

    def wait(self, out: Tensor) -> None:
        """Make the current stream wait for a copy issued by :meth:`start_to_device`."""
        if out.device.type == "cuda":
            current = torch.cuda.current_stream(out.device)
            current.wait_stream(self._side_stream(out.device))
            out.record_stream(current)
