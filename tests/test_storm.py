"""Tests of the synthetic storm-cell generator (datamodules/storm.py)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from beamvq.datamodules.storm import StormCells, generate_storm, render_cells, write_storm


@pytest.fixture(scope="module")
def sample() -> xr.Dataset:
    # 32 sequences of the default 20 frames at 64^2: the size the event statistics are stated for
    return generate_storm(n_trajectories=32, n_frames=20, height=64, width=64, seed=0)


def test_layout_and_range(sample: xr.Dataset) -> None:
    vil = sample["vil"]
    assert vil.dims == ("trajectory", "time", "y", "x")
    assert vil.dtype == np.float32
    assert vil.shape == (32, 20, 64, 64)
    assert float(vil.min()) >= 0.0
    assert float(vil.max()) <= 255.0
    # strong cells exist, so the top of the scale is reached somewhere
    assert float(vil.max()) > 219.0
    assert vil.attrs["units"] == "1"
    assert "SEVIR" in vil.attrs["long_name"]
    assert sample["x"].attrs["axis"] == "X" and sample["y"].attrs["axis"] == "Y"
    np.testing.assert_allclose(sample["x"].values[:3], [0.5, 1.5, 2.5])
    np.testing.assert_allclose(sample["time"].values[:3], [0.0, 5.0, 10.0])
    assert sample["trajectory"].dtype.kind == "i"
    assert sample.attrs["Conventions"] == "CF-1.8"
    assert "seed=0" in sample.attrs["source"]


def test_event_fractions_match_sevir_thresholds(sample: xr.Dataset) -> None:
    vil = sample["vil"].values
    above_16 = float((vil > 16).mean())
    above_219 = float((vil > 219).mean())
    assert 0.18 <= above_16 <= 0.32, above_16
    assert 0.001 / 3 <= above_219 <= 0.001 * 3, above_219


def test_seeds() -> None:
    a = generate_storm(n_trajectories=2, n_frames=4, height=16, width=24, seed=1)
    b = generate_storm(n_trajectories=2, n_frames=4, height=16, width=24, seed=1)
    c = generate_storm(n_trajectories=2, n_frames=4, height=16, width=24, seed=2)
    np.testing.assert_array_equal(a["vil"].values, b["vil"].values)
    assert not np.allclose(a["vil"].values, c["vil"].values)
    assert a["vil"].shape == (2, 4, 16, 24)


def test_trajectory_does_not_depend_on_count() -> None:
    few = generate_storm(n_trajectories=2, n_frames=3, height=16, width=16, seed=5)
    many = generate_storm(n_trajectories=5, n_frames=3, height=16, width=16, seed=5)
    np.testing.assert_array_equal(few["vil"].values, many["vil"].values[:2])


def _one_cell(velocity: tuple[float, float], angle: float = 0.3) -> StormCells:
    return StormCells(
        centre=np.array([[[32.0, 30.0]]]),
        velocity=np.array([[list(velocity)]]),
        sigma=np.array([[[3.0, 5.0]]]),
        angle=np.array([[angle]]),
        peak=np.array([[200.0]]),
        t_peak=np.array([[4.0]]),
        life=np.array([[1e6]]),  # constant amplitude, so the centroid is the centre
    )


def test_single_cell_moves_with_its_velocity() -> None:
    velocity = (1.25, -0.75)  # (y, x) px/frame
    field = render_cells(_one_cell(velocity), n_frames=9, height=64, width=64)[0]
    yy, xx = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5, indexing="ij")
    mass = field.sum(axis=(1, 2))
    cy = (field * yy).sum(axis=(1, 2)) / mass
    cx = (field * xx).sum(axis=(1, 2)) / mass
    np.testing.assert_allclose(np.diff(cy), velocity[0], atol=1e-3)
    np.testing.assert_allclose(np.diff(cx), velocity[1], atol=1e-3)
    # at the peak time the centroid is the stated centre
    np.testing.assert_allclose([cy[4], cx[4]], [32.0, 30.0], atol=1e-3)
    # the centre is a pixel corner, so the sampled maximum sits a little below the peak
    assert 190.0 < field[4].max() <= 200.0


def test_life_cycle_and_rotation() -> None:
    cells = _one_cell((0.0, 0.0), angle=0.0)._replace(life=np.array([[2.0]]))
    field = render_cells(cells, n_frames=9, height=64, width=64)[0]
    peaks = field.reshape(9, -1).max(axis=1)
    expected = 200.0 * np.exp(-(((np.arange(9) - 4.0) / 2.0) ** 2))
    # the centre (32, 30) is a pixel corner, so the sampled maximum sits slightly below the peak
    np.testing.assert_allclose(
        peaks, expected * np.exp(-0.5 * (0.5**2 / 9 + 0.5**2 / 25)), rtol=1e-5
    )
    # angle 0: sigma_y = 3, sigma_x = 5, so the cell is wider along x
    frame = field[4]
    assert (frame[31] > 1.0).sum() > (frame[:, 29] > 1.0).sum()
    rotated = render_cells(cells._replace(angle=np.array([[np.pi / 2]])), 9, 64, 64)[0, 4]
    assert (rotated[31] > 1.0).sum() < (rotated[:, 29] > 1.0).sum()


def test_max_combination_not_sum() -> None:
    two = StormCells(
        centre=np.array([[[16.0, 16.0], [16.0, 16.0]]]),
        velocity=np.zeros((1, 2, 2)),
        sigma=np.full((1, 2, 2), 4.0),
        angle=np.zeros((1, 2)),
        peak=np.array([[180.0, 200.0]]),
        t_peak=np.zeros((1, 2)),
        life=np.full((1, 2), 10.0),
    )
    field = render_cells(two, n_frames=1, height=32, width=32)
    alone = render_cells(StormCells(*(p[:, 1:] for p in two)), n_frames=1, height=32, width=32)
    np.testing.assert_array_equal(field, alone)


def test_write_roundtrip(tmp_path) -> None:
    path = write_storm(tmp_path / "storm.nc", n_trajectories=2, n_frames=3, height=16, width=16)
    with xr.open_dataset(path) as ds:
        ref = generate_storm(n_trajectories=2, n_frames=3, height=16, width=16)
        np.testing.assert_array_equal(ds["vil"].values, ref["vil"].values)
        assert ds["time"].attrs["units"] == "min"
        assert ds["time"].dtype == np.float64
        assert ds.attrs["Conventions"] == "CF-1.8"
