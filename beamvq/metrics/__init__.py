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

from beamvq.metrics.categorical import (
    SEVIR_THRESHOLDS,
    Contingency,
    bias,
    contingency_counts,
    csi,
    csi_m,
    pod,
    pool_contingency,
    sucr,
)
from beamvq.metrics.errors import (
    ErrorSums,
    error_sums,
    lat_weighted_acc,
    lat_weighted_rmse,
    latitude_weights,
    mae_per_lead,
    mse_per_lead,
    rel_l2,
    rel_l2_per_sample,
    rmse_per_lead,
)
from beamvq.metrics.physics import (
    Velocity,
    divergence,
    divergence_fd,
    energy_spectrum,
    n_shells,
    tke,
    velocity_from_vorticity,
)
from beamvq.metrics.probabilistic import SpreadSkill, crps_ensemble, spread_skill
from beamvq.metrics.scorers import (
    ConservationScorer,
    CSIScorer,
    DivergenceScorer,
    NegMSEScorer,
    NonNegativityScorer,
    Scorer,
    SpectrumScorer,
    SSIMScorer,
    TKEScorer,
    WeightedScorer,
)
from beamvq.metrics.structure import ssim

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
    "lat_weighted_acc",
    "n_shells",
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
