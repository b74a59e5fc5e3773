"""Per-channel normalization of physical fields with the training split's statistics.

The model sees ``(field - mean) / std`` per channel; every metric is computed on de-normalized
fields. The statistics are buffers, so they travel in the checkpoint and a model predicts in
physical units without its training data. They come from the datamodule's training split
(``beamvq.protocols.ForecastData.normalization``) and are set once: a checkpoint's statistics,
restored after ``setup``, win over the data's. A forecast from inputs alone (``beamvq predict``
with ``data.predict``, ``beamvq.forecast``) has no training split: the data give none, and the
checkpoint's are the only ones (never statistics of the inputs).

Checkpoint layout: the module holds a ``Normalizer`` as ``normalizer``, so its buffers are
``normalizer.mean``, ``normalizer.std`` and ``normalizer.ready``. Checkpoints written before
that hold them at the top level as ``norm_mean``, ``norm_std`` and ``norm_ready``;
``upgrade_legacy_keys`` renames them on load.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LEGACY_KEYS", "Normalizer", "upgrade_legacy_keys"]

# buffer name in checkpoints written before the Normalizer -> its name now (under the module)
LEGACY_KEYS = {
    "norm_mean": "normalizer.mean",
    "norm_std": "normalizer.std",
    "norm_ready": "normalizer.ready",
}


class Normalizer(nn.Module):
    """Per-channel mean/std buffers of ``channels`` channels (identity until ``set``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def set(self, mean: np.ndarray | Tensor, std: np.ndarray | Tensor) -> None:
        """Set the statistics (one value per channel) and mark them ready."""
        mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.mean.numel():
            raise ValueError(
                f"normalization has {mean_t.numel()} channels but the backbone outputs "
                f"{self.mean.numel()} (backbone out_channels vs data.variables)"
            )
        self.mean.copy_(mean_t)
        self.std.copy_(std_t)
        self.ready.fill_(True)

    @property
    def is_set(self) -> bool:
        return bool(self.ready)

    def normalize(self, field: Tensor) -> Tensor:
        """Physical ``(..., C, H, W)`` -> model space."""
        return (field - self.mean[:, None, None]) / self.std[:, None, None]

    def denormalize(self, field: Tensor) -> Tensor:
        """Model space ``(..., C, H, W)`` -> physical."""
        return field * self.std[:, None, None] + self.mean[:, None, None]


def upgrade_legacy_keys(state: MutableMapping[str, Any], prefix: str = "") -> None:
    """Rename the top-level normalization buffers of an old checkpoint in place (under
    ``prefix``, the module's prefix in ``state``); keys already in the new layout are kept."""
    for old, new in LEGACY_KEYS.items():
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)


def legacy_keys_pre_hook(
    module: nn.Module, state: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    """``nn.Module.register_load_state_dict_pre_hook`` form of ``upgrade_legacy_keys``."""
    upgrade_legacy_keys(state, prefix)
