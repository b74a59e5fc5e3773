"""Test-wide settings: one torch thread (the test tensors are tiny; on a 2-core machine thread
hand-offs cost more than they save) and W&B kept off the network."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)
