"""2-D shallow-water radial dam break, the PDEBench recipe, solved with a Rusanov finite-volume scheme.

PDEBench (Takamoto et al., NeurIPS 2022 Datasets and Benchmarks, "PDEBench: An Extensive Benchmark
for Scientific Machine Learning", arXiv 2210.07182) ships a radial dam-break set for the 2-D
shallow-water equations

    h_t + (hu)_x + (hv)_y = 0
    (hu)_t + (hu^2 + g h^2 / 2)_x + (huv)_y = 0
    (hv)_t + (huv)_x + (hv^2 + g h^2 / 2)_y = 0

on [-2.5, 2.5]^2 with g = 1: water at rest, height 2 inside a circle of radius r ~ U(0.3, 0.7)
centred at the origin and 1 outside, integrated to T = 1 and saved at 101 equally spaced times.
PDEBench solves it with PyClaw; we use the simplest robust scheme that keeps the physics:

- first-order finite volumes on cell averages (h, hu, hv), with the Rusanov (local Lax-Friedrichs)
  flux ``F = (F_L + F_R)/2 - a/2 (U_R - U_L)``, ``a = max(|u| + sqrt(g h))`` of the two sides;
  it is positivity preserving for h under the CFL condition below, and a lake at rest
  (constant h, zero velocity) is an exact steady state;
- dimensionally unsplit forward Euler in time with ``dt * (a_x / dx + a_y / dy) <= cfl`` (default
  0.4), the step shortened to land exactly on every saved time;
- transmissive (outflow) boundaries: a zero-gradient ghost cell copies the boundary cell, so the
  boundary flux is the physical flux of the boundary state and waves leave with little
  reflection. Mass is conserved to round-off until the wave reaches the edge; afterwards the change
  in mass equals the accumulated net boundary flux, which :func:`simulate_shallow_water` returns
  (it can also flow back in: the trough behind the front draws water through an open boundary).
  (The front travels at about 1.3, so at T = 1 it has not reached the edge; the numerical
  diffusion of the first-order scheme lets a sliver out by then: 3e-5 of the mass at 64^2,
  5e-4 at 32^2.)
- the initial height is sampled at cell centres (as PDEBench does), not cell-averaged.

Saved variables: ``h`` (m), ``u`` and ``v`` (m s-1, velocity = momentum / h), all float32; the
physics scorers need the velocity and it costs nothing to save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xarray as xr

from beamvq.arguments import at_least, fraction, positive, positive_int
from beamvq.datamodules.io import DataGenerator, write_netcdf

DOMAIN_HALF_WIDTH: float = 2.5
GRAVITY: float = 1.0
H_INSIDE: float = 2.0
H_OUTSIDE: float = 1.0
RADIUS_RANGE: tuple[float, float] = (0.3, 0.7)


class ShallowWaterRun(NamedTuple):
    """Saved frames of one simulation; arrays are ``(n_frames, ny, nx)`` except where noted."""

    time: np.ndarray  # (n_frames,)
    h: np.ndarray
    hu: np.ndarray
    hv: np.ndarray
    #: accumulated net mass flux out through the boundary, times the cell area units: (n_frames,)
    outflow: np.ndarray
    n_steps: int


def cell_centres(resolution: int, half_width: float = DOMAIN_HALF_WIDTH) -> np.ndarray:
    """Cell-centre coordinates of ``resolution`` cells on [-half_width, half_width].

    Written as ``(i + 1/2 - n/2) * dx`` so that ``x[i] == -x[n-1-i]`` exactly and the grid keeps
    the mirror symmetry of the problem to the last bit.
    """
    dx = 2.0 * half_width / resolution
    return (np.arange(resolution, dtype=np.float64) + 0.5 - resolution / 2.0) * dx


def dam_break_height(resolution: int, radius: float) -> np.ndarray:
    """PDEBench's initial height ``(resolution, resolution)``: 2 inside the circle, 1 outside."""
    c = cell_centres(resolution)
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return np.where(r2 < radius**2, H_INSIDE, H_OUTSIDE)


def _physical_flux_x(h: np.ndarray, hu: np.ndarray, hv: np.ndarray, g: float) -> np.ndarray:
    u = hu / h
    return np.stack([hu, hu * u + 0.5 * g * h * h, hv * u])


class _FaceFlux(NamedTuple):
    flux: np.ndarray  # (3, ..., n - 1)
    max_speed: float


