"""Candidate scorers of the beam search: higher is better, one score per candidate (BeamVQ, arXiv
2405.17051, 2502.18925; conservation and non-negativity are beamvq additions for reference-free
search).

Here: the contract (``Scorer``, from ``beamvq.metrics.scorer_base``) and the generic scorers
against a reference (CSI, -MSE, SSIM) and their weighted sum. The physics-aware, reference-free
ones are in ``beamvq.metrics.physics_scorers``; this module re-exports them, so every scorer
keeps its ``beamvq.metrics.scorers.X`` path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange, reduce
from torch import Tensor

from beamvq.metrics.categorical import SEVIR_THRESHOLDS
from beamvq.metrics.physics_scorers import (
    ConservationScorer,
    DivergenceScorer,
    NonNegativityScorer,
    SpectrumScorer,
    TKEScorer,
)
from beamvq.metrics.scorer_base import Scorer
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
    """Mean CSI over thresholds, per sample and candidate (counts over T, C, H, W).

    Where neither the candidate nor the reference reaches a threshold (H + M + F = 0), the
    candidate agrees perfectly that there is no event there and that threshold scores 1. So every
    candidate of a sample is averaged over the same thresholds, and a candidate that hallucinates
    an extreme the truth lacks (F > 0, H = M = 0) scores 0 at that threshold.
    """

    requires_reference = True

    def __init__(self, thresholds: Sequence[float] = SEVIR_THRESHOLDS) -> None:
        if len(thresholds) == 0:
            raise ValueError("thresholds must not be empty")
        self.thresholds = [float(t) for t in thresholds]

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        assert reference is not None
        ref = reference.unsqueeze(1)
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
    """-MSE against the reference over (T, C, H, W)."""

    requires_reference = True

    def __init__(self) -> None:
        pass

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        assert reference is not None
        return -reduce((cands - reference.unsqueeze(1)).square(), "b k ... -> b k", "mean")


class SSIMScorer(Scorer):
    """SSIM against the reference, averaged over lead time and channels."""

    requires_reference = True

    def __init__(self, data_range: float, window: int = 11, sigma: float = 1.5) -> None:
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
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
    units squared), so the weights also set the units; ``fit`` forwards to parts that have one."""

    def __init__(self, scorers: list[Scorer], weights: list[float]) -> None:
        if len(scorers) == 0:
            raise ValueError("WeightedScorer needs at least one scorer")
        if len(scorers) != len(weights):
            raise ValueError(f"{len(scorers)} scorers but {len(weights)} weights")
        self.scorers = list(scorers)
        self.weights = [float(w) for w in weights]
        self.requires_reference = any(getattr(s, "requires_reference", False) for s in self.scorers)

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
