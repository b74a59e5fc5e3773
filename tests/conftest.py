"""Test-wide settings: one torch thread (the test tensors are tiny; on a 2-core machine thread
hand-offs cost more than they save), W&B kept off the network, and the distributed launch
variables a test sets undone after it.

The last matters for Lightning: a DDP fit run in-process sets ``LOCAL_RANK``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in ``os.environ`` and leaves them there. A later ``beamvq fit
--trainer.strategy ddp`` subprocess that inherits ``LOCAL_RANK`` believes an external launcher
started its ranks, never starts rank 1, and waits for it forever (this hung CI). Only these
variables are restored: restoring the whole environment would also bring back a stale
``WANDB_SERVICE`` after a test stopped the W&B service, and the next W&B run would try to reach
the dead one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


LAUNCH_ENV = (
    "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_launch_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in LAUNCH_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
