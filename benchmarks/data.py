"""Windows per second through the DataLoader: in-memory, memory-mapped cache, naive xarray.

Three ways to serve the same training windows (``beamvq.datamodules.netcdf``):

(a) in memory: the files read once into a float32 ``(sample, time, channel, y, x)`` array;
    an item is two numpy slices;
(b) the memory-mapped ``.npy`` cache (``beamvq.datamodules.cache``) used above ``cache.above_mb``;
    an item is two slices of the map, copied out of the page cache;
(c) naive: a Dataset that keeps the NetCDF file open and calls ``xarray`` ``isel`` per item and
    per variable/level (decoding int16 packing and zlib chunks every time), as much research
    code does.

Two problems: (1) 64² Navier–Stokes vorticity, 10 + 10 frames, one variable;
(2) the ERA5-like sample, 32 × 64, 12 + 12 frames, 5 channels (z, t at 500/850 hPa, t2m).

Then the check that loading never limits a CPU training step: the time to load one batch
(path (a), no workers) against one optimizer step (forward, backward, AdamW) of the quickstart
SimVP-v2 on that batch. Both are timed on the same machine with the same threads.

Usage: ``python benchmarks/data.py [--batch-size 16] [--max-windows 1024] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset

from beamvq.backbones.simvp import SimVPv2
from beamvq.datamodules.config import CacheConfig, SelectionConfig, SplitConfig, WindowConfig
from beamvq.datamodules.era5 import write_era5_like
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import write_navier_stokes
from beamvq.datamodules.windows import Sample, collate_windows


class NaiveXarrayDataset(Dataset):
    """The anti-pattern, for comparison: one open file, ``isel`` per item and per channel."""

    def __init__(
        self,
        path: str,
        channels: list[tuple[str, float | None]],
        starts: np.ndarray,
        in_steps: int,
        target_steps: int,
        time_dim: str,
        level_dim: str | None,
        sample_dim: str | None,
    ) -> None:
        self.ds = xr.open_dataset(path)
        self.channels = channels
        self.starts = starts
        self.in_steps, self.target_steps = in_steps, target_steps
        self.time_dim, self.level_dim, self.sample_dim = time_dim, level_dim, sample_dim

    def __len__(self) -> int:
        return len(self.starts)

    def _frames(self, s: int, a: int, b: int) -> torch.Tensor:
        out = []
        for name, level in self.channels:
            sel: dict = {self.time_dim: slice(a, b)}
            if self.sample_dim is not None:
                sel[self.sample_dim] = s
            var = self.ds[name]
            if level is not None:
                var = var.sel({self.level_dim: level})
            out.append(var.isel(sel).values.astype(np.float32))
        return torch.from_numpy(np.stack(out, axis=1))

    def __getitem__(self, i: int) -> Sample:
        s, t0 = (int(v) for v in self.starts[i])
        mid = t0 + self.in_steps
        return Sample(
            self._frames(s, t0, mid),
            self._frames(s, mid, mid + self.target_steps),
            torch.tensor(1.0),
            torch.tensor(i),
        )


def windows_per_second(dataset: Dataset, batch_size: int, max_windows: int) -> tuple[float, float]:
    """(windows/s, seconds per batch) through a shuffled DataLoader, after one warm-up batch."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=collate_windows,
        generator=torch.Generator().manual_seed(0),
    )
    it = iter(loader)
    next(it)
    n, batches = 0, 0
    start = time.perf_counter()
    for batch in it:
        n += batch.x.shape[0]
        batches += 1
        if n >= max_windows:
            break
    elapsed = time.perf_counter() - start
    return n / elapsed, elapsed / max(batches, 1)


