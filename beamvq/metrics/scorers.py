"""Candidate scorers of the beam search: higher is better, one score per candidate (BeamVQ, arXiv
2405.17051, 2502.18925; conservation and non-negativity are beamvq additions for reference-free
search).

Here: the contract (``Scorer``, from ``beamvq.metrics.scorer_base``) and the generic scorers
against a reference (CSI, -MSE, SSIM) and their weighted sum. The physics-aware, reference-free
ones are in ``beamvq.metrics.physics_scorers``; this module re-exports them, so every scorer
keeps its ``beamvq.metrics.scorers.X`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange, reduce
from torch import Tensor

from beamvq import arguments
from beamvq.arguments import init_arg
from beamvq.metrics.categorical import SEVIR_THRESHOLDS
from beamvq.metrics.physics_scorers import (
    ConservationScorer,
    DivergenceScorer,
    NonNegativityScorer,
    SpectrumScorer,
    TKEScorer,
)
from beamvq.metrics.scorer_base import Scorer, check_channel
from beamvq.metrics.structure import ssim

__all__ = [
    "CSIScorer",
    "ConservationScorer",
    "DivergenceScorer",
    "NegMSEScorer",
    "NonNegativityScorer",
    "SSIMScorer",
    "Scorer",
    "SpectrumScorer",
    "TKEScorer",
    "WeightedScorer",
]


class CSIScorer(Scorer):
    """Mean CSI over thresholds, per sample and candidate (counts over T, C, H, W, or over T, H, W
    of ``channel`` only).

    The thresholds are in physical units and apply to every channel counted: with several
    variables give ``channel`` (the one the thresholds belong to, e.g. VIL), else a large-unit
    variable exceeds them everywhere.

    Where neither the candidate nor the reference reaches a threshold (H + M + F = 0), the
    candidate agrees perfectly that there is no event there and that threshold scores 1. So every
    candidate of a sample is averaged over the same thresholds, and a candidate that hallucinates
    an extreme the truth lacks (F > 0, H = M = 0) scores 0 at that threshold.
    """

    requires_reference = True

    def __init__(
        self, thresholds: Sequence[float] = SEVIR_THRESHOLDS, channel: int | None = None
    ) -> None:
        if len(thresholds) == 0:
            raise ValueError("CSIScorer: init_args.thresholds must not be empty")
        for i, tau in enumerate(thresholds):
            arguments.finite(init_arg("CSIScorer", f"thresholds[{i}]"), tau)
        self.thresholds = [float(t) for t in thresholds]
        self.channel = channel

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        assert reference is not None
        ref = reference.unsqueeze(1)
        if self.channel is not None:
            check_channel(cands, self.channel)
            c = self.channel % cands.shape[3]
            cands, ref = cands[:, :, :, c : c + 1], ref[:, :, :, c : c + 1]
        total = torch.zeros(cands.shape[:2], dtype=torch.float32, device=cands.device)
        for tau in self.thresholds:
            p = cands >= tau
            o = ref >= tau
            hits = (p & o).sum(dim=(2, 3, 4, 5)).float()
            miss_fa = (p ^ o).sum(dim=(2, 3, 4, 5)).float()
            den = hits + miss_fa
            total += torch.where(den > 0, hits / den.clamp_min(1.0), torch.ones_like(den))
        return total / len(self.thresholds)


class NegMSEScorer(Scorer):
    """-MSE against the reference over (T, C, H, W).

    The search hands physical fields, so by default (no option set) the channels are pooled in
    their own units: with several variables (z500 in m² s⁻², t850 in K) the largest-unit one
    decides the ranking alone. Two options weigh the channels instead; the score is then
    ``-mean over channels of w_c · MSE_c`` (the plain -MSE when every ``w_c`` is 1):

    Args:
        normalize: divide each channel's MSE by its variance ``std_c²`` over the training targets
            that ``fit`` is given (``BeamSearchAugmentation`` calls it at every fit start with up
            to ``fit_windows`` training targets, so the std approximates the datamodule's
            normalization std), so the score is the MSE in normalized units and every variable
            counts alike. Only with ``normalize`` does the scorer have a ``fit``, so by default
            nothing loads training data for it.
        channel_weights: one weight ``w_c >= 0`` per channel (multiplied with ``1 / std_c²`` under
            ``normalize``), e.g. to favour the variables the forecast is judged on.

    Under either option the score (and so a search ``margin`` or a ``WeightedScorer`` weight) is
    in these weighted units, not physical ones. One channel, no options: unchanged.
    """

    requires_reference = True

    def __init__(self, normalize: bool = False, channel_weights: list[float] | None = None) -> None:
        if channel_weights is not None:
            key = init_arg("NegMSEScorer", "channel_weights")
            if len(channel_weights) == 0:
                raise ValueError(f"{key} must be non-empty and >= 0, got {channel_weights}")
            for i, w in enumerate(channel_weights):
                arguments.non_negative(f"{key}[{i}]", w)
            if not any(w > 0 for w in channel_weights):
                raise ValueError("channel_weights: at least one weight must be positive")
        self.normalize = bool(normalize)
        self.channel_weights = (
            None if channel_weights is None else [float(w) for w in channel_weights]
        )
        self.channel_std: Tensor | None = None

    def check_channels(self, channels: int, where: str) -> None:
        """One weight per data channel (``channel_weights``)."""
        super().check_channels(channels, where)
        weights = self.channel_weights
        if weights is not None and len(weights) != channels:
            raise ValueError(
                f"{where}: NegMSEScorer init_args.channel_weights has {len(weights)} weight(s) "
                f"for the data's {channels} channel(s)"
            )

    @property
    def fit(self) -> Callable[[Tensor], NegMSEScorer] | None:
        """``fit(fields)`` under ``normalize`` (callers test ``callable(getattr(s, "fit"))``),
        else ``None``: the default scorer needs no training data."""
        return self._fit if self.normalize else None

    def _fit(self, fields: Tensor) -> NegMSEScorer:
        """Store the per-channel std of training targets ``(N, T, C, H, W)``; returns self."""
        if fields.dim() != 5:
            raise ValueError(f"fit fields must be (N, T, C, H, W), got {tuple(fields.shape)}")
        std = fields.double().transpose(0, 2).reshape(fields.shape[2], -1).std(dim=1)
        if not bool(torch.isfinite(std).all()) or bool((std <= 0).any()):
            raise ValueError(f"NegMSEScorer.fit: a channel has no spread (std {std.tolist()})")
        self.channel_std = std.float().cpu()
        return self

    def _weights(self, channels: int) -> Tensor | None:
        """Per-channel weights ``(C,)``, or ``None`` for the plain -MSE."""
        if not self.normalize and self.channel_weights is None:
            return None
        w = torch.ones(channels, dtype=torch.float64)
        if self.channel_weights is not None:
            if len(self.channel_weights) != channels:
                raise ValueError(
                    f"channel_weights has {len(self.channel_weights)} weights for {channels} "
                    "channels"
                )
            w = w * torch.tensor(self.channel_weights, dtype=torch.float64)
        if self.normalize:
            if self.channel_std is None:
                raise RuntimeError("NegMSEScorer(normalize=True).fit(fields) must run first")
            if self.channel_std.numel() != channels:
                raise ValueError(
                    f"fitted on {self.channel_std.numel()} channels, scoring {channels}"
                )
            w = w / self.channel_std.double().square()
        return w

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        assert reference is not None
        w = self._weights(cands.shape[3])
        if w is None:
            return -reduce((cands - reference.unsqueeze(1)).square(), "b k ... -> b k", "mean")
        per_channel = reduce(
            (cands - reference.unsqueeze(1)).square(), "b k t c h w -> b k c", "mean"
        )
        return -(per_channel * w.to(per_channel)).mean(-1)


class SSIMScorer(Scorer):
    """SSIM against the reference, averaged over lead time and channels."""

    requires_reference = True

    def __init__(self, data_range: float, window: int = 11, sigma: float = 1.5) -> None:
        arguments.positive(init_arg("SSIMScorer", "data_range"), data_range)
        arguments.odd_int(init_arg("SSIMScorer", "window"), window)
        arguments.positive(init_arg("SSIMScorer", "sigma"), sigma)
        self.data_range = data_range
        self.window = window
        self.sigma = sigma

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        assert reference is not None
        b, k = cands.shape[:2]
        ref = reference.unsqueeze(1).expand_as(cands)
        flat = ssim(
            rearrange(cands, "b k ... -> (b k) ..."),
            rearrange(ref, "b k ... -> (b k) ..."),
            self.data_range,
            self.window,
            self.sigma,
        )
        return rearrange(flat, "(b k) -> b k", b=b, k=k)


class WeightedScorer(Scorer):
    """sum_i weight_i * scorer_i. The parts' scales differ (CSI in [0, 1], -MSE in physical
    units squared, or normalized with ``NegMSEScorer(normalize=True)``, which keeps one
    variable's units from deciding), so the weights also set the units; ``fit`` forwards to
    parts that have one."""

    def __init__(self, scorers: list[Scorer], weights: list[float]) -> None:
        if len(scorers) == 0:
            raise ValueError("WeightedScorer needs at least one scorer")
        if len(scorers) != len(weights):
            raise ValueError(
                f"WeightedScorer: {len(scorers)} scorers but {len(weights)} weights "
                "(init_args.scorers and init_args.weights pair up)"
            )
        for i, w in enumerate(weights):
            arguments.finite(init_arg("WeightedScorer", f"weights[{i}]"), w)
        self.scorers = list(scorers)
        self.weights = [float(w) for w in weights]
        self.requires_reference = any(getattr(s, "requires_reference", False) for s in self.scorers)

    def check_channels(self, channels: int, where: str) -> None:
        """The channels of every part."""
        for i, s in enumerate(self.scorers):
            check = getattr(s, "check_channels", None)
            if callable(check):
                check(channels, f"{where}.init_args.scorers[{i}]")

    def fit(self, fields: Tensor) -> WeightedScorer:
        for s in self.scorers:
            fit = getattr(s, "fit", None)
            if callable(fit):
                fit(fields)
        return self

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        total = torch.zeros(cands.shape[:2], dtype=torch.float32, device=cands.device)
        for s, w in zip(self.scorers, self.weights):
            total = total + w * s(cands, reference, inputs=inputs).float()
        return total
