"""Metadata scan: the files named by ``data.path`` → one merged ``Layout``; reads no data values.

One file at a time (``xarray.open_dataset``, closed after its metadata are read, so every error
names its file and no dask is needed; a zarr store counts as one file, opened lazily by
``beamvq.datamodules.zarr_store``): its variables' dims are mapped to the roles
``(time, [level], y, x)`` and an optional sample dim (``beamvq.datamodules.conventions``), the
channels (variable × level) listed, the grid, the sample labels and the time axis checked against
the first file's. Then the files are put in time order (they must not overlap), and the
selection is worked out: a time range and a time step (``SelectionConfig``), and a lat/lon box
that may wrap across the 0 meridian for longitudes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import xarray as xr

from beamvq.datamodules.config import DimsConfig, SelectionConfig
from beamvq.datamodules.conventions import (
    DIM_RULES,
    REQUIRED_ROLES,
    check_monotonic,
    coord_attrs,
    coord_values,
    find_dim,
    fmt_time,
    is_latitude,
    is_longitude,
    open_netcdf,
    time_values,
)
from beamvq.datamodules.selection import select_box, select_time
from beamvq.datamodules.zarr_store import check_source


class Channel(NamedTuple):
    """One channel of the stacked array: its name, source variable and level label (or None)."""

    name: str
    variable: str
    level: float | None


class FileTimes(NamedTuple):
    """A data file and the positions along its time axis that the selection keeps."""

    path: str
    time_index: np.ndarray


class Layout(NamedTuple):
    """What the files hold after selection, read from metadata only (no data values).

    ``y_index``/``x_index`` are positions in every file's y/x axis (the lat/lon box).
    """

    files: list[FileTimes]
    time_dim: str
    y_dim: str
    x_dim: str
    level_dim: str | None
    sample_dim: str | None
    channels: list[Channel]
    time: np.ndarray
    y_index: np.ndarray
    x_index: np.ndarray
    coords: dict[str, xr.DataArray]
    var_attrs: dict[str, dict]
    latitude: np.ndarray | None
    n_samples: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (
            self.n_samples,
            len(self.time),
            len(self.channels),
            len(self.y_index),
            len(self.x_index),
        )


def resolve_paths(path: str | Sequence[str]) -> list[str]:
    """Files named by ``path``: one file or zarr store, a glob pattern, or a list of them."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise ValueError("data.path: give a NetCDF file, a glob pattern or a list of files")
    files: list[str] = []
    for item in items:
        item = str(item)
        if any(ch in item for ch in "*?["):
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"data.path: no file matches the pattern {item}")
            files.extend(check_source(m) for m in matched)
        else:
            files.append(check_source(item))
    if len(set(files)) != len(files):
        raise ValueError(f"data.path: a file is listed twice in {files}")
    return files


def files_label(names: Sequence[str]) -> str:
    """The data files as messages name them: the first, and how many more."""
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more files)"


def _find_roles(ds: xr.Dataset, dims: list, given: DimsConfig) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for role, rule in DIM_RULES.items():
        explicit = given.role(role)
        if explicit is not None:
            found[role] = explicit if explicit in dims else None
        else:
            rest = [d for d in dims if d not in found.values() and d != given.sample]
            found[role] = find_dim(ds, rest, rule)
    return found


def detect_dims(
    ds: xr.Dataset, var: xr.DataArray, path: str, given: DimsConfig
) -> dict[str, str | None]:
    """The dim of ``var`` playing each role: the one given, else found by the conventions."""
    found = _find_roles(ds, list(var.dims), given)
    missing = [role for role in REQUIRED_ROLES if found[role] is None]
    if missing:
        hint = ", ".join(
            f"data.dims.{r}={given.role(r)!r} not in dims" if given.role(r) else f"no {r} dim found"
            for r in missing
        )
        raise ValueError(
            f"{path}: variable {var.name!r} has dims {tuple(var.dims)} that cannot map to "
            f"(time, y, x): {hint}; set data.dims.time / data.dims.y / data.dims.x"
        )
    return found


