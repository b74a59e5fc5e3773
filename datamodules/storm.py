"""Synthetic moving storm cells on the SEVIR VIL 0-255 scale.

SEVIR (Veillette et al., NeurIPS 2020, "SEVIR: A Storm Event Imagery Dataset for Deep Learning
Applications in Radar and Satellite Meteorology") stores vertically integrated liquid (VIL) as a
0-255 digital value; its forecasting protocol scores CSI at the thresholds 16/74/133/160/181/219.
This generator reproduces the recipe of the project notes (PAPERS.md §3), a cheap stand-in with the same value
range and the same event structure:

- per sequence a steering velocity drawn from U(-1.5, 1.5)^2 pixels per frame;
- 2-6 elliptical Gaussian cells, each with per-axis width sigma ~ U(3, 9) px, a random rotation
  U(0, pi), its own velocity = steering + N(0, 0.25^2) px/frame per component, peak value
  U(120, 255) and a life cycle ``peak * exp(-((t - t_peak) / life)^2)`` with life ~ U(8, 30)
  frames;
- the cells are combined by the pixel-wise maximum (overlapping cells do not add up to values no
  radar would show) and the result is clipped to [0, 255].

Choices the recipe leaves open, and what we chose (tuned so that at 64^2 and 20 frames about 25% of
the pixels exceed 16 and about 0.1% exceed 219, so every CSI threshold has events and the top one is
rare):

- ``t_peak ~ U(0, n_frames)``: every cell peaks inside the sequence, so the statistics do not depend
  much on ``n_frames``;
- the cell's centre *at its peak time* is uniform over the domain enlarged by 10% on every side, so
  cells can enter and leave through the edges as real storms do;
- no wrap-around: a cell that leaves the domain is gone (a periodic domain would let a cell re-enter
  on the far side, which no radar image shows).

Coordinates are in pixels (cell centres 0.5, 1.5, ...) and time in minutes with SEVIR's 5-minute
frame spacing. Trajectory ``i`` does not depend on ``n_trajectories``: the parameters are drawn
trajectory by trajectory from one ``numpy.random.Generator(seed)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xarray as xr

from beamvq.arguments import positive_int
from beamvq.datamodules.io import DataGenerator, write_netcdf

#: SEVIR's frame spacing in minutes.
FRAME_MINUTES: float = 5.0
#: Slots per sequence; sequences with fewer cells leave the extra slots at zero peak.
MAX_CELLS: int = 6
MIN_CELLS: int = 2
STEERING_MAX: float = 1.5
SIGMA_RANGE: tuple[float, float] = (3.0, 9.0)
PEAK_RANGE: tuple[float, float] = (120.0, 255.0)
LIFE_RANGE: tuple[float, float] = (8.0, 30.0)
VELOCITY_NOISE: float = 0.25
#: Fraction of the domain size added on every side to the region where cells peak.
PEAK_MARGIN: float = 0.1
VIL_MAX: float = 255.0


class StormCells(NamedTuple):
    """Parameters of storm cells, arrays with leading shape ``(N, C)`` (N sequences, C cells).

    Positions and velocities are ``(y, x)`` pairs in pixels and pixels per frame; ``centre`` is the
    cell centre at time ``t_peak``.
    """

    centre: np.ndarray  # (N, C, 2)
    velocity: np.ndarray  # (N, C, 2)
    sigma: np.ndarray  # (N, C, 2), along the cell's rotated (y', x') axes
    angle: np.ndarray  # (N, C), radians
    peak: np.ndarray  # (N, C), 0 for an unused slot
    t_peak: np.ndarray  # (N, C), frames
    life: np.ndarray  # (N, C), frames


def sample_cells(
    rng: np.random.Generator, n_frames: int, height: int, width: int, max_cells: int = MAX_CELLS
) -> StormCells:
    """Draw the cells of one sequence (leading shape ``(1, max_cells)``) following the recipe."""
    steering = rng.uniform(-STEERING_MAX, STEERING_MAX, size=2)
    n_cells = int(rng.integers(MIN_CELLS, max_cells + 1))
    size = np.array([height, width], dtype=np.float64)
    centre = rng.uniform(-PEAK_MARGIN * size, (1.0 + PEAK_MARGIN) * size, size=(max_cells, 2))
    velocity = steering + rng.normal(0.0, VELOCITY_NOISE, size=(max_cells, 2))
    sigma = rng.uniform(*SIGMA_RANGE, size=(max_cells, 2))
    angle = rng.uniform(0.0, np.pi, size=max_cells)
    peak = rng.uniform(*PEAK_RANGE, size=max_cells) * (np.arange(max_cells) < n_cells)
    t_peak = rng.uniform(0.0, float(n_frames), size=max_cells)
    life = rng.uniform(*LIFE_RANGE, size=max_cells)
    return StormCells(
        centre=centre[None],
        velocity=velocity[None],
        sigma=sigma[None],
        angle=angle[None],
        peak=peak[None],
        t_peak=t_peak[None],
        life=life[None],
    )


def render_cells(cells: StormCells, n_frames: int, height: int, width: int) -> np.ndarray:
    """Render cells to a VIL field ``(N, n_frames, height, width)`` float32 in [0, 255].

    Vectorized over sequences, frames and pixels; the only Python loop runs over the cell slots.
    """
    t = np.arange(n_frames, dtype=np.float64)
    yy = np.arange(height, dtype=np.float64) + 0.5
    xx = np.arange(width, dtype=np.float64) + 0.5
    n_seq = cells.peak.shape[0]
    out = np.zeros((n_seq, n_frames, height, width), dtype=np.float32)
    for c in range(cells.peak.shape[1]):
        dt = t[None, :] - cells.t_peak[:, c, None]  # (N, T)
        cy = cells.centre[:, c, 0, None] + cells.velocity[:, c, 0, None] * dt
        cx = cells.centre[:, c, 1, None] + cells.velocity[:, c, 1, None] * dt
        amp = cells.peak[:, c, None] * np.exp(-((dt / cells.life[:, c, None]) ** 2))
        dy = yy[None, None, :, None] - cy[:, :, None, None]  # (N, T, H, 1)
        dx = xx[None, None, None, :] - cx[:, :, None, None]  # (N, T, 1, W)
        cos = np.cos(cells.angle[:, c])[:, None, None, None]
        sin = np.sin(cells.angle[:, c])[:, None, None, None]
        # coordinates along the cell's own axes, scaled by its widths
        along_y = (cos * dy - sin * dx) / cells.sigma[:, c, 0, None, None, None]
        along_x = (sin * dy + cos * dx) / cells.sigma[:, c, 1, None, None, None]
        field = amp[:, :, None, None] * np.exp(-0.5 * (along_y**2 + along_x**2))
        np.maximum(out, field.astype(np.float32), out=out)
    return np.clip(out, 0.0, VIL_MAX, out=out)


def generate_storm(
    n_trajectories: int = 64,
    n_frames: int = 20,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
) -> xr.Dataset:
    """Generate ``n_trajectories`` storm-cell sequences as a CF-style dataset with variable ``vil``."""
    if n_trajectories < 1 or n_frames < 1 or height < 1 or width < 1:
        raise ValueError(
            "generate_storm needs n_trajectories, n_frames, height and width >= 1, got "
            f"{n_trajectories}, {n_frames}, {height}, {width}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    per_seq = [sample_cells(rng, n_frames, height, width) for _ in range(n_trajectories)]
    cells = StormCells(*(np.concatenate(parts, axis=0) for parts in zip(*per_seq)))
    vil = render_cells(cells, n_frames, height, width)
    return xr.Dataset(
        data_vars={
            "vil": (
                ("trajectory", "time", "y", "x"),
                vil,
                {"units": "1", "long_name": "vertically integrated liquid (SEVIR 0-255 scale)"},
            )
        },
        coords={
            "trajectory": (
                "trajectory",
                np.arange(n_trajectories, dtype=np.int64),
                {"long_name": "trajectory index"},
            ),
            "time": (
                "time",
                np.arange(n_frames, dtype=np.float64) * FRAME_MINUTES,
                {"units": "min", "long_name": "time since start of sequence", "axis": "T"},
            ),
            "y": (
                "y",
                np.arange(height, dtype=np.float64) + 0.5,
                {"units": "1", "long_name": "y pixel coordinate (cell centre)", "axis": "Y"},
            ),
            "x": (
                "x",
                np.arange(width, dtype=np.float64) + 0.5,
                {"units": "1", "long_name": "x pixel coordinate (cell centre)", "axis": "X"},
            ),
        },
        attrs={
            "title": "Synthetic moving storm cells (SEVIR-like VIL)",
            "source": (
                f"beamvq.datamodules.storm.generate_storm(n_trajectories={n_trajectories}, "
                f"n_frames={n_frames}, height={height}, width={width}, seed={seed}); "
                f"steering U(-{STEERING_MAX}, {STEERING_MAX}) px/frame, {MIN_CELLS}-{MAX_CELLS} "
                f"cells, sigma U{SIGMA_RANGE} px, velocity noise N(0, {VELOCITY_NOISE}^2), "
                f"peak U{PEAK_RANGE}, life U{LIFE_RANGE} frames, t_peak U(0, n_frames), "
                f"peak centre margin {PEAK_MARGIN}, no wrap-around, pixel-wise max"
            ),
            "Conventions": "CF-1.8",
        },
    )


def write_storm(
    path: str | os.PathLike,
    n_trajectories: int = 64,
    n_frames: int = 20,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
) -> Path:
    """Generate storm sequences and write them to ``path`` (NetCDF, atomic); return the path."""
    ds = generate_storm(
        n_trajectories=n_trajectories, n_frames=n_frames, height=height, width=width, seed=seed
    )
    return write_netcdf(ds, path)


class StormGenerator(DataGenerator):
    """Moving storm cells on the VIL 0–255 scale (arguments of ``generate_storm``)."""

    def __init__(
        self,
        n_trajectories: int = 64,
        n_frames: int = 20,
        height: int = 64,
        width: int = 64,
        seed: int = 0,
    ) -> None:
        for name, value in (("n_trajectories", n_trajectories), ("n_frames", n_frames),
                            ("height", height), ("width", width)):  # fmt: skip
            positive_int(f"StormGenerator: data.generator.init_args.{name}", value)
        self.kwargs = dict(
            n_trajectories=n_trajectories, n_frames=n_frames, height=height, width=width, seed=seed
        )

    def write(self, path: str | os.PathLike) -> Path:
        return write_storm(path, **self.kwargs)
