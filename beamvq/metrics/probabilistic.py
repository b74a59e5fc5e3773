"""Ensemble scores: CRPS (Gneiting & Raftery, JASA 2007; the fair estimator of Ferro 2014) and
spread/skill (Fortuin et al., QJRMS 2014).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from beamvq.metrics.errors import _per_lead_mean, rmse_per_lead

__all__ = ["SpreadSkill", "crps_ensemble", "spread_skill"]


def crps_ensemble(members: Tensor, target: Tensor, fair: bool = False) -> Tensor:
    """CRPS of an ensemble per lead time: members (B, M, T, ...), target (B, T, ...) -> (T,).

    Default (``fair=False``): the energy form of the empirical ensemble CDF,
    mean_i |X_i - y| - 1/(2 M^2) sum_{i,j} |X_i - X_j|; with M = 1 it equals the MAE.
    ``fair=True``: Ferro's unbiased estimator, which divides the pair sum by M (M - 1) instead, so
    a finite ensemble drawn from the true distribution is not penalized for its size (needs M >= 2).
    The pair sum uses the sorted-member identity sum_{i,j}|x_i - x_j| = 2 sum_i (2i - M - 1) x_(i)
    (i = 1..M ascending): O(M log M) and no (M, M) pair tensor.
    """
    if members.dim() != target.dim() + 1 or members.shape[:1] + members.shape[2:] != target.shape:
        raise ValueError(
            f"members {tuple(members.shape)} must be target {tuple(target.shape)} with an M dim at 1"
        )
    m = members.shape[1]
    if fair and m < 2:
        raise ValueError("the fair CRPS needs at least two members")
    skill = (members - target.unsqueeze(1)).abs().mean(1)
    ranked = members.sort(dim=1).values
    rank_shape = [1] * members.dim()
    rank_shape[1] = m
    coef = (2 * torch.arange(1, m + 1, device=members.device, dtype=members.dtype) - m - 1).view(
        rank_shape
    )
    pair_sum = 2 * (coef * ranked).sum(1)
    pair_mean = pair_sum / (m * (m - 1) if fair else m * m)
    return _per_lead_mean(skill - 0.5 * pair_mean)


class SpreadSkill(NamedTuple):
    spread: Tensor  # (T,) sqrt of the mean unbiased ensemble variance
    skill: Tensor  # (T,) RMSE of the ensemble mean
    ratio: Tensor  # (T,) sqrt((M + 1) / M) * spread / skill; 1 for a calibrated ensemble


def spread_skill(members: Tensor, target: Tensor) -> SpreadSkill:
    """Ensemble spread, skill and their ratio per lead: members (B, M, T, ...), target (B, T, ...).

    spread = sqrt(mean over B and space of the unbiased (M - 1) member variance);
    skill = RMSE of the ensemble mean. For M members exchangeable with the truth, E[skill^2] =
    (1 + 1/M) E[spread^2], so the ratio includes the finite-ensemble factor sqrt((M + 1) / M)
    (Fortuin et al. 2014): a calibrated ensemble has ratio 1 at any M; spread and skill are raw.
    """
    if members.dim() != target.dim() + 1 or members.shape[:1] + members.shape[2:] != target.shape:
        raise ValueError(
            f"members {tuple(members.shape)} must be target {tuple(target.shape)} with an M dim at 1"
        )
    m = members.shape[1]
    if m < 2:
        raise ValueError("spread needs at least two members")
    spread = _per_lead_mean(members.var(dim=1, unbiased=True)).sqrt()
    skill = rmse_per_lead(members.mean(1), target)
    ratio = math.sqrt((m + 1) / m) * spread / skill
    return SpreadSkill(spread=spread, skill=skill, ratio=ratio)
