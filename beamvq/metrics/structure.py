"""SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004): Gaussian window, sigma 1.5, K1 = 0.01,
K2 = 0.03.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor

from beamvq.metrics.errors import _check_same_shape

__all__ = ["ssim"]


def _gaussian_window(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: Tensor, target: Tensor, data_range: float, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """Structural similarity (Wang et al. 2004) per sample: (B, ..., H, W) -> (B,).

    Gaussian window (``window`` taps, ``sigma``), K1 = 0.01, K2 = 0.03, "valid" filtering (no
    padding, as in the reference MATLAB code), SSIM map averaged over (H, W) and then over every
    middle dim (lead time, channel). ``data_range`` is max - min of the physical scale (255 for VIL).
    """
    _check_same_shape(pred, target, min_dim=3)
    height, width = pred.shape[-2:]
    if window % 2 == 0 or window < 1:
        raise ValueError(f"window must be a positive odd number, got {window}")
    if height < window or width < window:
        raise ValueError(f"SSIM window {window} does not fit the {height}x{width} grid")
    batch = pred.shape[0]
    x = rearrange(pred, "b ... h w -> (b ...) 1 h w")
    x = x if x.is_floating_point() else x.float()
    y = rearrange(target, "b ... h w -> (b ...) 1 h w").to(x.dtype)
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    gy = rearrange(g, "k -> 1 1 k 1")
    gx = rearrange(g, "k -> 1 1 1 k")

    def blur(f: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(f, gy), gx)

    # (co)variances are shift-invariant: compute them on frame-centred fields so that
    # E[x^2] - E[x]^2 does not cancel catastrophically in fp32 (VIL is ~100 with variance ~1)
    x_mean = x.mean(dim=(-2, -1), keepdim=True)
    y_mean = y.mean(dim=(-2, -1), keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    mu_xc, mu_yc = blur(xc), blur(yc)
    var_x = blur(xc * xc) - mu_xc.square()
    var_y = blur(yc * yc) - mu_yc.square()
    cov = blur(xc * yc) - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + x_mean, mu_yc + y_mean
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    per_frame = reduce(ssim_map, "n 1 h w -> n", "mean")
    return reduce(per_frame, "(b m) -> b", "mean", b=batch)
