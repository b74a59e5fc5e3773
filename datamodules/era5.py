"""An ERA5-like sample file on the WeatherBench 5.625° grid, and its datamodule.

Real ERA5 (Hersbach et al. 2020, "The ERA5 global reanalysis", QJRMS 146:1999) cannot be
downloaded in tests, so this generator writes a file with the same *format* and plausible
*content*, to exercise every convention the NetCDF datamodule accepts:

- the WeatherBench 5.625° grid (Rasp et al. 2020, arXiv 2002.00469): 32 latitudes at cell centres
  ±87.1875° and 64 longitudes 0 .. 354.375°;
- ERA5's layout: dims ``(time, level, latitude, longitude)``, latitude descending (90 → −90),
  ``level`` in hPa, time in ``hours since 1900-01-01``, variables packed as int16 with
  ``scale_factor``/``add_offset``/``_FillValue`` (``convention="cds"`` gives the newer CDS names
  ``valid_time``/``pressure_level``; ``"weatherbench"`` gives ``lat``/``lon`` with ascending
  latitude, WeatherBench v1's layout);
- variables: geopotential ``z`` and temperature ``t`` on pressure levels (default 500 and
  850 hPa) and 2 m temperature ``t2m`` on the surface.

Content (a toy atmosphere, smooth and predictable so a model can learn it; not a simulation):
a zonal-mean state cold at the poles with a seasonal cycle of opposite sign in each hemisphere,
eastward-travelling planetary waves (zonal wavenumbers 2–6, periods of days, amplitude peaking
in mid-latitudes, the same phase at every level: equivalent barotropic) in ``z`` and ``t``, a
diurnal cycle in ``t2m`` that follows local solar time, and small AR(1) red noise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from beamvq.datamodules.io import DataGenerator, write_netcdf

log = logging.getLogger(__name__)

CONVENTIONS = ("era5", "cds", "weatherbench")
# geopotential (m2 s-2) and temperature (K) of a standard atmosphere at the level (hPa)
_Z_REF = {1000: 1.1e3, 925: 7.6e3, 850: 1.45e4, 700: 2.95e4, 500: 5.55e4, 300: 9.0e4, 250: 1.0e5}
_T_REF = {1000: 288.0, 925: 283.0, 850: 278.0, 700: 268.0, 500: 252.0, 300: 229.0, 250: 222.0}
INT16_FILL = -32767


def grid(resolution_deg: float = 5.625, descending: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre latitudes and longitudes (degrees) of a global equiangular grid."""
    n_lat = round(180.0 / resolution_deg)
    n_lon = round(360.0 / resolution_deg)
    if not np.isclose(n_lat * resolution_deg, 180.0) or n_lat < 2:
        raise ValueError(f"resolution_deg={resolution_deg} must divide 180 degrees")
    lat = -90.0 + resolution_deg * (np.arange(n_lat) + 0.5)
    lon = resolution_deg * np.arange(n_lon)
    return (lat[::-1].copy() if descending else lat), lon


def _level_ref(table: dict[int, float], level: float) -> float:
    keys = np.array(sorted(table))
    return float(np.interp(level, keys, [table[k] for k in keys]))


def _check_args(convention: str, n_times: int, step_hours: int, levels: tuple) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if n_times < 1 or step_hours < 1 or not levels:
        raise ValueError(
            f"need n_times >= 1, step_hours >= 1 and a level; got {n_times}, {step_hours}, {levels}"
        )