class _Tendency(NamedTuple):
    tendency: np.ndarray  # (3, ny, nx)
    outflow_rate: float  # net mass leaving through the boundary per unit time
    cfl_rate: float  # a_x / dx + a_y / dy: the stable step is cfl / cfl_rate


def _rusanov_x(q: np.ndarray, g: float) -> _FaceFlux:
    """Rusanov flux through the faces between neighbours along the last axis of ``q = (3, ..., n)``.

    The y direction reuses this function with (h, hv, hu) and the axes swapped.
    """
    h, hu, hv = q
    speed = np.abs(hu / h) + np.sqrt(g * h)
    flux = _physical_flux_x(h, hu, hv, g)
    a = np.maximum(speed[..., :-1], speed[..., 1:])
    face = 0.5 * (flux[..., :-1] + flux[..., 1:]) - 0.5 * a * (q[..., 1:] - q[..., :-1])
    return _FaceFlux(face, float(speed.max()))


def _tendency(q: np.ndarray, dx: float, dy: float, g: float) -> _Tendency:
    """Flux divergence of ``q = (3, ny, nx)`` with zero-gradient ghost cells."""
    padded = np.pad(q, ((0, 0), (1, 1), (1, 1)), mode="edge")
    fx, ax = _rusanov_x(padded[:, 1:-1, :], g)  # (3, ny, nx + 1)
    # y direction: swap the momentum components and the grid axes, then swap back
    qy = np.swapaxes(padded[[0, 2, 1], :, 1:-1], 1, 2)  # (3, nx, ny + 2)
    fy_t, ay = _rusanov_x(qy, g)
    fy = np.swapaxes(fy_t[[0, 2, 1]], 1, 2)  # (3, ny + 1, nx)
    tendency = -(fx[:, :, 1:] - fx[:, :, :-1]) / dx - (fy[:, 1:, :] - fy[:, :-1, :]) / dy
    outflow_rate = (fx[0, :, -1].sum() - fx[0, :, 0].sum()) * dy + (
        fy[0, -1, :].sum() - fy[0, 0, :].sum()
    ) * dx
    return _Tendency(tendency, float(outflow_rate), ax / dx + ay / dy)


def _check_run(h0: np.ndarray, t_end: float, n_frames: int, cfl: float) -> None:
    if h0.ndim != 2 or h0.shape[0] < 2 or h0.shape[1] < 2:
        raise ValueError(f"h0 must be a 2-D field of at least 2x2 cells, got shape {h0.shape}")
    if not np.all(h0 > 0):
        raise ValueError("h0 must be positive everywhere (no dry cells)")
    if not 0.0 < cfl <= 0.5:
        raise ValueError(f"cfl must be in (0, 0.5] for the unsplit Rusanov scheme, got {cfl}")
    if n_frames < 2 or t_end <= 0:
        raise ValueError(f"need n_frames >= 2 and t_end > 0, got {n_frames}, {t_end}")


def simulate_shallow_water(
    h0: np.ndarray,
    half_width: float = DOMAIN_HALF_WIDTH,
    t_end: float = 1.0,
    n_frames: int = 101,
    cfl: float = 0.4,
    g: float = GRAVITY,
) -> ShallowWaterRun:
    """Integrate water initially at rest with height ``h0 (ny, nx)`` on the square domain.

    Frames are saved at ``linspace(0, t_end, n_frames)``; frame 0 is the initial state.
    """
    _check_run(h0, t_end, n_frames, cfl)
    ny, nx = h0.shape
    dy = 2.0 * half_width / ny
    dx = 2.0 * half_width / nx
    q = np.stack([h0.astype(np.float64), np.zeros_like(h0, float), np.zeros_like(h0, float)])
    times = np.linspace(0.0, t_end, n_frames)
    frames = np.empty((n_frames, 3, ny, nx))
    outflow = np.zeros(n_frames)
    frames[0] = q
    t, out, n_steps = 0.0, 0.0, 0
    for k in range(1, n_frames):
        while t < times[k]:
            tendency, rate, cfl_rate = _tendency(q, dx, dy, g)
            dt = min(cfl / cfl_rate, times[k] - t)
            q = q + dt * tendency
            out += dt * rate
            n_steps += 1
            # land exactly on the saved time: the last substep was shortened to reach it
            t = times[k] if dt == times[k] - t else t + dt
        frames[k] = q
        outflow[k] = out
    return ShallowWaterRun(
        time=times,
        h=frames[:, 0],
        hu=frames[:, 1],
        hv=frames[:, 2],
        outflow=outflow,
        n_steps=n_steps,
    )


