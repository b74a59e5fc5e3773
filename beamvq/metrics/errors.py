"""Pointwise error metrics: per-lead MSE/MAE/RMSE, relative L2 (Li et al., ICLR 2021), summed
errors for exact pooling, and WeatherBench's latitude-weighted RMSE and ACC (Rasp et al., JAMES 2020).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange, reduce
from torch import Tensor

__all__ = [
    "ErrorSums",
    "error_sums",
    "lat_weighted_acc",
    "lat_weighted_rmse",
    "latitude_weights",
    "mae_per_lead",
    "mse_per_lead",
    "rel_l2",
    "rel_l2_per_sample",
    "rmse_per_lead",
]


def _check_same_shape(pred: Tensor, target: Tensor, min_dim: int = 2) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() < min_dim:
        raise ValueError(f"expected at least {min_dim} dims (B, T, ...), got {tuple(pred.shape)}")


def _per_lead_mean(x: Tensor) -> Tensor:
    """Mean over every dim except the lead-time dim 1: (B, T, ...) -> (T,)."""
    return reduce(rearrange(x, "b t ... -> b t (...)"), "b t n -> t", "mean")


def mse_per_lead(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per lead time: (B, T, ...) -> (T,)."""
    _check_same_shape(pred, target)
    return _per_lead_mean((pred - target).square())


def mae_per_lead(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per lead time: (B, T, ...) -> (T,)."""
    _check_same_shape(pred, target)
    return _per_lead_mean((pred - target).abs())


def rmse_per_lead(pred: Tensor, target: Tensor) -> Tensor:
    """Root of the per-lead MSE pooled over the batch (not a mean of per-sample RMSEs): (T,)."""
    return mse_per_lead(pred, target).sqrt()


def rel_l2_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """||pred - target||_2 / ||target||_2 over all dims but the batch: (B, ...) -> (B,).

    Exposed separately so a training module can pool the sum and the count across batches.
    """
    _check_same_shape(pred, target, min_dim=1)
    diff = rearrange(pred - target, "b ... -> b (...)")
    ref = rearrange(target, "b ... -> b (...)")
    return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(ref, dim=1)


def rel_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Relative L2 error of the FNO paper: mean over samples of ||pred-y||/||y|| (scalar)."""
    return rel_l2_per_sample(pred, target).mean()


class ErrorSums(NamedTuple):
    """Sums to pool across batches and ranks; divide at epoch end (mse = sq_err / count)."""

    sq_err: Tensor  # (T,) sum of squared errors, float64
    abs_err: Tensor  # (T,) sum of absolute errors, float64
    count: Tensor  # (T,) number of elements summed, float64


def error_sums(pred: Tensor, target: Tensor) -> ErrorSums:
    """Per-lead sums of squared and absolute errors and element counts, in float64.

    float64 keeps the pooled sums exact enough over a whole evaluation set (fp32 loses digits
    once the sums reach ~1e7 elements).
    """
    _check_same_shape(pred, target)
    diff = rearrange(pred.double() - target.double(), "b t ... -> t (b ...)")
    count = torch.full(
        (diff.shape[0],), float(diff.shape[1]), dtype=torch.float64, device=diff.device
    )
    return ErrorSums(sq_err=diff.square().sum(1), abs_err=diff.abs().sum(1), count=count)


def latitude_weights(lat_deg: Tensor) -> Tensor:
    """cos(latitude) weights normalized to mean 1: (H,) -> (H,)."""
    w = torch.cos(torch.deg2rad(lat_deg.double()))
    return (w / w.mean()).to(lat_deg.dtype if lat_deg.is_floating_point() else torch.float32)


def lat_weighted_rmse(pred: Tensor, target: Tensor, lat: Tensor) -> Tensor:
    """Latitude-weighted RMSE per lead: (B, T, C, H, W) with lat (H,) in degrees -> (T,).

    sqrt of the cos(lat)-weighted MSE pooled over batch, channels and the grid (the WeatherBench 2
    convention: square root after averaging over forecasts).
    """
    _check_same_shape(pred, target, min_dim=3)
    if lat.shape != (pred.shape[-2],):
        raise ValueError(f"lat {tuple(lat.shape)} must be ({pred.shape[-2]},) to match H")
    w = latitude_weights(lat).to(pred.dtype).view(-1, 1)
    return _per_lead_mean((pred - target).square() * w).sqrt()


def lat_weighted_acc(pred: Tensor, target: Tensor, climatology: Tensor, lat: Tensor) -> Tensor:
    """Anomaly correlation coefficient per sample, lead and channel (WeatherBench).

    ``(B, T, C, H, W)`` fields, ``climatology (C, H, W)`` (training-split mean), ``lat (H,)`` in
    degrees -> ``(B, T, C)``: Σw f'o' / sqrt(Σw f'² · Σw o'²) with f' = pred − clim,
    o' = target − clim and w ∝ cos(latitude).
    """
    _check_same_shape(pred, target, min_dim=3)
    if lat.shape != (pred.shape[-2],):
        raise ValueError(f"lat {tuple(lat.shape)} must be ({pred.shape[-2]},) to match H")
    w = latitude_weights(lat).to(pred.dtype).view(-1, 1)
    f, o = pred - climatology, target - climatology
    num = (w * f * o).sum((-2, -1))
    den = ((w * f * f).sum((-2, -1)) * (w * o * o).sum((-2, -1))).sqrt()
    return num / den.clamp_min(torch.finfo(pred.dtype).tiny)
