"""Forecast metrics and candidate scorers for physical space-time fields.

Pure tensor functions (no Lightning, no file I/O). Fields are ``(B, T, C, H, W)`` (batch, lead
time, channel, y, x) in physical (de-normalized) units; the caller de-normalizes. Candidate sets
are ``(B, K, T, C, H, W)``.

References
----------
- Contingency scores (CSI/POD/SUCR/BIAS) with counts pooled over the whole evaluation set, and the
  SEVIR VIL thresholds 16/74/133/160/181/219: Veillette et al., *SEVIR: A Storm Event Imagery
  Dataset for Deep Learning Applications in Radar and Satellite Meteorology* (NeurIPS 2020), as
  used by Earthformer (Gao et al., NeurIPS 2022).
- Relative L2: Li et al., *Fourier Neural Operator for Parametric PDEs* (ICLR 2021).
- SSIM: Wang, Bovik, Sheikh, Simoncelli, *Image quality assessment: from error visibility to
  structural similarity* (IEEE TIP 2004): Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
- CRPS of an ensemble: Gneiting & Raftery (JASA 2007), energy form E|X-y| - 1/2 E|X-X'|; the
  "fair" estimator of Ferro (2014). Spread/skill: Fortuin et al. (QJRMS 2014).
- Latitude-weighted RMSE: Rasp et al., *WeatherBench* (JAMES 2020).
- Physics-aware scores (divergence, turbulent kinetic energy, energy spectrum): BeamVQ
  (arXiv 2405.17051, 2502.18925); conservation and non-negativity are beamvq additions for
  reference-free search.

Grid convention for the spectral tools: the last dim (W) is x, the one before (H) is y; the grid is
periodic with ``x_j = j * lx / W`` and ``y_i = i * ly / H``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor

__all__ = [
    "SEVIR_THRESHOLDS",
    "ErrorSums",
    "Contingency",
    "SpreadSkill",
    "Velocity",
    "mse_per_lead",
    "mae_per_lead",
    "rmse_per_lead",
    "rel_l2_per_sample",
    "rel_l2",
    "error_sums",
    "contingency_counts",
    "pool_contingency",
    "csi",
    "pod",
    "sucr",
    "bias",
    "csi_m",
    "ssim",
    "crps_ensemble",
    "spread_skill",
    "velocity_from_vorticity",
    "divergence",
    "divergence_fd",
    "tke",
    "energy_spectrum",
    "latitude_weights",
    "lat_weighted_rmse",
    "Scorer",
    "CSIScorer",
    "NegMSEScorer",
    "SSIMScorer",
    "DivergenceScorer",
    "SpectrumScorer",
    "TKEScorer",
    "ConservationScorer",
    "NonNegativityScorer",
    "WeightedScorer",
]

# SEVIR VIL thresholds on the 0-255 scale (Veillette et al. 2020), written out as the paper fixes them.
SEVIR_THRESHOLDS: tuple[float, ...] = (16.0, 74.0, 133.0, 160.0, 181.0, 219.0)


def _check_same_shape(pred: Tensor, target: Tensor, min_dim: int = 2) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() < min_dim:
        raise ValueError(f"expected at least {min_dim} dims (B, T, ...), got {tuple(pred.shape)}")


# --------------------------------------------------------------------------------------------
# 1. Deterministic errors
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 2. Contingency scores
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 3. SSIM
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 4. Ensembles
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 5. Physics on a periodic grid
# --------------------------------------------------------------------------------------------


class Velocity(NamedTuple):
    u: Tensor  # x-component (along W)
    v: Tensor  # y-component (along H)


def _wavenumbers(
    height: int, width: int, lx: float, ly: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Angular wavenumbers for rfft2 layout: ky (H, 1) full, kx (1, W//2+1) half."""
    ky = 2 * math.pi / ly * torch.fft.fftfreq(height, d=1.0 / height, device=device)
    kx = 2 * math.pi / lx * torch.fft.rfftfreq(width, d=1.0 / width, device=device)
    return ky.view(height, 1), kx.view(1, -1)