def training_step_seconds(batch: Sample, repeats: int = 3) -> float:
    """One AdamW step of the quickstart SimVP-v2 (hid_s 16, hid_t 64) on ``batch``."""
    _, t_in, c, _, _ = batch.x.shape
    model = SimVPv2(t_in, batch.y.shape[1], c, c, hid_s=16, hid_t=64, n_s=4, n_t=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = (batch.x - batch.x.mean()) / batch.x.std()
    y = (batch.y - batch.x.mean()) / batch.x.std()

    def step() -> None:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def run_case(name: str, dm: NetCDFDataModule, cache_dir: Path, args: argparse.Namespace) -> None:
    dm.setup()
    lay = dm.layout()
    channels = [(c.variable, c.level) for c in lay.channels]
    cached = NetCDFDataModule(
        path=dm.path,
        variables=dm.variables,
        windows=dm.windows,
        selection=dm.selection,
        splits=dm.splits,
        cache=CacheConfig(above_mb=0, dir=str(cache_dir)),
    )
    start = time.perf_counter()
    cached.setup()
    convert_s = time.perf_counter() - start
    naive = NaiveXarrayDataset(
        str(lay.files[0].path),
        channels,
        dm.plan.starts["train"],
        dm.in_steps,
        dm.target_steps,
        lay.time_dim,
        lay.level_dim,
        lay.sample_dim,
    )
    datasets = {
        "(a) in memory": (dm.dataset("train"), args.max_windows),
        "(b) memmap cache": (cached.dataset("train"), args.max_windows),
        # the naive path is slow: a tenth of the windows gives a stable rate
        "(c) naive xarray isel": (naive, max(args.batch_size * 4, args.max_windows // 10)),
    }
    # interleaved rounds, best of each: the machine is shared, and a round disturbed by another
    # process says nothing about the loader
    rates: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for label, (dataset, n) in datasets.items():
            rate = windows_per_second(dataset, args.batch_size, n)
            if label not in rates or rate[0] > rates[label][0]:
                rates[label] = rate
    naive.ds.close()
    shape = lay.shape
    print(
        f"\n{name}: array (sample, time, channel, y, x) = {shape}, windows of "
        f"{dm.in_steps} + {dm.target_steps} frames, {len(dm.plan.starts['train'])} training windows, "
        f"batch {args.batch_size}; one-time cache conversion {convert_s:.2f} s"
    )
    base = rates["(c) naive xarray isel"][0]
    print(f"  {'path':<24}{'windows/s':>12}{'ms/batch':>10}{'vs (c)':>9}")
    for label, (rate, per_batch) in rates.items():
        print(f"  {label:<24}{rate:>12.0f}{per_batch * 1e3:>10.2f}{rate / base:>8.0f}x")
    # the floor of any loader: copying the batch's bytes once (a plain memcpy of the same size)
    batch = next(
        iter(
            DataLoader(dm.dataset("train"), batch_size=args.batch_size, collate_fn=collate_windows)
        )
    )
    frames = torch.cat([batch.x, batch.y], dim=1).numpy()
    target = np.empty_like(frames)
    start = time.perf_counter()
    for _ in range(20):
        np.copyto(target, frames)
    copy_s = (time.perf_counter() - start) / 20
    print(
        f"  memcpy of one batch's {frames.nbytes / 2**20:.1f} MiB of frames: {copy_s * 1e3:.2f} ms "
        f"({frames.nbytes / copy_s / 2**30:.1f} GiB/s), the floor of (a) and (b)"
    )
    step_s = training_step_seconds(batch)
    load_s = rates["(a) in memory"][1]
    print(
        f"  training step (quickstart SimVP-v2, forward+backward+AdamW): {step_s * 1e3:.1f} ms; "
        f"loading a batch (a) {load_s * 1e3:.2f} ms = {100 * load_s / step_s:.2f}% of it, "
        f"(b) {rates['(b) memmap cache'][1] * 1e3:.2f} ms = "
        f"{100 * rates['(b) memmap cache'][1] / step_s:.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-windows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats, best kept")
    parser.add_argument("--workdir", type=str, default=None, help="keep the generated files here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        ns = work / "ns_64.nc"
        if not ns.is_file():
            write_navier_stokes(ns, n_trajectories=32, resolution=64, n_frames=40)
        era5 = work / "era5_like.nc"
        if not era5.is_file():
            write_era5_like(era5, n_times=1464)
        print(f"torch threads {torch.get_num_threads()}, DataLoader num_workers 0 (single process)")
        run_case(
            "(1) Navier-Stokes 64x64, 10 + 10 frames",
            NetCDFDataModule(
                str(ns),
                ["vorticity"],
                windows=WindowConfig(in_steps=10, out_steps=10),
                splits=SplitConfig(fractions=(1, 0, 0)),
            ),
            Path(tmp) / "cache_ns",
            args,
        )
        run_case(
            "(2) ERA5-like 32x64, 12 + 12 frames, 5 channels",
            NetCDFDataModule(
                str(era5),
                ["z", "t", "t2m"],
                windows=WindowConfig(in_steps=12, out_steps=12),
                selection=SelectionConfig(levels=[500, 850], time_step="6h"),
                splits=SplitConfig(fractions=(1, 0, 0)),
            ),
            Path(tmp) / "cache_era5",
            args,
        )


if __name__ == "__main__":
    main()
