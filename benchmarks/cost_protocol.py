"""The objects of the earlier (under-trained) gain protocol, built in Python: for COST benchmarks only.

``benchmarks/overhead.py`` times the product's pieces (Lightning vs a bare loop, the search
against an epoch, batched vs looped search) on these objects. Skill figures never come from here:
every "does BeamVQ help" number is a ``beamvq test`` metric of a ``beamvq fit``, run by
``benchmarks/experiment.py`` from ``configs/experiments/`` (the earlier ``beamvq_gain.py``, which
trained and evaluated outside the CLI, was retired; its table is history in docs/results.md §1).

Setting: generated Navier-Stokes vorticity (nu = 1e-3) or storm cells, 32x32, 10 frames in ->
2 x 5 out, 64/16/32 trajectories of 24 frames, the backbones' quickstart sizes
(``configs/backbones/<name>.yaml``), a 512-code bottleneck, the callback's search settings.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser

from beamvq import metrics
from beamvq.backbones import backbone_class
from beamvq.backbones.base import Backbone
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.search_inputs import SearchInputs
from beamvq.datamodules.config import LoaderConfig, PoolConfig, SplitConfig, WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.storm import StormGenerator
from beamvq.datamodules.synthetic import NavierStokesGenerator
from beamvq.module import ForecastModule, LossConfig
from beamvq.selftrain import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "backbones"
THRESHOLDS = (16.0, 74.0, 133.0, 160.0, 181.0, 219.0)
# generator seeds of the benchmark files (used nowhere else, so no test set leaks into a config)
GEN_SEED = {"ns": 7, "storm": 11}


# -- protocol ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """Everything that defines one training (all of it written into each result row)."""

    resolution: int = 32
    n_train: int = 64
    n_val: int = 16
    n_test: int = 32
    n_frames: int = 24
    in_steps: int = 10
    out_steps: int = 5
    rollout_steps: int = 2
    epochs: int = 8
    batch_size: int = 16
    train_batches: int = 8  # per epoch (128 of the 320 training windows, reshuffled each epoch)
    lr: float = 2e-3
    codebook_size: int = 512
    commitment_weight: float = 0.02
    candidate_k: int = 4
    candidate_loss_weight: float = 0.1
    # BeamVQ self-training
    start_epoch: int = 4
    every_n_epochs: int = 1
    max_windows: int = 32
    beam_width: int = 4
    top_k: int = 2
    ensemble: str = "mean"
    temperature: float = 1.0
    only_improving: bool = True
    pool_capacity: int = 256
    pool_weight: float = 0.5
    scorer: str = "default"  # ns: negmse, storm: csi
    unlabelled_windows: int = 0
    # "continuous": VQBottleneck(forecast_path="continuous"), beamvq's improved bottleneck;
    # "quantized": the papers' (the forecast decodes the nearest code)
    vq_path: str = "continuous"

    def label(self, base: Protocol) -> str:
        """The fields that differ from ``base``, e.g. ``beam_width=1 top_k=1``."""
        diff = {k: v for k, v in asdict(self).items() if asdict(base)[k] != v}
        return " ".join(f"{k}={v}" for k, v in diff.items()) or "default"


# -- data --------------------------------------------------------------------------------------
def data_path(data_dir: Path, dataset: str, p: Protocol) -> Path:
    n = p.n_train + p.n_val + p.n_test
    return data_dir / f"{dataset}_{p.resolution}_{n}x{p.n_frames}_s{GEN_SEED[dataset]}.nc"


def datamodule(data_dir: Path, dataset: str, p: Protocol) -> NetCDFDataModule:
    """A fresh datamodule (so each run has its own empty pool) over the dataset's one file.

    ``splits.fractions`` are the trajectory counts: 64/16/32 of 112 round to exactly those numbers,
    and the fixed ``seed=0`` shuffle gives the same trajectories to every run.
    """
    n = p.n_train + p.n_val + p.n_test
    if dataset == "ns":
        gen: Any = NavierStokesGenerator(
            n_trajectories=n, resolution=p.resolution, n_frames=p.n_frames, viscosity=1e-3,
            seed=GEN_SEED["ns"],
        )  # fmt: skip
        variable = "vorticity"
    else:
        gen = StormGenerator(
            n_trajectories=n, n_frames=p.n_frames, height=p.resolution, width=p.resolution,
            seed=GEN_SEED["storm"],
        )  # fmt: skip
        variable = "vil"
    return NetCDFDataModule(
        path=str(data_path(data_dir, dataset, p)),
        variables=[variable],
        windows=WindowConfig(p.in_steps, p.out_steps, p.rollout_steps),
        splits=SplitConfig(fractions=(p.n_train, p.n_val, p.n_test), seed=0),
        loader=LoaderConfig(batch_size=p.batch_size),
        pool=PoolConfig(capacity=p.pool_capacity, policy="oldest", weight=p.pool_weight),
        generator=gen,
    )


# -- model -------------------------------------------------------------------------------------
def build_backbone(name: str, p: Protocol) -> Backbone:
    """``configs/backbones/<name>.yaml`` (the quickstart size) with the protocol's shapes.

    Built by jsonargparse as LightningCLI builds ``model.backbone``; only steps, channels and the
    grid (for the backbones whose YAML fixes one) are overridden.
    """
    path = CONFIG_DIR / f"{name}.yaml"
    section = yaml.safe_load(path.read_text())["model"]["backbone"]
    args = dict(section.get("init_args") or {})
    args.update(in_steps=p.in_steps, out_steps=p.out_steps, in_channels=1, out_channels=1)
    args.update(backbone_class(section["class_path"]).grid_kwargs(p.resolution, p.resolution))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Backbone, "backbone", required=True)
    cfg = parser.parse_object(
        {"backbone": {"class_path": section["class_path"], "init_args": args}}
    )
    return parser.instantiate(cfg).backbone


def make_scorer(dataset: str, p: Protocol) -> metrics.Scorer:
    name = p.scorer if p.scorer != "default" else ("negmse" if dataset == "ns" else "csi")
    if name == "negmse":
        return metrics.NegMSEScorer()
    if name == "csi":
        return metrics.CSIScorer(list(THRESHOLDS))
    if name == "ssim":
        # the data's range: VIL 0-255; the ns files' vorticity spans about -1.84 .. 1.84
        return metrics.SSIMScorer(data_range=255.0 if dataset == "storm" else 3.7)
    if name == "negmse+spectrum":
        return metrics.WeightedScorer(
            [metrics.NegMSEScorer(), metrics.SpectrumScorer(from_vorticity=dataset == "ns")],
            [1.0, 0.002],
        )
    raise ValueError(f"unknown scorer {name!r} (negmse, csi, ssim, negmse+spectrum)")


def make_module(backbone: Backbone, arm: str, p: Protocol) -> ForecastModule:
    vq = arm in ("vq", "beamvq")
    if p.vq_path not in ("quantized", "continuous"):
        raise ValueError(f"vq_path must be 'quantized' or 'continuous', got {p.vq_path!r}")
    return ForecastModule(
        backbone=backbone,
        bottleneck=(
            functools.partial(
                VQBottleneck,
                codebook_size=p.codebook_size,
                forecast_path=p.vq_path,
                decay=0.99,
                commitment_weight=p.commitment_weight,
            )
            if vq
            else None
        ),
        rollout_steps=p.rollout_steps,
        candidate_k=p.candidate_k,
        loss=LossConfig(rollout="full", candidate_weight=p.candidate_loss_weight if vq else 0.0),
        optimizer=functools.partial(torch.optim.AdamW, lr=p.lr, weight_decay=0.0),
    )


def make_callback(dataset: str, p: Protocol, seed: int) -> BeamSearchAugmentation:
    free = None
    if p.unlabelled_windows:
        free = metrics.WeightedScorer(
            [
                metrics.SpectrumScorer(from_vorticity=dataset == "ns"),
                metrics.TKEScorer(from_vorticity=dataset == "ns"),
            ],
            [1.0, 10.0],
        )
    return BeamSearchAugmentation(
        scorer=make_scorer(dataset, p),
        every_n_epochs=p.every_n_epochs,
        start_epoch=p.start_epoch,
        inputs=SearchInputs(windows=p.max_windows, unlabelled=p.unlabelled_windows),
        search=SearchConfig(
            beam_width=p.beam_width,
            top_k=p.top_k,
            ensemble=p.ensemble,
            temperature=p.temperature,
            only_improving=p.only_improving,
        ),
        unlabelled_scorer=free,
        search_batch_size=16,
        seed=seed,
    )
