"""Physics of 2-D incompressible flow on a periodic grid: velocity from vorticity, divergence, turbulent
kinetic energy and the shell-averaged energy spectrum (BeamVQ's physics-aware scores, arXiv
2405.17051). The last dim (W) is x, the one before (H) is y; ``x_j = j * lx / W``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "Velocity",
    "divergence",
    "divergence_fd",
    "energy_spectrum",
    "n_shells",
    "tke",
    "velocity_from_vorticity",
]


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
