"""Best learning rate against batch size: a small sweep compared with the Surge rule.

The Surge rule (Li et al. 2024, arXiv 2405.14578; ``beamvq.tuning``) predicts the best Adam
learning rate at any batch size from one tuned pair ``(B0, lr0)`` and the noise scale ``B_noise``:
``lr(B) = lr_max / (1/2 (sqrt(B_noise / B) + sqrt(B / B_noise)))``. This script checks it on the
quickstart problem at toy size:

- data: 2-D Navier–Stokes vorticity (``beamvq.datamodules.netcdf.NetCDFDataModule`` + ``NavierStokesGenerator``: 24
  trajectories of 20 frames at ``--resolution``², generated once into ``--data``), 5 frames in,
  5 out;
- model: ``beamvq.module.ForecastModule`` with a small U-Net (base width 8, depth 2), no VQ
  bottleneck (the question is about the optimizer), AdamW with a constant learning rate;
- budget (``--budget``): ``steps`` gives every batch size the same number of optimizer steps
  (``--steps``), the setting of the rule's per-step derivation; ``samples`` gives every run the
  same number of training samples (``--samples``), so a batch of B takes ``samples / B`` steps;
- score: validation MSE (normalized units) after training; for every batch size a log-spaced
  learning-rate sweep (``--lrs``), the best is its argmin (a factor-2 grid, so agreement means
  within one grid step, ``|log2(best / predicted)| <= 1``);
- ``B_noise``: the simple noise scale tr(Σ)/|G|² (McCandlish et al. 2018) at the *end* of the best
  run at the reference batch ``B0`` (the middle of ``--batch-sizes``), from ``--noise-batches``
  measurements of ``beamvq.tuning.NoiseScaleMonitor.measure`` (ratio of the averaged estimates:
  single-batch estimates of |G|² scatter by several times their mean, so it takes ~100 batches
  to pin the ratio within tens of percent), unless ``--b-noise`` is given. The noise scale grows as training proceeds (and the Surge peak
  with it), so the end-of-run value is what the later, decisive part of a run sees; the running
  EMA the monitor logs during training lags behind it.
- the rule transfers ``(B0, lr0)`` to the other sizes; square-root (``lr0 sqrt(B / B0)``) and
  linear (``lr0 B / B0``) scaling are printed beside it.

The default (3 batch sizes × 6 learning rates at 32², 64 steps, one thread) takes a few minutes on
one CPU core. The argmin of one sweep is noisy; ``--seeds`` averages validation losses over seeds.

Usage: ``python benchmarks/lr_batch.py [--budget steps|samples] [--batch-sizes 4 16 64]
[--lrs 1e-3 ...] [--seeds 2]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch

from beamvq.backbones.unet import UNet
from beamvq.datamodules.config import LoaderConfig, SplitConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import NavierStokesGenerator
from beamvq.module import ForecastModule
from beamvq.optim import LRSchedule
from beamvq.tuning import NoiseScaleMonitor, lr_for_batch


class RunResult(NamedTuple):
    val_mse: float
    module: ForecastModule
    datamodule: NetCDFDataModule


def measure_noise_scale(module: ForecastModule, dm: NetCDFDataModule, n_batches: int) -> float:
    """tr(Σ)/|G|² at the module's current weights: ratio of averaged single-batch estimates."""
    monitor = NoiseScaleMonitor()
    module.train()
    grad_sq, trace_cov, done = 0.0, 0.0, 0
    while done < n_batches:
        for batch in dm.train_dataloader():
            if done == n_batches:
                break
            if batch.x.shape[0] < 2:
                continue
            estimate = monitor.measure(module, batch)
            grad_sq += estimate.grad_sq
            trace_cov += estimate.trace_cov
            done += 1
    return trace_cov / grad_sq if grad_sq > 0 else math.nan


