"""Tests of the shallow-water dam-break generator (datamodules/shallow_water.py)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from beamvq.datamodules.shallow_water import (
    ShallowWaterRun,
    cell_centres,
    dam_break_height,
    generate_shallow_water,
    simulate_shallow_water,
    write_shallow_water,
)

RES = 32
CELL_AREA = (5.0 / RES) ** 2


@pytest.fixture(scope="module")
def run() -> ShallowWaterRun:
    return simulate_shallow_water(dam_break_height(RES, 0.7), t_end=1.0, n_frames=101)


@pytest.fixture(scope="module")
def long_run() -> ShallowWaterRun:
    # long enough for the wave to leave through the boundary
    return simulate_shallow_water(dam_break_height(RES, 0.7), t_end=4.0, n_frames=21)


def test_grid_and_initial_state() -> None:
    c = cell_centres(4)
    np.testing.assert_allclose(c, [-1.875, -0.625, 0.625, 1.875])
    h0 = dam_break_height(RES, 0.5)
    assert set(np.unique(h0)) == {1.0, 2.0}
    assert h0[RES // 2, RES // 2] == 2.0 and h0[0, 0] == 1.0
    # area of the dam close to pi r^2
    assert abs((h0 == 2.0).sum() * CELL_AREA - np.pi * 0.25) < 0.1


def test_saved_times_and_steps(run: ShallowWaterRun) -> None:
    assert run.h.shape == (101, RES, RES)
    np.testing.assert_allclose(run.time, np.linspace(0.0, 1.0, 101))
    np.testing.assert_array_equal(run.h[0], dam_break_height(RES, 0.7))
    assert run.n_steps >= 100


def test_mass_conserved_before_wave_reaches_boundary(run: ShallowWaterRun) -> None:
    mass = run.h.sum(axis=(1, 2)) * CELL_AREA
    early = run.time <= 0.2  # the front (speed ~1.3) is far from the edge at |x| = 2.5
    np.testing.assert_allclose(mass[early], mass[0], rtol=1e-12, atol=0)
    assert np.all(np.abs(run.outflow[early]) < 1e-10 * mass[0])


def test_mass_change_equals_boundary_flux(long_run: ShallowWaterRun) -> None:
    mass = long_run.h.sum(axis=(1, 2)) * CELL_AREA
    np.testing.assert_allclose(mass + long_run.outflow, mass[0], rtol=1e-12, atol=0)
    # the excess water (pi r^2 above the outside level) largely leaves; transmissive boundaries
    # also let the trough behind the front draw some back in later, so mass is not monotone
    assert long_run.outflow.max() > 0.5 * np.pi * 0.49
    assert np.all(np.diff(long_run.outflow[:8]) >= 0.0)


def test_height_positive(run: ShallowWaterRun, long_run: ShallowWaterRun) -> None:
    assert run.h.min() > 0.5
    assert long_run.h.min() > 0.5
    assert run.h.max() <= 2.0 + 1e-12


def test_radial_symmetry(run: ShallowWaterRun) -> None:
    for k in (10, 50, 100):
        h = run.h[k]
        np.testing.assert_allclose(h, h.T, atol=1e-12)  # x <-> y
        np.testing.assert_allclose(h, h[:, ::-1], atol=1e-12)  # x -> -x
        np.testing.assert_allclose(h, h[::-1, :], atol=1e-12)  # y -> -y
        # the x momentum is odd in x, so it changes sign under the mirror
        np.testing.assert_allclose(run.hu[k], -run.hu[k][:, ::-1], atol=1e-12)
        np.testing.assert_allclose(run.hu[k], run.hv[k].T, atol=1e-12)
    # the dam collapses: the centre drops, the water spreads outwards
    assert run.h[100, RES // 2, RES // 2] < 1.5
    assert run.h[50, RES // 2, RES // 4] > 1.0 + 1e-3


def test_lake_at_rest_is_exactly_steady() -> None:
    lake = simulate_shallow_water(np.ones((RES, RES + 8)), t_end=1.0, n_frames=11)
    assert np.all(lake.h == 1.0)
    assert np.all(lake.hu == 0.0) and np.all(lake.hv == 0.0)
    assert np.all(lake.outflow == 0.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        simulate_shallow_water(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="cfl"):
        simulate_shallow_water(np.ones((4, 4)), cfl=0.9)


def test_dataset_layout_and_seeds() -> None:
    a = generate_shallow_water(n_trajectories=2, resolution=16, n_frames=11, t_end=0.5, seed=1)
    b = generate_shallow_water(n_trajectories=2, resolution=16, n_frames=11, t_end=0.5, seed=1)
    c = generate_shallow_water(n_trajectories=2, resolution=16, n_frames=11, t_end=0.5, seed=2)
    for name, units in (("h", "m"), ("u", "m s-1"), ("v", "m s-1")):
        assert a[name].dims == ("trajectory", "time", "y", "x")
        assert a[name].dtype == np.float32
        assert a[name].attrs["units"] == units
    assert a["h"].shape == (2, 11, 16, 16)
    assert a["x"].attrs["axis"] == "X" and a["y"].attrs["axis"] == "Y"
    assert a.attrs["Conventions"] == "CF-1.8"
    np.testing.assert_array_equal(a["h"].values, b["h"].values)
    radii_a, radii_c = a["radius"].values, c["radius"].values
    assert np.all((radii_a >= 0.3) & (radii_a <= 0.7))
    assert not np.allclose(radii_a, radii_c)
    assert not np.allclose(a["h"].values, c["h"].values)
    # velocity is momentum / depth and starts at rest
    assert np.all(a["u"].values[:, 0] == 0.0)
    assert float(np.abs(a["u"].values[:, -1]).max()) > 0.05


def test_write_roundtrip(tmp_path) -> None:
    path = write_shallow_water(tmp_path / "sw.nc", n_trajectories=1, resolution=8, n_frames=3)
    with xr.open_dataset(path) as ds:
        assert set(ds.data_vars) == {"h", "u", "v"}
        assert ds["time"].attrs["units"] == "s"
        np.testing.assert_allclose(ds["time"].values, [0.0, 0.5, 1.0])
