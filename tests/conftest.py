"""Test-wide settings: one torch thread (the test tensors are tiny; on a 2-core machine thread
hand-offs cost more than they save), W&B kept off the network, and each test's changes to the
environment undone after it.

The last matters for Lightning: a DDP fit run in-process sets ``LOCAL_RANK``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in ``os.environ`` and leaves them there. A later ``beamvq fit
--trainer.strategy ddp`` subprocess that inherits ``LOCAL_RANK`` believes an external launcher
started its ranks, never starts rank 1, and waits for it forever (this hung CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
