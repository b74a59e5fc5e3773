"""Backbone + VQ bottleneck: the BeamVQ forecaster as a plain ``nn.Module``.

``forward`` gives the deterministic forecast through the nearest codes; ``candidates(x, k)``
gives the K alternative futures of BeamVQ (arXiv 2502.18925, stage 2): the latent is replaced by
its i-th nearest code at every position (rank-aligned, as the authors' code does), candidate 0
being the nearest-code forecast. ``rollout`` feeds forecasts back autoregressively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from beamvq.backbones.base import Backbone, Encoded
from beamvq.bottleneck import VQBottleneck


class ForecastOutput(NamedTuple):
    """One forecast step: frames ``y``, the bottleneck's auxiliary loss, code indices (or None)."""

    y: Tensor
    aux_loss: Tensor
    indices: Tensor | None


def next_window(window: Tensor, forecast: Tensor) -> Tensor:
    """The last ``T_in`` frames of ``window`` followed by ``forecast`` (time is dim -4)."""
    t_in = window.shape[-4]
    return torch.cat([window, forecast], dim=-4)[..., -t_in:, :, :, :]


class VQForecaster(nn.Module):
    """A backbone whose latent passes through an optional VQ bottleneck.

    Args:
        backbone: any ``Backbone``.
        bottleneck: a factory called with the backbone's ``latent_dim`` (so one YAML bottleneck
            fits every backbone), or ``None`` for the plain backbone.
    """

    def __init__(
        self, backbone: Backbone, bottleneck: Callable[[int], VQBottleneck] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.bottleneck = bottleneck(backbone.latent_dim) if bottleneck is not None else None

    @property
    def can_rollout(self) -> bool:
        return self.backbone.in_channels == self.backbone.out_channels

    def forward(self, x: Tensor) -> ForecastOutput:
        self.backbone.check_input(x)
        enc = self.backbone.encode(x)
        if self.bottleneck is None:
            return ForecastOutput(
                self.backbone.decode(self.backbone.translate(enc)), x.new_zeros(()), None
            )
        q = self.bottleneck(enc.z)
        y = self.backbone.decode(self.backbone.translate(enc._replace(z=q.z_q)))
        return ForecastOutput(y, q.aux_loss, q.indices)

    def candidates(self, x: Tensor, k: int) -> Tensor:
        """K alternative futures ``(B, k, T_out, C, H, W)``; candidate 0 is the nearest-code one."""
        self.backbone.check_input(x)
        if self.bottleneck is None:
            if k != 1:
                raise ValueError(f"candidates: k={k} needs a VQ bottleneck; this model has none")
            return self.forward(x).y.unsqueeze(1)
        enc = self.backbone.encode(x)
        cands_z = self.bottleneck.topk(enc.z, k)  # (B, k, D, ...)
        extras = tree_map(
            lambda t: t.repeat_interleave(k, dim=0) if isinstance(t, Tensor) else t, enc.extras
        )
        folded = Encoded(rearrange(cands_z, "b k d ... -> (b k) d ..."), extras)
        y = self.backbone.decode(self.backbone.translate(folded))
        return rearrange(y, "(b k) t c h w -> b k t c h w", k=k)

    def rollout(self, x: Tensor, steps: int) -> ForecastOutput:
        """Autoregressive forecast of ``steps × T_out`` frames; aux losses summed over steps."""
        if steps > 1 and not self.can_rollout:
            raise ValueError(
                "rollout_steps > 1 needs in_channels == out_channels (forecasts are fed back); "
                f"got {self.backbone.in_channels} and {self.backbone.out_channels}"
            )
        outs, aux, first_indices, window = [], x.new_zeros(()), None, x
        for step in range(steps):
            out = self.forward(window)
            outs.append(out.y)
            aux = aux + out.aux_loss
            if step == 0:
                first_indices = out.indices
            window = next_window(window, out.y)
        return ForecastOutput(torch.cat(outs, dim=1), aux, first_indices)

    def candidate_rollout(self, x: Tensor, k: int, steps: int) -> Tensor:
        """K members over ``steps`` steps, member i using its rank-i code at every step.

        ``(B, k, steps × T_out, C, H, W)``; member 0 equals the deterministic rollout in eval.
        """
        if self.bottleneck is None:
            if k != 1:
                raise ValueError(
                    f"candidate_rollout: k={k} needs a VQ bottleneck; this model has none"
                )
            return self.rollout(x, steps).y.unsqueeze(1)
        first = self.candidates(x, k)  # (B, k, T, ...)
        outs = [first]
        window = next_window(
            x.repeat_interleave(k, dim=0), rearrange(first, "b k t c h w -> (b k) t c h w")
        )
        for _ in range(steps - 1):
            enc = self.backbone.encode(window)  # batch B*k, member-major within each sample
            ranked = self.bottleneck.topk(enc.z, k)  # (B*k, k, D, ...)
            ranked = ranked.reshape(-1, k, k, *ranked.shape[2:])
            # member i keeps its own rank i: the diagonal of (member, rank)
            own = torch.stack([ranked[:, i, i] for i in range(k)], dim=1)
            y = self.backbone.decode(
                self.backbone.translate(enc._replace(z=rearrange(own, "b k d ... -> (b k) d ...")))
            )
            outs.append(rearrange(y, "(b k) t c h w -> b k t c h w", k=k))
            window = next_window(window, y)
        return torch.cat(outs, dim=2)