def _planetary_waves(
    rng: np.random.Generator, t_ax: np.ndarray, phi: np.ndarray, lam: np.ndarray
) -> np.ndarray:
    """Eastward-travelling zonal wavenumbers 2-6 ``(T, lat, lon)``, peaking in mid-latitudes."""
    waves = np.zeros((t_ax.shape[0], phi.shape[1], lam.shape[2]))
    for k in range(2, 7):
        period_days = rng.uniform(3.0, 12.0)
        amp = rng.uniform(0.5, 1.0) / k**0.5
        phase = rng.uniform(0, 2 * np.pi)
        # eastward travel: phase k(λ - ω t); the amplitude slowly modulated over ~a month
        mod = 1.0 + 0.3 * np.sin(
            2 * np.pi * t_ax / rng.uniform(20.0, 40.0) + rng.uniform(0, 2 * np.pi)
        )
        waves += amp * mod * np.cos(k * lam - 2 * np.pi * t_ax / period_days + phase)
    envelope = np.exp(-(((np.abs(phi) - np.deg2rad(45.0)) / np.deg2rad(20.0)) ** 2))
    return waves * envelope


def _red_noise(
    rng: np.random.Generator, n_times: int, phi: np.ndarray, lam: np.ndarray
) -> np.ndarray:
    """AR(1) red noise in time, smooth in space (a few low modes), ``(T, lat, lon)``."""
    noise = np.zeros((n_times, phi.shape[1], lam.shape[2]))
    state = np.zeros(noise.shape[1:])
    basis = [
        np.cos(m * lam[0] + rng.uniform(0, 2 * np.pi)) * np.cos(n * phi[0])
        for m in range(1, 4)
        for n in range(0, 3)
    ]
    for i in range(n_times):
        state = 0.9 * state + 0.1 * sum(rng.standard_normal() * b for b in basis)
        noise[i] = state
    return noise


