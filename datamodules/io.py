"""NetCDF writing shared by the generators and the prediction writer.

Files are written under a temporary name in the target folder and renamed into place, so an
interrupted run never leaves a half-written file behind (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import xarray as xr


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike, complevel: int = 4) -> Path:
    """Write ``ds`` to ``path`` atomically with zlib compression on every data variable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {
        name: {"zlib": True, "complevel": complevel}
        for name, var in ds.data_vars.items()
        if var.dtype.kind in "fiu" and "zlib" not in var.encoding
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DataGenerator(ABC):
    """A built-in dataset: writes its NetCDF file when the datamodule's ``path`` is missing.

    Subclasses hold the generator's flat typed arguments (so YAML configures them by
    ``class_path``) and implement ``write``. Nothing is ever downloaded.
    """

    @abstractmethod
    def write(self, path: str | os.PathLike) -> Path:
        """Generate the data and write them atomically to ``path``."""