class FileScan:
    """Scans the files one by one, checking each against the first (the state of a scan).

    After ``scan(path)`` for every file: ``dims`` (role → dim), ``channels``, ``var_attrs``,
    ``coords`` (``"y"``, ``"x"`` and ``"sample"`` of the first file), ``times`` (each file's time
    labels), and ``latitude``/``longitude`` (whether the grid is lat-lon).
    """

    def __init__(
        self,
        variables: Sequence[str],
        levels: Sequence[float] | None,
        dims: DimsConfig,
        n_files: int,
    ) -> None:
        self.variables = list(variables)
        self.levels = levels
        self.given = dims
        self.n_files = n_files
        self.dims: dict[str, str | None] = {}
        self.first_path = ""
        self.channels: list[Channel] = []
        self._var_channels: dict[str, list[Channel]] = {}
        self.var_attrs: dict[str, dict] = {}
        self.refs: dict[str, np.ndarray] = {}
        self.coords: dict[str, xr.DataArray] = {}
        self.times: list[tuple[str, np.ndarray]] = []
        self.time_attrs: dict | None = None
        self.latitude = False
        self.longitude = False

    def scan(self, path: str) -> None:
        with open_netcdf(path) as ds:
            if not ds.sizes and not ds.variables:
                raise ValueError(
                    f"{path}: the file is empty: it opens but holds no dimensions and no "
                    "variables (an interrupted or failed write?); regenerate or replace it"
                )
            missing = [v for v in self.variables if v not in ds.data_vars]
            if missing:
                have = sorted(map(str, ds.data_vars))
                raise ValueError(f"{path}: variable(s) {missing} not in the file; it has {have}")
            if not self.dims:
                self.dims = detect_dims(ds, ds[self.variables[0]], path, self.given)
                self.first_path = path
            for name in self.variables:
                self._variable(ds, path, name)
            has_sample = self._sample_dim(ds, path)
            for role in ("y", "x"):
                self._grid(ds, path, role)
            if has_sample:
                self._samples(ds, path)
            self._time(ds, path)

    def _variable(self, ds: xr.Dataset, path: str, name: str) -> None:
        var = ds[name]
        found = detect_dims(ds, var, path, self.given)
        for role in REQUIRED_ROLES:
            if found[role] != self.dims[role]:
                raise ValueError(
                    f"{path}: variable {name!r} has {role} dim {found[role]!r} but "
                    f"{self.first_path} uses {self.dims[role]!r}; set data.dims.{role}"
                )
        level_dim = found["level"]
        self._check_extra_dims(path, var, level_dim)
        if level_dim is not None and self.dims.get("level") is None:
            self.dims["level"] = level_dim
        levels = [None] if level_dim is None else self._levels(ds, path, var, level_dim)
        chans = [Channel(name if lv is None else f"{name}{lv:g}", name, lv) for lv in levels]
        self._register(path, var, chans)

    def _check_extra_dims(self, path: str, var: xr.DataArray, level_dim: str | None) -> None:
        """Only size-1 dims may be left over once the roles and the sample dim are mapped."""
        allowed = {self.dims["time"], self.dims["y"], self.dims["x"], self.given.sample, level_dim}
        for d in var.dims:
            if d not in allowed and var.sizes[d] != 1:
                raise ValueError(
                    f"{path}: variable {var.name!r} has dims {tuple(var.dims)}: dim {d!r} "
                    f"(size {var.sizes[d]}) cannot map to (time, [level], y, x); "
                    "set data.dims.level / data.dims.sample or select it away"
                )

    def _levels(self, ds: xr.Dataset, path: str, var: xr.DataArray, level_dim: str) -> list:
        have = coord_values(ds, level_dim)
        wanted = have if self.levels is None else np.asarray(self.levels)
        absent = [f"{v:g}" for v in wanted if not np.isclose(have, v).any()]
        if absent:
            raise ValueError(
                f"{path}: variable {var.name!r} has no level {', '.join(absent)} along "
                f"{level_dim!r}; it has {[f'{v:g}' for v in have]}"
            )
        return [float(v) for v in wanted]

    def _register(self, path: str, var: xr.DataArray, chans: list[Channel]) -> None:
        """The first file lists a variable's channels; the others must have the same."""
        name = str(var.name)
        first = self._var_channels.get(name)
        if first is None:
            self._var_channels[name] = chans
            self.channels.extend(chans)
            attrs = dict(var.attrs)
            self.var_attrs[name] = attrs
            for ch in chans:
                self.var_attrs[ch.name] = attrs if ch.level is None else dict(attrs, level=ch.level)
        elif first != chans:
            raise ValueError(
                f"{path}: variable {name!r} has levels {[c.level for c in chans]} but "
                f"{self.first_path} has {[c.level for c in first]} (levels differ across "
                "files); set data.selection.levels"
            )

    def _sample_dim(self, ds: xr.Dataset, path: str) -> bool:
        sd = self.given.sample
        has_sample = sd in ds[self.variables[0]].dims
        for name in self.variables:
            if (sd in ds[name].dims) != has_sample:
                raise ValueError(
                    f"{path}: variable {name!r} and {self.variables[0]!r} disagree on the "
                    f"sample dim {sd!r}"
                )
        return has_sample

    def _grid(self, ds: xr.Dataset, path: str, role: str) -> None:
        dim = self.dims[role]
        assert dim is not None
        values = coord_values(ds, dim)
        ref = self.refs.setdefault(role, values)
        if ref.shape != values.shape or not np.allclose(ref, values, rtol=1e-6, atol=1e-9):
            raise ValueError(
                f"{path}: variable {self.variables[0]!r} is on a different grid than "
                f"{self.first_path}: {dim!r} has {values.size} points "
                f"[{values[0]:g} .. {values[-1]:g}] vs {ref.size} [{ref[0]:g} .. {ref[-1]:g}]"
            )
        if role not in self.coords:
            self.coords[role] = xr.DataArray(
                values, dims=(dim,), attrs=coord_attrs(ds, dim), name=dim
            )

    def _samples(self, ds: xr.Dataset, path: str) -> None:
        sd = self.given.sample
        labels = ds[sd].values if sd in ds.variables else np.arange(ds.sizes[sd])
        ref = self.refs.setdefault("sample", labels)
        if not np.array_equal(ref, labels):
            raise ValueError(
                f"{path}: the samples along {sd!r} differ from those of {self.first_path}"
            )
        if "sample" not in self.coords:
            self.coords["sample"] = xr.DataArray(
                labels, dims=(sd,), attrs=coord_attrs(ds, sd), name=sd
            )

    def _time(self, ds: xr.Dataset, path: str) -> None:
        t_dim = self.dims["time"]
        assert t_dim is not None
        if self.n_files > 1 and t_dim not in ds.variables:
            raise ValueError(
                f"{path}: dim {t_dim!r} has no coordinate values; several files can only be "
                "joined along a labelled time axis"
            )
        time = time_values(ds, t_dim, path)
        check_monotonic(time, t_dim, path)
        if time.size == 0:
            raise ValueError(f"{path}: variable {self.variables[0]!r} has no time steps")
        if self.time_attrs is None:
            self.time_attrs = coord_attrs(ds, t_dim)
            self.latitude = is_latitude(ds, str(self.dims["y"]))
            self.longitude = is_longitude(ds, str(self.dims["x"]))
        self.times.append((path, time))