def generate_era5_like(
    n_times: int = 2924,
    start: str = "2000-01-01",
    step_hours: int = 6,
    levels: tuple[float, ...] = (500.0, 850.0),
    resolution_deg: float = 5.625,
    convention: str = "era5",
    seed: int = 0,
) -> xr.Dataset:
    """The toy atmosphere as a float32 dataset in the chosen naming ``convention``.

    Packing happens when writing (``write_era5_like``): the variables carry the int16
    ``scale_factor``/``add_offset``/``_FillValue`` in their ``encoding``.
    """
    _check_args(convention, n_times, step_hours, levels)
    rng = np.random.default_rng(seed)
    lat, lon = grid(resolution_deg, descending=convention != "weatherbench")
    time = pd.date_range(start, periods=n_times, freq=f"{step_hours}h")
    days = ((time - pd.Timestamp("2000-01-01")) / pd.Timedelta(days=1)).to_numpy()
    phi = np.deg2rad(lat)[None, :, None]
    lam = np.deg2rad(lon)[None, None, :]
    t_ax = days[:, None, None]
    # the seasonal cycle: warm northern summer, cold southern, peak on ~July 15
    season = np.cos(2 * np.pi * (t_ax - 196.0) / 365.25) * np.sin(phi)
    waves = _planetary_waves(rng, t_ax, phi, lam)
    noise = _red_noise(rng, n_times, phi, lam)
    zonal = np.sin(phi) ** 2
    z = np.stack(
        [
            _level_ref(_Z_REF, p)
            - 6.0e3 * (p / 500.0) ** -0.5 * zonal
            + 1.5e3 * season * (500.0 / p)
            + 1.2e3 * (500.0 / p) ** 0.5 * waves
            + 150.0 * noise
            for p in levels
        ],
        axis=1,
    )
    t = np.stack(
        [
            _level_ref(_T_REF, p) - 35.0 * zonal + 8.0 * season + 4.0 * waves + 0.5 * noise
            for p in levels
        ],
        axis=1,
    )
    solar = np.cos(2 * np.pi * ((t_ax * 24.0 % 24.0) / 24.0 + lon[None, None, :] / 360.0) - np.pi)
    t2m = (
        288.0
        - 45.0 * zonal[:, :, :]
        + 10.0 * season
        + 5.0 * np.cos(phi) * solar
        + 3.0 * waves
        + 0.7 * noise
    )
    names = {
        "era5": ("time", "level", "latitude", "longitude"),
        "cds": ("valid_time", "pressure_level", "latitude", "longitude"),
        "weatherbench": ("time", "level", "lat", "lon"),
    }[convention]
    t_dim, l_dim, y_dim, x_dim = names
    hours_units = (
        "seconds since 1970-01-01" if convention == "cds" else "hours since 1900-01-01 00:00:00.0"
    )
    ds = xr.Dataset(
        {
            "z": (
                (t_dim, l_dim, y_dim, x_dim),
                z.astype(np.float32),
                {
                    "units": "m**2 s**-2",
                    "long_name": "Geopotential",
                    "standard_name": "geopotential",
                },
            ),
            "t": (
                (t_dim, l_dim, y_dim, x_dim),
                t.astype(np.float32),
                {"units": "K", "long_name": "Temperature", "standard_name": "air_temperature"},
            ),
            "t2m": (
                (t_dim, y_dim, x_dim),
                t2m.astype(np.float32),
                {"units": "K", "long_name": "2 metre temperature"},
            ),
        },
        coords={
            t_dim: (t_dim, time.values, {"long_name": "time"}),
            l_dim: (
                l_dim,
                np.asarray(levels, dtype=np.int32),
                {
                    "units": "millibars",
                    "long_name": "pressure_level",
                    "positive": "down",
                    "stored_direction": "decreasing",
                    "standard_name": "air_pressure",
                },
            ),
            y_dim: (
                y_dim,
                lat,
                {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"},
            ),
            x_dim: (
                x_dim,
                lon,
                {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"},
            ),
        },
        attrs={
            "title": f"ERA5-like toy atmosphere on a {resolution_deg} degree grid ({convention} layout)",
            "source": (
                f"beamvq beamvq.datamodules.era5.generate_era5_like(n_times={n_times}, start={start}, "
                f"step_hours={step_hours}, levels={tuple(levels)}, resolution_deg={resolution_deg}, "
                f"convention={convention}, seed={seed}); not reanalysis data"
            ),
            "Conventions": "CF-1.6",
        },
    )
    ds[t_dim].encoding = {
        "units": hours_units,
        "calendar": "gregorian",
        "dtype": "int64" if convention == "cds" else "int32",
    }
    for name in ("z", "t", "t2m"):
        ds[name].encoding = pack_encoding(ds[name].values)
    return ds


def pack_encoding(values: np.ndarray) -> dict:
    """ERA5-style int16 packing of ``values``: ``scale_factor``/``add_offset`` spanning the
    finite range in ±32766, so the ``_FillValue`` -32767 never collides with data."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scale = (hi - lo) / 65532.0 if hi > lo else 1.0
    return {
        "dtype": "int16",
        "scale_factor": scale,
        "add_offset": (hi + lo) / 2.0,
        "_FillValue": np.int16(INT16_FILL),
        "zlib": True,
        "complevel": 4,
    }


def write_era5_like(path: str | os.PathLike, **kwargs: object) -> Path:
    """Generate (see ``generate_era5_like`` for the arguments) and write atomically, packed."""
    ds = generate_era5_like(**kwargs)  # type: ignore[arg-type]
    log.info(
        "writing an ERA5-like sample (%s time steps) to %s",
        ds.sizes.get("time", ds.sizes.get("valid_time")),
        path,
    )
    return write_netcdf(ds, path)


class ERA5LikeGenerator(DataGenerator):
    """The ERA5-like toy atmosphere (arguments of ``generate_era5_like``), packed int16."""

    def __init__(
        self,
        n_times: int = 2924,
        start: str = "2000-01-01",
        step_hours: int = 6,
        levels: tuple[float, ...] = (500.0, 850.0),
        resolution_deg: float = 5.625,
        convention: str = "era5",
        seed: int = 0,
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(
                f"generator convention must be one of {CONVENTIONS}, got {convention!r}"
            )
        self.kwargs = dict(
            n_times=n_times,
            start=start,
            step_hours=step_hours,
            levels=tuple(levels),
            resolution_deg=resolution_deg,
            convention=convention,
            seed=seed,
        )

    def write(self, path: str | os.PathLike) -> Path:
        return write_era5_like(str(path), **self.kwargs)
