"""Zarr stores as ``data.path``: recognize a store folder and open it lazily through xarray.

A zarr store is a folder, not a file (the zarr specifications v2 and v3,
https://zarr-specs.readthedocs.io): its root holds ``.zgroup`` (v2), ``.zmetadata`` (v2
consolidated metadata, what WeatherBench 2 publishes: Rasp et al. 2024, arXiv 2308.15560) or
``zarr.json`` (v3, consolidated when it has a ``consolidated_metadata`` entry); a folder named
``*.zarr`` counts as a store too, so a store without metadata gets the message of an unreadable
store rather than "not found".

``open_zarr_store`` opens with ``xarray.open_dataset(engine="zarr", chunks=None)``: no dask, the
variables stay xarray's lazy backend arrays, so opening reads metadata (and the 1-D index
coordinates) only and each later ``isel(...).values`` reads just the chunks of that block. The
``zarr`` package is an optional extra (``pip install 'beamvq[zarr]'``); without it a store is
refused with that hint before any work (``check_source``, which ``scan.resolve_paths`` applies to
every entry of ``data.path``: a NetCDF file or a zarr store, never another folder).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import xarray as xr

# root entries that make a folder a zarr store (v2 group, v2 consolidated, v3)
STORE_MARKERS = (".zgroup", ".zmetadata", "zarr.json")
ZARR_SUFFIX = ".zarr"
INSTALL_HINT = "install the zarr extra: pip install 'beamvq[zarr]'"


def is_zarr_store(path: str) -> bool:
    """Whether ``path`` names a zarr store: a folder with zarr metadata at its root, or a folder
    (or a missing path) whose name ends in ``.zarr``."""
    p = Path(path)
    if p.is_dir():
        return p.suffix == ZARR_SUFFIX or any((p / m).is_file() for m in STORE_MARKERS)
    return p.suffix == ZARR_SUFFIX and not p.exists()


def zarr_available() -> bool:
    """Whether the ``zarr`` package imports (xarray's zarr backend needs it)."""
    try:
        importlib.import_module("zarr")
    except ImportError:
        return False
    return True


def require_zarr(path: str) -> None:
    """Stop when ``path`` is a zarr store and the ``zarr`` package is not installed."""
    if not zarr_available():
        raise ImportError(f"data.path {path} is a zarr store; {INSTALL_HINT}")


def is_consolidated(path: str) -> bool:
    """Whether the store's metadata are consolidated (v2 ``.zmetadata``, or a v3 ``zarr.json``
    with ``consolidated_metadata``): then opening reads one metadata document."""
    root = Path(path)
    if (root / ".zmetadata").is_file():
        return True
    try:
        meta = json.loads((root / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("consolidated_metadata") is not None


def open_zarr_store(path: str) -> xr.Dataset:
    """Open the store lazily (no dask; metadata and index coordinates only); any failure becomes
    one message naming the store."""
    require_zarr(path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.path: zarr store not found: {path}")
    try:
        return xr.open_dataset(
            path, engine="zarr", chunks=None, cache=False, consolidated=is_consolidated(path)
        )
    except Exception as err:  # zarr raises several types for a folder that is not a store
        raise ValueError(
            f"{path}: cannot read the folder as a zarr store ({type(err).__name__}: {err})"
        ) from err


def check_source(item: str) -> str:
    """``item`` when it is a NetCDF file or a zarr store (with the ``zarr`` package installed)."""
    if is_zarr_store(item):
        if not Path(item).is_dir():
            raise FileNotFoundError(f"data.path: zarr store not found: {item}")
        require_zarr(item)
        return os.path.normpath(item)  # "era5.zarr/" and "era5.zarr" name one store
    if Path(item).is_dir():
        raise ValueError(
            f"data.path: {item} is a folder but not a zarr store (no {', '.join(STORE_MARKERS)}"
            " in it); give NetCDF files, zarr stores or a glob pattern"
        )
    if not Path(item).is_file():
        raise FileNotFoundError(f"data.path: NetCDF file not found: {item}")
    return item
