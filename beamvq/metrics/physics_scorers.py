"""Physics-aware candidate scorers: reference-free, higher is better (BeamVQ, arXiv 2405.17051,
2502.18925: divergence, turbulent kinetic energy, energy spectrum; conservation and
non-negativity are beamvq additions for reference-free search). The generic scorers (CSI, -MSE,
SSIM, weighted sums) are in ``beamvq.metrics.scorers``, which re-exports these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor

from beamvq import arguments
from beamvq.arguments import init_arg
from beamvq.metrics.physics import (
    Velocity,
    divergence_fd,
    energy_spectrum,
    n_shells,
    tke,
    velocity_from_vorticity,
)
from beamvq.metrics.scorer_base import Scorer, check_channel

__all__ = [
    "ConservationScorer",
    "DivergenceScorer",
    "NonNegativityScorer",
    "SpectrumScorer",
    "TKEScorer",
]


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
        arguments.positive(init_arg(type(self).__name__, "lx"), lx)
        arguments.positive(init_arg(type(self).__name__, "ly"), ly)
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
        check_channel(cands, self.channel, self.u_channel, self.v_channel)
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
        arguments.positive_int(init_arg("SpectrumScorer", "kmax"), kmax, optional=True)
        arguments.positive(init_arg("SpectrumScorer", "rel_floor"), rel_floor)
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
        check_channel(cands, self.channel, self.u_channel, self.v_channel)
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
        check_channel(cands, self.channel, self.u_channel, self.v_channel)
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
        check_channel(cands, self.channel)
        if inputs is None:
            raise ValueError("ConservationScorer needs inputs= (B, T_in, C, H, W)")
        frame_mean = cands[:, :, :, self.channel].mean(dim=(-2, -1))  # (B, K, T)
        last = inputs[:, -1, self.channel].mean(dim=(-2, -1)).view(-1, 1, 1)  # (B, 1, 1)
        return -(frame_mean - last).abs().mean(-1)


class NonNegativityScorer(Scorer):
    """-mean over (T, H, W) of relu(lower - x) of one channel: penalizes values below ``lower``."""

    requires_reference = False

    def __init__(self, channel: int = 0, lower: float = 0.0) -> None:
        arguments.finite(init_arg("NonNegativityScorer", "lower"), lower)
        self.channel = channel
        self.lower = lower

    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor:
        self._check(cands, reference, inputs)
        check_channel(cands, self.channel)
        deficit = F.relu(self.lower - cands[:, :, :, self.channel])
        return -reduce(deficit, "b k t h w -> b k", "mean")