def _derivative_wavenumbers(
    height: int, width: int, lx: float, ly: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Wavenumbers for first derivatives, Nyquist zeroed.

    The Nyquist mode of an even grid is a real cosine whose derivative the grid cannot represent;
    zeroing it keeps derivatives of real fields real (standard pseudo-spectral practice).
    """
    ky, kx = _wavenumbers(height, width, lx, ly, device)
    if height % 2 == 0:
        ky = ky.clone()
        ky[height // 2] = 0.0
    if width % 2 == 0:
        kx = kx.clone()
        kx[0, -1] = 0.0
    return ky, kx


def velocity_from_vorticity(w: Tensor, lx: float = 1.0, ly: float = 1.0) -> Velocity:
    """Velocity of a periodic 2-D vorticity field w (..., H, W), spectrally.

    Solves lap(psi) = -w with the mean mode of psi set to 0, then u = d psi/dy, v = -d psi/dx.
    The mean of w (not representable by a periodic stream function) is ignored.
    """
    height, width = w.shape[-2:]
    ky, kx = _wavenumbers(height, width, lx, ly, w.device)
    k2 = ky.square() + kx.square()
    k2[0, 0] = 1.0  # the mean mode: psi_hat(0) is set to 0 below
    w_hat = torch.fft.rfft2(w)
    psi_hat = w_hat / k2
    psi_hat[..., 0, 0] = 0.0
    dky, dkx = _derivative_wavenumbers(height, width, lx, ly, w.device)
    u = torch.fft.irfft2(1j * dky * psi_hat, s=(height, width))
    v = torch.fft.irfft2(-1j * dkx * psi_hat, s=(height, width))
    return Velocity(u=u.to(w.dtype), v=v.to(w.dtype))


def divergence(u: Tensor, v: Tensor, lx: float = 1.0, ly: float = 1.0) -> Tensor:
    """Spectral divergence du/dx + dv/dy of a periodic field (..., H, W)."""
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} differ")
    height, width = u.shape[-2:]
    dky, dkx = _derivative_wavenumbers(height, width, lx, ly, u.device)
    div_hat = 1j * dkx * torch.fft.rfft2(u) + 1j * dky * torch.fft.rfft2(v)
    return torch.fft.irfft2(div_hat, s=(height, width)).to(u.dtype)


def divergence_fd(u: Tensor, v: Tensor, lx: float = 1.0, ly: float = 1.0) -> Tensor:
    """Second-order centred finite-difference divergence with periodic wrap: (..., H, W)."""
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} differ")
    height, width = u.shape[-2:]
    dx, dy = lx / width, ly / height
    du_dx = (u.roll(-1, dims=-1) - u.roll(1, dims=-1)) / (2 * dx)
    dv_dy = (v.roll(-1, dims=-2) - v.roll(1, dims=-2)) / (2 * dy)
    return du_dx + dv_dy


def tke(u: Tensor, v: Tensor) -> Tensor:
    """Turbulent kinetic energy 1/2 <u'^2 + v'^2>, fluctuations about the domain mean: (...)."""
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} differ")
    up = u - u.mean(dim=(-2, -1), keepdim=True)
    vp = v - v.mean(dim=(-2, -1), keepdim=True)
    return 0.5 * (up.square() + vp.square()).mean(dim=(-2, -1))


def _shell_index(height: int, width: int, device: torch.device) -> Tensor:
    """Shell of each fft2 mode: floor(sqrt(nx^2 + ny^2)) with integer mode numbers, (H*W,)."""
    ny = torch.fft.fftfreq(height, d=1.0 / height, device=device).view(height, 1)
    nx = torch.fft.fftfreq(width, d=1.0 / width, device=device).view(1, width)
    return torch.sqrt(ny.square() + nx.square()).floor().long().flatten()


def n_shells(height: int, width: int) -> int:
    """Number of spectral shells that ``energy_spectrum`` returns for an H x W grid."""
    return int(math.floor(math.hypot(height // 2, width // 2))) + 1


def energy_spectrum(u: Tensor, v: Tensor) -> Tensor:
    """Kinetic energy spectrum: (..., H, W) -> (..., n_shells(H, W)).

    E[k] = shell sum of 1/2 |u_hat|^2 + 1/2 |v_hat|^2 over modes with integer mode-number
    magnitude sqrt(nx^2 + ny^2) in [k, k + 1). Coefficients are normalized by H*W, so by Parseval
    E.sum(-1) == 1/2 <u^2 + v^2> (the mean kinetic energy, mean flow in shell 0; shells 1.. sum to
    the TKE). Every mode up to the grid corner is kept so the identity holds exactly; shells above
    min(H, W)/2 are only partly filled. Shells use mode numbers, not physical wavenumbers.
    """
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} differ")
    height, width = u.shape[-2:]
    scale = 1.0 / (height * width)
    dens = 0.5 * (
        (torch.fft.fft2(u) * scale).abs().square() + (torch.fft.fft2(v) * scale).abs().square()
    )
    dens = rearrange(dens, "... h w -> ... (h w)")
    idx = _shell_index(height, width, u.device)
    out = torch.zeros(*dens.shape[:-1], n_shells(height, width), dtype=dens.dtype, device=u.device)
    return out.index_add_(-1, idx, dens)


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


# --------------------------------------------------------------------------------------------
# 6. Scorers: higher is better, (B, K, T, C, H, W) candidates -> (B, K)
# --------------------------------------------------------------------------------------------


class Scorer(ABC):
    """A candidate scorer: ``scorer(cands, reference, inputs=...) -> (B, K)``, higher is better.

    cands (B, K, T, C, H, W), reference (B, T, C, H, W) or None, inputs (B, T_in, C, H, W) or None:
    all physical. Plain classes (not nn.Module) with flat typed constructors so YAML can build them
    by class_path. Scores are only compared between candidates of the same sample.
    """

    requires_reference: bool = False

    @abstractmethod
    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor: ...

    def _check(self, cands: Tensor, reference: Tensor | None, inputs: Tensor | None) -> None:
        if cands.dim() != 6:
            raise ValueError(f"cands must be (B, K, T, C, H, W), got {tuple(cands.shape)}")
        if self.requires_reference and reference is None:
            raise ValueError(f"{type(self).__name__} needs a reference")
        if reference is not None and reference.shape != cands.shape[:1] + cands.shape[2:]:
            raise ValueError(
                f"reference {tuple(reference.shape)} does not match cands {tuple(cands.shape)}"
            )
        if inputs is not None and (
            inputs.dim() != 5
            or inputs.shape[0] != cands.shape[0]
            or inputs.shape[2:] != cands.shape[3:]
        ):
            raise ValueError(
                f"inputs {tuple(inputs.shape)} must be (B, T_in, C, H, W) for cands {tuple(cands.shape)}"
            )


def _check_channel(cands: Tensor, *channels: int | None) -> None:
    for ch in channels:
        if ch is not None and not -cands.shape[3] <= ch < cands.shape[3]:
            raise ValueError(f"channel {ch} out of range for {cands.shape[3]} channels")


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


class _VelocityScorer(Scorer):
    """Shared velocity extraction: vorticity channel, explicit u/v channels, or a scalar field."""

    def __init__(
        self,
        channel: int,
        from_vorticity: bool,
        u_channel: int | None,
        v_channel: int | None,
        lx: float,
        ly: float,
        allow_scalar: bool,
    ) -> None:
        if from_vorticity and (u_channel is not None or v_channel is not None):
            raise ValueError("give either from_vorticity=True or u_channel/v_channel, not both")
        if (u_channel is None) != (v_channel is None):
            raise ValueError("u_channel and v_channel must be given together")
        if not from_vorticity and u_channel is None and not allow_scalar:
            raise ValueError(
                f"{type(self).__name__} needs from_vorticity=True or u_channel and v_channel"
            )
        self.channel = channel
        self.from_vorticity = from_vorticity
        self.u_channel = u_channel
        self.v_channel = v_channel
        self.lx = lx
        self.ly = ly

    def _velocity(self, fields: Tensor) -> Velocity:
        """fields (..., C, H, W) -> u, v (..., H, W) in float32 or wider."""
        # FFTs need fp32/fp64 (no int, half or bfloat16 on every device)
        if fields.dtype not in (torch.float32, torch.float64):
            fields = fields.float()
        if self.from_vorticity:
            return velocity_from_vorticity(fields[..., self.channel, :, :], self.lx, self.ly)
        if self.u_channel is not None and self.v_channel is not None:
            return Velocity(fields[..., self.u_channel, :, :], fields[..., self.v_channel, :, :])
        # a scalar field: its variance spectrum / variance, treating it as one velocity component
        scalar = fields[..., self.channel, :, :]
        return Velocity(scalar, torch.zeros_like(scalar))


class DivergenceScorer(_VelocityScorer):
    """-mean |div u| over (T, H, W), divergence by centred finite differences (periodic).

    With ``from_vorticity`` the velocity is recovered spectrally from the vorticity channel. That
    velocity is divergence-free by construction for the spectral operator, so the spectral
    divergence would be 0 for every candidate; the centred-difference divergence is not: in
    Fourier space it is -(ky sin(kx dx)/dx - kx sin(ky dy)/dy) psi_hat ~ kx ky (ky^2 dy^2 -
    kx^2 dx^2)/6 psi_hat, i.e. the incompressibility defect a second-order scheme sees. It grows
    with grid-scale content, so it ranks candidates by spurious small-scale noise (it also favours
    smoother fields, so pair it with a reference or spectrum score). With ``u_channel`` and
    ``v_channel`` it is the finite-difference divergence of those channels.
    """

    requires_reference = False

    def __init__(
        self,
        channel: int = 0,
        from_vorticity: bool = True,
        u_channel: int | None = None,
        v_channel: int | None = None,
        lx: float = 1.0,
        ly: float = 1.0,
    ) -> None:
        super().__init__(channel, from_vorticity, u_channel, v_channel, lx, ly, allow_scalar=False)

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        _check_channel(cands, self.channel, self.u_channel, self.v_channel)
        vel = self._velocity(cands)
        div = divergence_fd(vel.u, vel.v, self.lx, self.ly)
        return -reduce(div.abs(), "b k t h w -> b k", "mean")


def _fit_chunks(fields: Tensor, chunk: int = 64) -> list[Tensor]:
    if fields.dim() != 5:
        raise ValueError(f"fit expects fields (N, T, C, H, W), got {tuple(fields.shape)}")
    return list(fields.split(chunk, dim=0))


class SpectrumScorer(_VelocityScorer):
    """-mean over lead times and shells 1..kmax of |log E_cand(k) - log E_clim(k)|.

    E_clim is the mean energy spectrum of the training fields given to ``fit`` (physical units).
    Velocity: from the vorticity ``channel`` (default), from ``u_channel``/``v_channel``, or, with
    ``from_vorticity=False`` and no u/v, the variance spectrum of the scalar ``channel``.
    Shells run from 1 (the mean mode is not a scale) to ``kmax`` (default min(H, W) // 2: the
    fully resolved isotropic shells). Energies are floored at ``rel_floor`` times the climatology's
    total energy so empty (e.g. de-aliased) shells do not dominate through log 0.
    """

    requires_reference = False

    def __init__(
        self,
        channel: int = 0,
        from_vorticity: bool = True,
        u_channel: int | None = None,
        v_channel: int | None = None,
        kmax: int | None = None,
        rel_floor: float = 1e-10,
        lx: float = 1.0,
        ly: float = 1.0,
    ) -> None:
        super().__init__(channel, from_vorticity, u_channel, v_channel, lx, ly, allow_scalar=True)
        if kmax is not None and kmax < 1:
            raise ValueError(f"kmax must be >= 1, got {kmax}")
        self.kmax = kmax
        self.rel_floor = rel_floor
        self.clim_spectrum: Tensor | None = None

    def _spectrum(self, fields: Tensor) -> Tensor:
        vel = self._velocity(fields)
        return energy_spectrum(vel.u, vel.v)

    def fit(self, fields: Tensor) -> SpectrumScorer:
        """Store the mean spectrum of training fields (N, T, C, H, W); returns self."""
        total: Tensor | None = None
        count = 0
        for part in _fit_chunks(fields):
            spec = reduce(self._spectrum(part).double(), "n t s -> s", "sum")
            total = spec if total is None else total + spec
            count += part.shape[0] * part.shape[1]
        assert total is not None
        self.clim_spectrum = (total / count).float()
        return self

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        _check_channel(cands, self.channel, self.u_channel, self.v_channel)
        if self.clim_spectrum is None:
            raise RuntimeError("SpectrumScorer.fit(fields) must be called before scoring")
        height, width = cands.shape[-2:]
        if self.clim_spectrum.shape[0] != n_shells(height, width):
            raise ValueError(f"the climatology was fitted on another grid than {height}x{width}")
        kmax = min(self.kmax or min(height, width) // 2, self.clim_spectrum.shape[0] - 1)
        clim = self.clim_spectrum.to(cands.device)
        floor = self.rel_floor * clim.sum()
        spec = self._spectrum(cands)[..., 1 : kmax + 1]  # (B, K, T, kmax)
        log_gap = (torch.log(spec + floor) - torch.log(clim[1 : kmax + 1] + floor)).abs()
        return -reduce(log_gap, "b k t s -> b k", "mean")


class TKEScorer(_VelocityScorer):
    """-mean over lead times of |TKE_cand - TKE_clim| / TKE_clim (relative gap, per frame).

    TKE_clim is the mean per-frame TKE of the training fields given to ``fit``. Velocity options as
    in ``SpectrumScorer`` (a scalar channel gives half its spatial variance).
    """

    requires_reference = False

    def __init__(
        self,
        channel: int = 0,
        from_vorticity: bool = True,
        u_channel: int | None = None,
        v_channel: int | None = None,
        lx: float = 1.0,
        ly: float = 1.0,
    ) -> None:
        super().__init__(channel, from_vorticity, u_channel, v_channel, lx, ly, allow_scalar=True)
        self.clim_tke: float | None = None

    def _tke(self, fields: Tensor) -> Tensor:
        vel = self._velocity(fields)
        return tke(vel.u, vel.v)

    def fit(self, fields: Tensor) -> TKEScorer:
        """Store the mean per-frame TKE of training fields (N, T, C, H, W); returns self."""
        total = 0.0
        count = 0
        for part in _fit_chunks(fields):
            total += float(self._tke(part).double().sum())
            count += part.shape[0] * part.shape[1]
        if total <= 0:
            raise ValueError("the training fields have zero TKE; a relative gap is undefined")
        self.clim_tke = total / count
        return self

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        _check_channel(cands, self.channel, self.u_channel, self.v_channel)
        if self.clim_tke is None:
            raise RuntimeError("TKEScorer.fit(fields) must be called before scoring")
        gap = (self._tke(cands) - self.clim_tke).abs() / self.clim_tke  # (B, K, T)
        return -gap.mean(-1)


class ConservationScorer(Scorer):
    """-mean over lead frames of |domain mean(frame) - domain mean(last input frame)|.

    For conserved quantities (mass/height in shallow water, mean vorticity on a periodic domain).
    Needs ``inputs`` (the physical input window the candidates were forecast from).
    """

    requires_reference = False

    def __init__(self, channel: int = 0) -> None:
        self.channel = channel

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        _check_channel(cands, self.channel)
        if inputs is None:
            raise ValueError("ConservationScorer needs inputs= (B, T_in, C, H, W)")
        frame_mean = cands[:, :, :, self.channel].mean(dim=(-2, -1))  # (B, K, T)
        last = inputs[:, -1, self.channel].mean(dim=(-2, -1)).view(-1, 1, 1)  # (B, 1, 1)
        return -(frame_mean - last).abs().mean(-1)


class NonNegativityScorer(Scorer):
    """-mean over (T, H, W) of relu(lower - x) of one channel: penalizes values below ``lower``."""

    requires_reference = False

    def __init__(self, channel: int = 0, lower: float = 0.0) -> None:
        self.channel = channel
        self.lower = lower

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        _check_channel(cands, self.channel)
        deficit = F.relu(self.lower - cands[:, :, :, self.channel])
        return -reduce(deficit, "b k t h w -> b k", "mean")


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
