"""NetCDF writing shared by the generators and the prediction writer, and leftover temporaries.

Files are written under a temporary name in the target folder and renamed into place, so an
interrupted run never leaves a half-written file behind (``os.replace`` is atomic on POSIX). The
temporary name, ``.<name>.<host>-<pid>.<random>.tmp``, says who writes it: a run killed while
writing leaves that hidden file, and the next write of the same target (or
``remove_stale_temporaries``, which the prediction writer calls before predicting) removes it
once its writer is gone (``is_stale``). The cache conversion (``beamvq.datamodules.cache``)
names its temporary folders the same way.

Modes: ``tempfile`` creates its files 0600 and its folders 0700 whatever the umask, so every
atomic writer gives its temporary the mode a plain ``open``/``mkdir`` would have given the target
(``0o666``/``0o777`` less the umask, ``publish_mode``) before the rename: others on a shared
machine read the outputs exactly when the umask lets them. The umask is read from
``/proc/self/status`` (no change to the process, safe in threads), elsewhere set and restored.

``grid_axes`` names and labels the grid of written files (predictions, the pool): a lat-lon grid
keeps the input's dim names with CF ``standard_name``/``units``/``axis`` (CF-1.8 section 4.1-4.2),
any other grid is ``y``/``x`` with the input's attributes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import xarray as xr

from beamvq.datamodules.conventions import LON_NAMES, LON_UNITS
from beamvq.protocols import AxisInfo, DataInfo

log = logging.getLogger(__name__)

# a temporary file or folder nobody touched for this long is left over, whoever wrote it (a
# writer on another host, or one of a beamvq version whose names say nothing of the writer)
STALE_AFTER_S = 3600.0
# what tempfile's random part is made of (8 characters; tempfile._RandomNameSequence)
_RANDOM = r"[a-z0-9_]{8}"
_OWNER = re.compile(r"^(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, as temporary names carry it (host: letters, digits, _)."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def temporary_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` (``tempfile`` adds ``<random>.tmp``)."""
    return f".{name}.{owner_tag()}."