def order_files(times: list[tuple[str, np.ndarray]], label: str) -> list[tuple[str, np.ndarray]]:
    """The files in time order; they must not overlap, nor mix dated and numeric axes."""
    per_file = sorted(times, key=lambda item: item[1][0])
    if len({t.dtype.kind for _, t in per_file}) > 1:
        raise ValueError(f"{label}: the files mix dated and numeric time axes")
    for (pa, ta), (pb, tb) in zip(per_file, per_file[1:]):
        if tb[0] <= ta[-1]:
            raise ValueError(
                f"{pb}: its time axis ({fmt_time(tb[0])} .. {fmt_time(tb[-1])}) overlaps that "
                f"of {pa} ({fmt_time(ta[0])} .. {fmt_time(ta[-1])}): the files must cover "
                "disjoint periods; drop the file that repeats the other's frames, or keep one "
                "period with data.selection.time_range"
            )
    return per_file


def scan_layout(
    path: str | Sequence[str],
    variables: Sequence[str],
    selection: SelectionConfig,
    dims: DimsConfig,
    label: str,
) -> Layout:
    """Validate the files' metadata and work out the selection; reads no data values."""
    files = resolve_paths(path)
    scan = FileScan(variables, selection.levels, dims, len(files))
    for file in files:
        scan.scan(file)
    per_file = order_files(scan.times, label)
    names = [c.name for c in scan.channels]
    if len(set(names)) != len(names):
        raise ValueError(f"{label}: channel names collide: {names}; rename a variable")
    full_time = np.concatenate([t for _, t in per_file])
    owner = np.concatenate([np.full(t.size, i) for i, (_, t) in enumerate(per_file)])
    local = np.concatenate([np.arange(t.size) for _, t in per_file])
    keep = select_time(full_time, selection, label)
    files_sel = [
        FileTimes(p, local[keep][owner[keep] == i])
        for i, (p, _) in enumerate(per_file)
        if (owner[keep] == i).any()
    ]
    y_index, x_index = select_box(
        scan.coords["y"], scan.coords["x"], scan.longitude, selection, label
    )
    return _layout(scan, files_sel, full_time[keep], y_index, x_index)


def _layout(
    scan: FileScan,
    files: list[FileTimes],
    time: np.ndarray,
    y_index: np.ndarray,
    x_index: np.ndarray,
) -> Layout:
    t_dim, y_dim, x_dim = (str(scan.dims[r]) for r in REQUIRED_ROLES)
    coords: dict[str, xr.DataArray] = {
        t_dim: xr.DataArray(time, dims=(t_dim,), attrs=scan.time_attrs, name=t_dim),
        y_dim: scan.coords["y"].isel({y_dim: y_index}),
        x_dim: scan.coords["x"].isel({x_dim: x_index}),
    }
    sample_dim = scan.given.sample if "sample" in scan.coords else None
    if sample_dim is not None:
        coords[sample_dim] = scan.coords["sample"]
    return Layout(
        files=files,
        time_dim=t_dim,
        y_dim=y_dim,
        x_dim=x_dim,
        level_dim=scan.dims.get("level"),
        sample_dim=sample_dim,
        channels=scan.channels,
        time=time,
        y_index=y_index,
        x_index=x_index,
        coords=coords,
        var_attrs=scan.var_attrs,
        latitude=scan.coords["y"].values[y_index].copy() if scan.latitude else None,
        n_samples=int(scan.coords["sample"].size) if sample_dim is not None else 1,
    )
