"""The selection: which time steps and which grid points of the files become the array.

A time range (labels, inclusive; partial dates such as ``2015`` cover the whole year) and a time
step (frames off that grid, counted from the first kept time, are skipped), and a lat/lon box; a
longitude box may wrap across the 0 meridian (``(340, 40)``) and is then ordered west to east.
Settings: ``beamvq.datamodules.config.SelectionConfig``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from beamvq.datamodules.config import SelectionConfig
from beamvq.datamodules.conventions import fmt_time, label_slice, parse_time_step


def select_time(full_time: np.ndarray, selection: SelectionConfig, label: str) -> np.ndarray:
    """Positions of ``full_time`` inside ``time_range`` and on the ``time_step`` grid (counted
    from the first kept time)."""
    keep = np.arange(full_time.size)
    if selection.time_range is not None:
        keep = keep[label_slice(full_time, *selection.time_range, "selection.time_range")]
        if keep.size == 0:
            raise ValueError(
                f"data.selection.time_range={selection.time_range} selects no time step of "
                f"{label}: its time axis spans {fmt_time(full_time[0])} .. "
                f"{fmt_time(full_time[-1])}"
            )
    if selection.time_step is not None:
        step = parse_time_step(selection.time_step, full_time)
        offset = full_time[keep] - full_time[keep[0]]
        if full_time.dtype.kind == "M":
            on_grid = offset.astype(np.int64) % np.int64(step.astype(np.int64)) == 0
        else:
            ratio = offset / step
            on_grid = np.abs(ratio - np.round(ratio)) < 1e-6
        keep = keep[on_grid]
    return keep


def box_index(values: np.ndarray, lo: float, hi: float, periodic: bool) -> np.ndarray:
    """Positions of ``values`` inside ``[lo, hi]``; for longitudes the box may wrap (350, 20)."""
    if periodic:
        width = (hi - lo) % 360.0
        offset = (values - lo) % 360.0
        keep = np.flatnonzero(offset <= width + 1e-9)
        # order by distance from the western edge, so a wrapping box stays contiguous west to east
        return keep[np.argsort(offset[keep], kind="stable")]
    a, b = min(lo, hi), max(lo, hi)
    return np.flatnonzero((values >= a) & (values <= b))


def select_box(
    y: xr.DataArray, x: xr.DataArray, longitude: bool, selection: SelectionConfig, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Positions along the y and x coordinates inside ``lat_range``/``lon_range`` (all when not
    given); ``longitude``: x is a longitude, so its box may wrap across 0."""
    index = {}
    for coord, key, box, periodic in (
        (y, "lat_range", selection.lat_range, False),
        (x, "lon_range", selection.lon_range, longitude),
    ):
        values = coord.values
        idx = np.arange(values.size) if box is None else box_index(values, *box, periodic=periodic)
        if idx.size == 0:
            raise ValueError(
                f"data.selection.{key}={box} selects no point of {coord.dims[0]!r} in {label} "
                f"(it spans {values.min():g} .. {values.max():g})"
            )
        index[key] = idx
    return index["lat_range"], index["lon_range"]
