"""Precision/offload benchmark on the quickstart model (docs/precision.md quotes its output).

For each precision config of ``configs/precision/`` (plus the fp32 reference and the
registered ``fp8_offload`` defaults) it builds the quickstart model (SimVP-v2 + VQ bottleneck,
Navier-Stokes vorticity) from the same seed, converts it with the config's
:class:`beamvq.quant.QuantPrecision` plugin exactly as the Lightning strategy does
(``convert_module``, then every step inside ``train_step_context``), trains it for a fixed
number of steps on the same batches, and prints

* the median training-step time (forward, backward, AdamW step) relative to fp32,
* the validation loss after those steps relative to fp32,
* the saved-activation bytes left on the device during the step relative to no offload (the
  plugin's saved-tensor counters: activations only, parameters excluded) and the bytes moved,
* with CUDA: the peak CUDA memory of one step relative to fp32; FP8 is real (torchao) where the
  GPU and torchao allow it.

Configs take turns step by step, so a machine whose load drifts slows all of them alike. The
fp32 reference runs the plugin with quantization and offload off, so every row carries the same
counting hooks.

    python benchmarks/precision.py                 # quickstart data (64x64, written once)
    python benchmarks/precision.py --quick         # 32x32, 8 trajectories: a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.utilities.apply_func import move_data_to_device

from beamvq.cli import BeamVQCLI
from beamvq.module import ForecastModule
from beamvq.quant import QuantConfig, QuantPrecision

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PRECISION = ROOT / "configs" / "precision"


def _yaml_args(name: str) -> dict[str, Any]:
    cfg = yaml.safe_load((PRECISION / name).read_text())
    return dict(cfg["trainer"]["strategy"].get("init_args", {}).get("quant", {}))


# (row name, QuantConfig fields); the first row is the reference
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {"backend": "none", "offload_alpha": None}),
    ("fp8_e4m3_sim", _yaml_args("fp8_e4m3_sim.yaml")),
    ("e2m1_block32_sim", _yaml_args("e2m1_block32_sim.yaml")),
    ("fp8_torchao", _yaml_args("fp8_torchao.yaml")),
    ("offload_half", _yaml_args("offload_half.yaml")),
    ("fp8_offload (defaults)", {}),
]


class Run:
    """One config: its converted model copy, optimizer, plugin and measurements."""

    def __init__(
        self, name: str, kwargs: dict[str, Any], base: ForecastModule, device: torch.device
    ) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.plugin = QuantPrecision(QuantConfig(**kwargs))
        self.plugin.device = device
        self.plugin.convert_module(self.model)
        self.model.to(device).train()
        # the configured rate (the CLI stores model.optimizer as its class path and init args)
        lr = base.hparams["optimizer"]["init_args"]["lr"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.times: list[float] = []
        self.peak: int | None = None

    def step(self, batch: Any, device: torch.device) -> float:
        m = self.model
        _sync(device)
        start = time.perf_counter()
        with self.plugin.train_step_context():
            loss, _, _ = m.compute_loss(
                m.normalize(batch.x), m.normalize(batch.y), batch.weight, True
            )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    @torch.no_grad()
    def val_loss(self, batches: list[Any]) -> float:
        m = self.model.eval()
        losses = [
            m.compute_loss(m.normalize(b.x), m.normalize(b.y), b.weight, False)[0].item()
            for b in batches
        ]
        m.train()
        return sum(losses) / len(losses)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row(NamedTuple):
    name: str
    backend: str
    layers: int
    step_s: float
    val_loss: float
    device_bytes: int
    moved_bytes: int
    peak_cuda: int | None


def build(args: argparse.Namespace, data: str) -> tuple[ForecastModule, pl.LightningDataModule]:
    overrides = [
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--data.init_args.path={data}",
    ]
    if args.quick:
        overrides += [
            "--data.init_args.generator.init_args.n_trajectories=8",
            "--data.init_args.generator.init_args.resolution=32",
            "--data.init_args.generator.init_args.n_frames=12",
        ]
    cli = BeamVQCLI(
        ForecastModule,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        save_config_callback=None,
        seed_everything_default=0,
        run=False,
        args=["--config", str(QUICKSTART), *overrides],
    )
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    cli.model.set_normalization(dm.normalization.mean, dm.normalization.std)
    return cli.model, dm


def run(args: argparse.Namespace) -> list[Row]:
    data = args.data or str(
        Path(tempfile.gettempdir()) / ("beamvq_ns32.nc" if args.quick else "beamvq_ns64.nc")
    )
    base, dm = build(args, data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, val = [], []
    while len(train) < args.steps:
        train += [move_data_to_device(b, device) for b in dm.train_dataloader()]
    val = [
        move_data_to_device(b, device) for _, b in zip(range(args.val_batches), dm.val_dataloader())
    ]
    configs = [(n, kw) for n, kw in CONFIGS if args.only is None or n == "fp32" or n in args.only]
    runs = [Run(name, kwargs, base, device) for name, kwargs in configs]
    for i in range(args.steps):
        for r in runs:
            # the same random stream for every config (VQ code bank, dropout)
            torch.manual_seed(i)
            elapsed = r.step(train[i], device)
            if i >= args.warmup:
                r.times.append(elapsed)
    rows = []
    for r in runs:
        stats = r.plugin.stats  # counters of its last training step
        if device.type == "cuda":
            # one more step on its own: the peak this config adds above its resident state
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            r.step(train[0], device)
            r.peak = torch.cuda.max_memory_allocated(device) - resident
        report = r.plugin.report
        rows.append(
            Row(
                r.name,
                report.backend,
                len(report.converted),
                statistics.median(r.times),
                r.val_loss(val),
                stats.kept_bytes,
                stats.offloaded_bytes,
                r.peak,
            )
        )
    return rows


def format_rows(rows: list[Row]) -> str:
    ref = rows[0]
    mib = 2.0**20
    head = (
        f"{'config':<23} {'backend':<36} {'layers':>6} {'step ms':>8} {'x fp32':>7} "
        f"{'val loss':>9} {'x fp32':>7} {'act MiB':>8} {'x no-off':>8} {'moved MiB':>9}"
    )
    if ref.peak_cuda is not None:
        head += f" {'peak MiB':>9} {'x fp32':>7}"
    lines = [head]
    for r in rows:
        line = (
            f"{r.name:<23} {r.backend:<36} {r.layers:>6} {1e3 * r.step_s:8.1f} "
            f"{r.step_s / ref.step_s:7.2f} {r.val_loss:9.4f} {r.val_loss / ref.val_loss:7.3f} "
            f"{r.device_bytes / mib:8.1f} {r.device_bytes / ref.device_bytes:8.3f} "
            f"{r.moved_bytes / mib:9.1f}"
        )
        if r.peak_cuda is not None and ref.peak_cuda is not None:
            line += f" {r.peak_cuda / mib:9.1f} {r.peak_cuda / ref.peak_cuda:7.3f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per config")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--quick", action="store_true", help="32x32, 8 trajectories, 12 frames")
    parser.add_argument("--data", type=str, default=None, help="NetCDF path (written if missing)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (fp32 always)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = run(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "32x32 (--quick)" if args.quick else "64x64"
    print(f"quickstart {size}, {args.steps} steps, median step time after {args.warmup}, {device}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
