"""A memory-mapped cache for NetCDF archives larger than RAM.

The first run converts the selected variables, levels, box and times once into one float32
``.npy`` file of shape ``(sample, time, channel, y, x)`` (the NumPy format: a small header, then
the raw C-ordered array, so ``np.load(mmap_mode="r")`` maps it without reading it). Reading a
window is then a contiguous slice served by the page cache, with no decoding and no NetCDF handle.

Layout of one entry, ``<data.cache.dir>/<stem>-<key>/``:

- ``data.npy``: the array;
- ``stats.npz``: per-frame statistics gathered during the conversion (so splits, normalization
  and NaN checks need no second pass);
- ``meta.json``: what was converted (files, selection, shape), for people reading the folder.

The key hashes the files' absolute paths, sizes and modification times and the selection, so a
changed file or selection gets a new entry and a stale one is never used. An entry is written in
a temporary folder and renamed into place (atomic on POSIX): a folder that exists is complete,
and two processes converting at once (several nodes on a shared filesystem) leave one good copy.
The entry folder gets the mode ``mkdir`` would give it (``0o777`` less the umask,
``beamvq.datamodules.io.publish_mode``), so others read a shared cache when the umask lets them.
The temporary folder, ``.<entry>.<host>-<pid>.<random>.tmp``, says who converts: a conversion
killed half-way leaves it (gigabytes), and the next run's cache step removes every such folder of
the cache whose converter is gone (``beamvq.datamodules.io.is_stale``), in one log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from beamvq.datamodules.io import (
    publish_mode,
    remove_temporaries,
    stale_temporaries,
    temporary_prefix,
)
from beamvq.datamodules.scan import Layout

log = logging.getLogger(__name__)

# bump when the file layout changes, so old entries are not read with new code
CACHE_VERSION = 1
# the temporary folder of a conversion: ".<stem>-<key>.<host>-<pid>.<random>.tmp" (earlier
# versions: no "<host>-<pid>."), in the cache folder; nothing else there is ever removed
TEMP_ENTRY = re.compile(
    r"^\..+-[0-9a-f]{16}\.(?:(?P<owner>[A-Za-z0-9_]+-\d+)\.)?[a-z0-9_]{8}\.tmp$"
)


class CacheEntry(NamedTuple):
    """A complete cache entry: the ``.npy`` data file and the per-frame statistics."""

    data_file: Path
    stats: dict[str, np.ndarray]


def _stamp(path: str) -> str:
    """Size and modification time of a file; of a folder (a zarr store), the total size, the
    newest modification time and the count of the files inside it: a write into a store's chunks
    changes neither the folder's own size nor its mtime."""
    st = os.stat(path)
    if not os.path.isdir(path):
        return f"{st.st_size}|{st.st_mtime_ns}"
    inner = [p.stat() for p in Path(path).rglob("*") if p.is_file()]
    newest = max((s.st_mtime_ns for s in inner), default=st.st_mtime_ns)
    return f"{sum(s.st_size for s in inner)}|{newest}|{len(inner)}"


def cache_key(files: Sequence[tuple[str, np.ndarray]], selection: dict) -> str:
    """A 16-hex-digit key of the files (path, size, mtime, time positions) and the selection."""
    h = hashlib.sha256()
    h.update(f"beamvq-cache-v{CACHE_VERSION}".encode())
    for path, time_index in files:
        h.update(f"{os.path.abspath(path)}|{_stamp(path)}".encode())
        h.update(np.ascontiguousarray(time_index, dtype=np.int64).tobytes())
    h.update(json.dumps(selection, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def layout_entry_name(lay: Layout) -> str:
    """The entry of a layout: ``<first file stem>-<key of its files and selection>``."""
    key = cache_key(
        files=[(f.path, f.time_index) for f in lay.files],
        selection={
            "channels": [list(c) for c in lay.channels],
            "dims": [lay.time_dim, lay.y_dim, lay.x_dim, lay.level_dim, lay.sample_dim],
            "y_index": lay.y_index.tolist(),
            "x_index": lay.x_index.tolist(),
        },
    )
    return f"{Path(lay.files[0].path).stem}-{key}"


def cache_root(folder: str | None) -> Path:
    """The cache folder: ``folder`` (``data.cache.dir``), else ``$BEAMVQ_CACHE``, else
    ``~/.cache/beamvq``."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get("BEAMVQ_CACHE", Path.home() / ".cache" / "beamvq"))


def entry_dir(root: Path, name: str) -> Path:
    return Path(root) / name


def remove_interrupted_conversions(root: Path) -> list[Path]:
    """Delete the temporary folders that killed conversions left in the cache folder ``root``
    (``TEMP_ENTRY`` whose converter is gone), with one log line; returns what was removed."""
    found = [p for p in stale_temporaries(Path(root), TEMP_ENTRY) if p.is_dir()]
    return remove_temporaries(found, "cache conversion")


def load_entry(folder: Path) -> CacheEntry:
    with np.load(folder / "stats.npz") as npz:
        stats = {k: npz[k] for k in npz.files}
    return CacheEntry(folder / "data.npy", stats)


def ensure_cache(
    root: Path,
    name: str,
    shape: tuple[int, ...],
    reader: Callable[[np.ndarray], tuple],
    description: str = "",
) -> CacheEntry:
    """Return the entry ``root/name``, converting once with ``reader(out) -> stats`` if absent.

    ``reader`` fills the memory-mapped ``out`` (float32, ``shape``) and returns a NamedTuple of
    per-frame statistics arrays, stored beside the data.
    """
    folder = entry_dir(root, name)
    remove_interrupted_conversions(root)
    if (folder / "data.npy").is_file() and (folder / "stats.npz").is_file():
        return load_entry(folder)
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(name), suffix=".tmp", dir=root))
    except OSError as err:
        raise OSError(f"data.cache.dir: cannot create the cache folder {root}: {err}") from err
    size_gb = float(np.prod(shape)) * 4 / 2**30
    log.info("converting %s to a memory-mapped cache %s (%.2f GiB)", description, folder, size_gb)
    start = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.float32, shape=shape)
        stats = reader(out)
        out.flush()
        del out
        np.savez(tmp / "stats.npz", **stats._asdict())
        meta = {
            "version": CACHE_VERSION,
            "shape": list(shape),
            "dims": ["sample", "time", "channel", "y", "x"],
            "description": description,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        publish_mode(tmp, folder=True)  # mkdtemp made it 0700; its files follow the umask
        try:
            os.rename(tmp, folder)
        except OSError:
            # another process finished the same entry first: keep theirs
            if not (folder / "data.npy").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cache %s written in %.1f s", folder, time.perf_counter() - start)
    return load_entry(folder)