def train_once(
    data_path: Path,
    resolution: int,
    batch_size: int,
    lr: float,
    steps: int,
    seed: int,
) -> RunResult:
    """Train one model for ``steps`` steps and return its validation MSE."""
    pl.seed_everything(seed, verbose=False)
    dm = NetCDFDataModule(
        path=str(data_path),
        variables=["vorticity"],
        loader=LoaderConfig(batch_size=batch_size),
        splits=SplitConfig(seed=0),
        generator=NavierStokesGenerator(
            n_trajectories=24, resolution=resolution, n_frames=20, seed=0
        ),
    )
    module = ForecastModule(
        backbone=UNet(5, 5, 1, 1, base_width=8, depth=2, norm_groups=4),
        bottleneck=None,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        lr_schedule=LRSchedule(scheduler="none"),
    )
    quiet = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, **quiet)
    trainer.fit(module, datamodule=dm)
    # a second trainer, since the first has validation switched off
    metrics = pl.Trainer(**quiet).validate(module, datamodule=dm, verbose=False)[0]
    return RunResult(float(metrics["val/mse"]), module, dm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs=3, default=[4, 16, 64])
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    )
    parser.add_argument("--budget", choices=("steps", "samples"), default="steps")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run (steps)")
    parser.add_argument("--samples", type=int, default=1024, help="samples per run (samples)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--noise-batches", type=int, default=128)
    parser.add_argument("--b-noise", type=float, default=None, help="skip the measurement")
    parser.add_argument(
        "--data", type=Path, default=None, help="NetCDF file (generated if missing)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (tiny models gain nothing)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("beamvq.datamodules").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is an instance of `nn.Module` and is already saved.*")
    tmp = tempfile.TemporaryDirectory()
    data = args.data or Path(tmp.name) / f"navier_stokes_{args.resolution}.nc"

    b0 = args.batch_sizes[1]
    losses = np.full((3, len(args.lrs)), np.nan)
    reference_runs: list[RunResult] = []  # seed-0 runs at B0, for the noise measurement
    for i, batch in enumerate(args.batch_sizes):
        steps = args.steps if args.budget == "steps" else max(1, args.samples // batch)
        for j, lr in enumerate(args.lrs):
            runs = [
                train_once(data, args.resolution, batch, lr, steps, seed)
                for seed in range(args.seeds)
            ]
            losses[i, j] = np.mean([r.val_mse for r in runs])
            if batch == b0:
                reference_runs.append(runs[0])
            print(f"  B={batch:<4d} lr={lr:<8.3g} steps={steps:<5d} val MSE {losses[i, j]:.4g}")

    best = [int(np.nanargmin(row)) for row in losses]
    lr0 = args.lrs[best[1]]
    if args.b_noise is None:
        ref = reference_runs[best[1]]
        b_noise = measure_noise_scale(ref.module, ref.datamodule, args.noise_batches)
        source = f"measured at the end of the best B0 run, {args.noise_batches} batches"
    else:
        b_noise, source = args.b_noise, "given"
    print(f"\nbudget: {args.budget}; reference B0={b0}, lr0={lr0:.3g}")
    print(f"B_noise = {b_noise:.3g} ({source})")
    header = (
        f"{'B':>5} {'best lr':>9} {'val MSE':>9} {'Surge lr':>9} {'sqrt lr':>9} {'linear lr':>9}"
    )
    print(f"{header} {'log2(best/Surge)':>17}")
    for i, batch in enumerate(args.batch_sizes):
        best_lr = args.lrs[best[i]]
        surge = lr_for_batch(batch, b0, lr0, b_noise) if b_noise > 0 else math.nan
        print(
            f"{batch:>5d} {best_lr:>9.3g} {losses[i, best[i]]:>9.4g} {surge:>9.3g} "
            f"{lr0 * math.sqrt(batch / b0):>9.3g} {lr0 * batch / b0:>9.3g} "
            f"{math.log2(best_lr / surge):>17.2f}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
