"""Contingency scores CSI/POD/SUCR/BIAS with counts pooled over the evaluation set and the SEVIR VIL
thresholds (Veillette et al., NeurIPS 2020; as used by Earthformer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from beamvq.metrics.errors import _check_same_shape

__all__ = [
    "Contingency",
    "SEVIR_THRESHOLDS",
    "bias",
    "contingency_counts",
    "csi",
    "csi_m",
    "pod",
    "pool_contingency",
    "sucr",
]


# SEVIR VIL thresholds on the 0-255 scale (Veillette et al. 2020), written out as the paper fixes them.
SEVIR_THRESHOLDS: tuple[float, ...] = (16.0, 74.0, 133.0, 160.0, 181.0, 219.0)


class Contingency(NamedTuple):
    """Contingency counts (int64), shape (n_thr,) or (T, n_thr). Pool them, then divide."""

    hits: Tensor
    misses: Tensor
    false_alarms: Tensor
    correct_negatives: Tensor


def contingency_counts(
    pred: Tensor, target: Tensor, thresholds: Sequence[float], per_lead: bool = False
) -> Contingency:
    """Count hits/misses/false alarms/correct negatives of ``pred >= tau`` vs ``target >= tau``.

    pred, target: (B, T, ...). Returns int64 counts of shape (n_thr,), or (T, n_thr) when
    ``per_lead``. NaN values count as "no event" on either side (NaN >= tau is False).
    """
    _check_same_shape(pred, target)
    if len(thresholds) == 0:
        raise ValueError("thresholds must not be empty")
    p_flat = rearrange(pred, "b t ... -> t (b ...)")
    o_flat = rearrange(target, "b t ... -> t (b ...)")
    fields: list[list[Tensor]] = [[], [], [], []]
    # a loop over the few thresholds keeps memory at one boolean field per threshold
    for tau in thresholds:
        p = p_flat >= tau
        o = o_flat >= tau
        fields[0].append((p & o).sum(1))
        fields[1].append((~p & o).sum(1))
        fields[2].append((p & ~o).sum(1))
        fields[3].append((~p & ~o).sum(1))
    stacked = [torch.stack(f, dim=-1).to(torch.int64) for f in fields]  # (T, n_thr)
    if not per_lead:
        stacked = [s.sum(0) for s in stacked]
    return Contingency(*stacked)


def pool_contingency(items: Sequence[Contingency]) -> Contingency:
    """Sum contingency counts field by field (``+`` on NamedTuples would concatenate)."""
    if len(items) == 0:
        raise ValueError("nothing to pool")
    return Contingency(*(torch.stack(list(f)).sum(0) for f in zip(*items)))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den in float64, NaN where den == 0 (the score is undefined, not 0 or 1)."""
    num = num.double()
    den = den.double()
    nan = torch.full_like(den, float("nan"))
    return torch.where(den > 0, num / den.clamp_min(1.0), nan)


def csi(c: Contingency) -> Tensor:
    """Critical success index H / (H + M + F); NaN where H + M + F = 0."""
    return _ratio(c.hits, c.hits + c.misses + c.false_alarms)


def pod(c: Contingency) -> Tensor:
    """Probability of detection H / (H + M); NaN where no event was observed."""
    return _ratio(c.hits, c.hits + c.misses)


def sucr(c: Contingency) -> Tensor:
    """Success ratio H / (H + F) = 1 - FAR; NaN where no event was forecast."""
    return _ratio(c.hits, c.hits + c.false_alarms)


def bias(c: Contingency) -> Tensor:
    """Frequency bias (H + F) / (H + M); NaN where no event was observed."""
    return _ratio(c.hits + c.false_alarms, c.hits + c.misses)


def csi_m(c: Contingency) -> Tensor:
    """CSI-M: mean CSI over the thresholds (last dim), over those where CSI is defined.

    Thresholds with no event in forecast or truth over the pooled set are skipped (nanmean);
    the result is NaN only if CSI is undefined at every threshold.
    """
    return torch.nanmean(csi(c), dim=-1)