def generate_shallow_water(
    n_trajectories: int = 8,
    resolution: int = 64,
    n_frames: int = 101,
    t_end: float = 1.0,
    seed: int = 0,
    cfl: float = 0.4,
) -> xr.Dataset:
    """Generate radial dam breaks with radius ~ U(0.3, 0.7) as a CF-style dataset (h, u, v)."""
    if n_trajectories < 1 or resolution < 2:
        raise ValueError(
            f"need n_trajectories >= 1 and resolution >= 2, got {n_trajectories}, {resolution}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    radii = rng.uniform(*RADIUS_RANGE, size=n_trajectories)
    shape = (n_trajectories, n_frames, resolution, resolution)
    h = np.empty(shape, np.float32)
    u = np.empty(shape, np.float32)
    v = np.empty(shape, np.float32)
    time = np.linspace(0.0, t_end, n_frames)
    for i, radius in enumerate(radii):
        run = simulate_shallow_water(
            dam_break_height(resolution, float(radius)), t_end=t_end, n_frames=n_frames, cfl=cfl
        )
        h[i] = run.h
        u[i] = run.hu / run.h
        v[i] = run.hv / run.h
    centres = cell_centres(resolution)
    dims = ("trajectory", "time", "y", "x")
    return xr.Dataset(
        data_vars={
            "h": (dims, h, {"units": "m", "long_name": "water depth"}),
            "u": (dims, u, {"units": "m s-1", "long_name": "x velocity"}),
            "v": (dims, v, {"units": "m s-1", "long_name": "y velocity"}),
        },
        coords={
            "trajectory": (
                "trajectory",
                np.arange(n_trajectories, dtype=np.int64),
                {"long_name": "trajectory index"},
            ),
            "time": ("time", time, {"units": "s", "long_name": "time", "axis": "T"}),
            "y": ("y", centres, {"units": "m", "long_name": "y (cell centre)", "axis": "Y"}),
            "x": ("x", centres, {"units": "m", "long_name": "x (cell centre)", "axis": "X"}),
            "radius": (
                "trajectory",
                radii,
                {"units": "m", "long_name": "initial dam radius"},
            ),
        },
        attrs={
            "title": "2-D shallow-water radial dam break (PDEBench recipe)",
            "source": (
                f"beamvq.datamodules.shallow_water.generate_shallow_water(n_trajectories={n_trajectories}, "
                f"resolution={resolution}, n_frames={n_frames}, t_end={t_end}, seed={seed}, "
                f"cfl={cfl}); domain [-{DOMAIN_HALF_WIDTH}, {DOMAIN_HALF_WIDTH}]^2, g={GRAVITY}, "
                f"h={H_INSIDE} inside radius U{RADIUS_RANGE} else {H_OUTSIDE}, first-order "
                "Rusanov finite volumes, forward Euler, transmissive boundaries"
            ),
            "Conventions": "CF-1.8",
        },
    )


def write_shallow_water(
    path: str | os.PathLike,
    n_trajectories: int = 8,
    resolution: int = 64,
    n_frames: int = 101,
    t_end: float = 1.0,
    seed: int = 0,
    cfl: float = 0.4,
) -> Path:
    """Generate dam breaks and write them to ``path`` (NetCDF, atomic); return the path."""
    ds = generate_shallow_water(
        n_trajectories=n_trajectories,
        resolution=resolution,
        n_frames=n_frames,
        t_end=t_end,
        seed=seed,
        cfl=cfl,
    )
    return write_netcdf(ds, path)


class ShallowWaterGenerator(DataGenerator):
    """Radial dam breaks (arguments of ``generate_shallow_water``); variables h, u, v."""

    def __init__(
        self,
        n_trajectories: int = 16,
        resolution: int = 64,
        n_frames: int = 101,
        t_end: float = 1.0,
        cfl: float = 0.4,
        seed: int = 0,
    ) -> None:
        key = "ShallowWaterGenerator: data.generator.init_args."
        positive_int(key + "n_trajectories", n_trajectories)
        at_least(key + "resolution", resolution, 4)
        at_least(key + "n_frames", n_frames, 2)
        positive(key + "t_end", t_end)
        fraction(key + "cfl", cfl)
        self.kwargs = dict(
            n_trajectories=n_trajectories,
            resolution=resolution,
            n_frames=n_frames,
            t_end=t_end,
            cfl=cfl,
            seed=seed,
        )

    def write(self, path: str | os.PathLike) -> Path:
        return write_shallow_water(path, **self.kwargs)