def temporary_pattern(name: str) -> re.Pattern[str]:
    """Temporary names of ``name``: ``.<name>.<host>-<pid>.<random>.tmp``, and the earlier
    ``.<name>.<random>.tmp`` (group ``owner`` is then None)."""
    return re.compile(rf"^\.{re.escape(name)}\.(?:(?P<owner>[A-Za-z0-9_]+-\d+)\.)?{_RANDOM}\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _last_modified(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of what is in it."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def is_stale(path: Path, owner: str | None, now: float | None = None) -> bool:
    """Whether the temporary ``path`` written by ``owner`` (``<host>-<pid>``, None for names
    that do not say) is left over: its writer is a process of this host that is gone; or, for
    a writer on another host or unnamed, nothing in it changed for ``STALE_AFTER_S``. A
    temporary of this process or of a live process of this host is never stale."""
    match = _OWNER.match(owner or "")
    if match is not None and match["host"] == owner_tag().rsplit("-", 1)[0]:
        pid = int(match["pid"])
        return pid != os.getpid() and not _process_alive(pid)
    now = time.time() if now is None else now
    try:
        return now - _last_modified(path) >= STALE_AFTER_S
    except OSError:  # removed meanwhile
        return False


def disk_size(path: Path) -> int:
    """Bytes ``path`` (a file or a folder) occupies on disk (a sparse file counts what it uses)."""
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for f in files:
        st = f.lstat()
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def format_size(n_bytes: float) -> str:
    """``512 B``, ``1.5 MiB``, ``1.7 GiB``."""
    units = ("B", "KiB", "MiB", "GiB")
    power = 0
    while n_bytes >= 1024 and power < len(units) - 1:
        n_bytes, power = n_bytes / 1024, power + 1
    return f"{n_bytes:.0f} B" if power == 0 else f"{n_bytes:.1f} {units[power]}"


def stale_temporaries(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The entries of ``folder`` whose name matches ``pattern`` (group ``owner``: the writer,
    may be None) and that are left over (``is_stale``)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match is not None and is_stale(path, match["owner"]):
            found.append(path)
    return found


def remove_temporaries(paths: list[Path], what: str) -> list[Path]:
    """Delete ``paths`` (files or folders) and say so in one log line naming them and their size
    on disk; returns those removed (one another process removed first is skipped)."""
    removed, size = [], 0
    for path in paths:
        try:
            n = disk_size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        size += n
    if removed:
        log.warning(
            "removed %d temporar%s (%s) left by an interrupted %s: %s",
            len(removed), "y" if len(removed) == 1 else "ies", format_size(size), what,
            ", ".join(str(p) for p in removed),
        )  # fmt: skip
    return removed


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that interrupted writes of ``target`` left beside it
    (``.<name>.<host>-<pid>.<random>.tmp`` whose writer is gone, see ``is_stale``), with one log
    line; returns what was removed."""
    target = Path(target)
    found = stale_temporaries(target.parent, temporary_pattern(target.name))
    return remove_temporaries(found, f"write of {target}")


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike, complevel: int = 4) -> Path:
    """Write ``ds`` to ``path`` atomically with zlib compression on every data variable.

    A failing write (a full disk: netCDF's ``NetCDF: HDF error``; no permission) raises an
    ``OSError`` naming ``path``; temporaries of earlier, interrupted writes are removed.
    """
    path = Path(path)
    encoding = {
        name: {"zlib": True, "complevel": complevel}
        for name, var in ds.data_vars.items()
        if var.dtype.kind in "fiu" and "zlib" not in var.encoding
    }
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent
        )
        os.close(fd)
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # netCDF4: a full disk is a RuntimeError
            raise OSError(f"cannot write {path}: {err}{_space_note(path.parent)}") from err
        raise
    remove_stale_temporaries(path)
    return path


def _space_note(folder: Path) -> str:
    """``" (<free> free on <folder>)"``, or nothing when the folder cannot be examined."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({format_size(free)} free on {folder})"


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask: from ``/proc/self/status`` (Linux), which leaves it untouched; else
    set to 0o077 (never looser than any umask, for whatever another thread creates meanwhile) and
    restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give the temporary ``path`` the mode ``open`` (``folder``: ``mkdir``) gives a new file:
    ``0o666`` (``0o777``) less the umask; ``tempfile`` made it 0600 (0700). A filesystem that
    refuses modes (some network mounts) keeps what it gives: the write goes on."""
    mode = (0o777 if folder else 0o666) & ~current_umask()
    try:
        os.chmod(path, mode)
    except OSError as err:
        log.debug("cannot set mode %o on %s: %s", mode, path, err)


# CF attributes of a latitude / longitude coordinate (CF-1.8 sections 4.1 and 4.2)
_GEO = {
    "y": {"standard_name": "latitude", "units": "degrees_north", "axis": "Y", "long_name": "latitude"},
    "x": {"standard_name": "longitude", "units": "degrees_east", "axis": "X", "long_name": "longitude"},
}  # fmt: skip


def is_longitude_axis(axis: AxisInfo) -> bool:
    """Whether ``axis`` is longitude: by name, ``standard_name`` or units (as the reading finds
    it, ``beamvq.datamodules.conventions.is_longitude``)."""
    return (
        axis.name in LON_NAMES
        or axis.attrs.get("standard_name") == "longitude"
        or axis.attrs.get("units") in LON_UNITS
    )


def grid_axes(info: DataInfo) -> dict[str, tuple[str, dict]]:
    """``{"y": (dim, attrs), "x": (dim, attrs)}`` of a written file's grid: latitude (the data's
    ``info.latitude``) and longitude keep the input's dim names (``latitude``, ``lat``, ...) with
    CF ``standard_name``, ``units`` (``degrees_north``/``degrees_east``), ``axis`` and the input's
    other attributes; a non-geographic axis is ``y``/``x`` with the input's attributes as read."""
    out: dict[str, tuple[str, dict]] = {}
    geographic = {"y": info.latitude is not None, "x": is_longitude_axis(info.x)}
    for role, axis in (("y", info.y), ("x", info.x)):
        attrs = dict(axis.attrs)
        if not geographic[role]:
            out[role] = (role, attrs)
            continue
        cf = dict(_GEO[role])
        attrs.setdefault("long_name", cf.pop("long_name"))
        out[role] = (axis.name, attrs | cf)
    return out


class DataGenerator(ABC):
    """A built-in dataset: writes its NetCDF file when the datamodule's ``path`` is missing.

    Subclasses hold the generator's flat typed arguments (so YAML configures them by
    ``class_path``) and implement ``write``. Nothing is ever downloaded.
    """

    @abstractmethod
    def write(self, path: str | os.PathLike) -> Path:
        """Generate the data and write them atomically to ``path``."""
