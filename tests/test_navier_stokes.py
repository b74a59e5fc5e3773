"""The Navier–Stokes generator against physics, not only shapes."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from beamvq.datamodules.synthetic import (
    gaussian_random_field,
    generate_navier_stokes,
    kolmogorov_forcing,
    solve_navier_stokes,
    write_navier_stokes,
)


def test_single_mode_decays_at_the_viscous_rate() -> None:
    # sin(2π·2x) is a steady Euler flow: only viscosity acts, w(t) = exp(-ν λ t) w0, λ = 4π²k²
    n, nu, dt, k = 32, 1e-2, 1e-2, 2
    x = np.arange(n) / n
    w0 = np.broadcast_to(np.sin(2 * np.pi * k * x)[None, :], (n, n))[None].copy()
    w = solve_navier_stokes(w0, None, nu, dt, n_frames=2, frame_interval=0.5)
    lam = 4 * np.pi**2 * k**2
    for j, t in enumerate((0.5, 1.0)):
        ratio = float((w[0, j] * w0[0]).sum() / (w0[0] ** 2).sum())
        assert ratio == pytest.approx(np.exp(-nu * lam * t), rel=1e-3)


def test_mean_vorticity_stays_zero_and_unforced_inviscid_energy_is_kept() -> None:
    rng = np.random.default_rng(0)
    w0 = gaussian_random_field(2, 32, rng)
    forced = solve_navier_stokes(w0, kolmogorov_forcing(32), 1e-3, 1e-2, 5, 1.0)
    assert np.abs(forced.mean(axis=(-2, -1))).max() < 1e-6 * np.abs(forced).max()
    inviscid = solve_navier_stokes(w0, None, 0.0, 1e-3, 2, 0.1)
    enstrophy0 = (w0**2).mean()
    assert (inviscid[:, -1] ** 2).mean() == pytest.approx(enstrophy0, rel=5e-3)


def test_half_dt_agrees() -> None:
    rng = np.random.default_rng(1)
    w0 = gaussian_random_field(1, 32, rng)
    f = kolmogorov_forcing(32)
    a = solve_navier_stokes(w0, f, 1e-3, 1e-2, 2, 1.0)
    b = solve_navier_stokes(w0, f, 1e-3, 5e-3, 2, 1.0)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 1e-2


def test_grf_spectrum_and_seeds() -> None:
    a = gaussian_random_field(4, 32, np.random.default_rng(3))
    b = gaussian_random_field(4, 32, np.random.default_rng(3))
    c = gaussian_random_field(4, 32, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert np.abs(a.mean(axis=(-2, -1))).max() < 1e-12  # zero mean mode
    # covariance (−Δ + 49)^{-2.5}: low modes carry far more power than high ones
    power = np.abs(np.fft.fft2(a)) ** 2
    assert power[:, 1, 0].mean() > 50 * power[:, 8, 0].mean()


def test_dataset_layout_and_file(tmp_path) -> None:
    ds = generate_navier_stokes(n_trajectories=2, resolution=16, n_frames=3, seed=0)
    assert ds.vorticity.dims == ("trajectory", "time", "y", "x")
    assert ds.vorticity.attrs["units"] == "s-1"
    assert ds.attrs["Conventions"] == "CF-1.8"
    np.testing.assert_allclose(ds.time.values, [1.0, 2.0, 3.0])
    path = write_navier_stokes(
        tmp_path / "ns.nc", n_trajectories=2, resolution=16, n_frames=3, seed=0
    )
    with xr.open_dataset(path) as back:
        np.testing.assert_array_equal(back.vorticity.values, ds.vorticity.values)
        assert back.vorticity.encoding["zlib"]
    assert not list(tmp_path.glob("*.tmp"))


def test_blow_up_is_reported() -> None:
    w0 = gaussian_random_field(1, 16, np.random.default_rng(0)) * 1e3
    with pytest.raises(FloatingPointError, match="smaller dt"):
        solve_navier_stokes(w0, None, 1e-3, 0.5, 3, 1.0)
