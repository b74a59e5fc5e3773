"""Does BeamVQ help? Backbone alone vs backbone + VQ bottleneck + BeamVQ self-training.

The claims under test (BeamVQ, arXiv 2405.17051 and 2502.18925; ../shared/PAPERS.md §1): MSE down
by up to 39 %, and more than 32 % average skill gain over ten backbones, largest at long leads,
in the data-scarce regime. This script measures it on a laptop CPU, on two generated datasets:

- **ns**: 2-D Navier-Stokes vorticity (FNO recipe, nu = 1e-3, ``beamvq.datamodules.synthetic``), 32x32
  (or ``--resolution``);
- **storm**: moving storm cells on the SEVIR VIL scale 0-255 (``beamvq.datamodules.storm``), same grid.

Protocol (every number is a flag; the defaults are the documented protocol, docs/results.md):

- windows of 10 input frames -> 10 output frames as ``rollout_steps`` 2 x ``out_steps`` 5, loss
  over the whole rollout; one NetCDF file per dataset with 64 + 16 + 32 trajectories of 24 frames
  (5 windows each), split by trajectory with the datamodule's fixed ``seed=0``: the same 64
  training, 16 validation and 32 test trajectories for every backbone, arm and seed (generator
  seeds: ns 7, storm 11, never used elsewhere). Data-scarce: 64 training trajectories.
- each (backbone, dataset, seed) trains two arms with the same seed (same backbone weights at
  start: the bottleneck is built after the backbone), epochs, learning rate, batch size and
  batches per epoch:

  - ``base``: the backbone alone, MSE loss;
  - ``beamvq``: backbone + VQ bottleneck (512 codes, EMA 0.99) + candidate loss
    (weight 0.1, K = 4) + ``BeamSearchAugmentation`` from ``--start-epoch`` on, every epoch:
    32 training windows beam-searched (beam 4, K 4, top-2 mean self-ensemble, only when it beats
    the plain forecast), scored by -MSE (ns) or CSI over the SEVIR thresholds (storm); pool of 256
    at loss weight 0.5.
  - ``vq`` (``--arms``): the bottleneck and candidate loss without augmentation, to tell the two
    apart (PAPERS.md: "measure it separately").

  The bottleneck: by default beamvq's improved one, ``VQBottleneck(forecast_path="continuous")``
  at commitment 0.02 (the forecast decodes the continuous latent; the code bank gives the K
  alternatives), which the ablation in docs/results.md points to. ``--vq-path quantized
  --commitment 0.25`` is the papers' bottleneck (the forecast decodes the nearest code); reports
  show those arms as ``vq-paper`` / ``beamvq-paper``.

- evaluation: the final weights (no checkpoint selection) on the test trajectories, physical
  units: MSE and relative L2 per lead time (relative L2 = ||pred - y|| / ||y|| per sample and
  lead, averaged over samples); storms: CSI pooled over the set at 16/74/133/160/181/219 and
  CSI-M; ns: mean |div u| by centred differences of the velocity recovered from the predicted
  vorticity (the defect a second-order scheme sees; 0 for a spectral divergence) and the
  spectrum error, mean over leads and shells 1..H/2 of |log E_pred(k) - log E_true(k)|.
  The validation set is scored too; ablations are judged on it, never on test.

Usage::

    python benchmarks/beamvq_gain.py --quick                 # one backbone, one seed, minutes
    python benchmarks/beamvq_gain.py --backbones fno,unet --seeds 0,1,2 --results runs/gain.jsonl
    python benchmarks/beamvq_gain.py --report runs/gain.jsonl  # tables from saved results only
    python benchmarks/beamvq_gain.py --ablation --backbones simvp --datasets ns

Results append to ``--results`` (JSON lines, one per training), so a split run (``--backbones``)
merges by pointing ``--report`` at the files. One torch thread by default (``--threads``): on
shared cores OpenMP threads wait for each other (see benchmarks/backbones.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor

from beamvq import metrics
from beamvq.backbones import REGISTRY, backbone_class
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
DATASETS = ("ns", "storm")
ARMS = ("base", "vq", "beamvq")
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


# -- evaluation --------------------------------------------------------------------------------
def spectrum_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per sample: mean over leads and shells 1..min(H, W)//2 of |log E_pred - log E_true|."""
    vp = metrics.velocity_from_vorticity(pred[:, :, 0].double())
    vt = metrics.velocity_from_vorticity(target[:, :, 0].double())
    kmax = min(pred.shape[-2:]) // 2
    ep = metrics.energy_spectrum(vp.u, vp.v)[..., 1 : kmax + 1]
    et = metrics.energy_spectrum(vt.u, vt.v)[..., 1 : kmax + 1]
    floor = 1e-12
    return (ep.clamp_min(floor).log() - et.clamp_min(floor).log()).abs().mean(dim=(1, 2))


def abs_divergence(field: Tensor) -> Tensor:
    """Per sample: mean |div u| (centred differences) of the velocity of a vorticity field."""
    vel = metrics.velocity_from_vorticity(field[:, :, 0].double())
    return metrics.divergence_fd(vel.u, vel.v).abs().mean(dim=(1, 2, 3))


@torch.no_grad()
def evaluate(module: ForecastModule, dm: NetCDFDataModule, split: str, dataset: str) -> dict:
    """Test metrics of the module's deterministic rollout on ``split`` (physical units)."""
    module.eval()
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    sq, rel, n = None, None, 0
    counts = None
    div_p = div_t = spec = 0.0
    for batch in loader:
        pred = module(batch.x)
        y = batch.y
        err = (pred - y).square().flatten(2).mean(2)  # (B, T)
        rel_b = (pred - y).flatten(2).norm(dim=2) / y.flatten(2).norm(dim=2).clamp_min(1e-12)
        sq = err.sum(0) if sq is None else sq + err.sum(0)
        rel = rel_b.sum(0) if rel is None else rel + rel_b.sum(0)
        n += y.shape[0]
        if dataset == "storm":
            c = metrics.contingency_counts(pred, y, THRESHOLDS, per_lead=True)
            counts = (
                c if counts is None else metrics.Contingency(*(a + b for a, b in zip(counts, c)))
            )
        else:
            div_p += float(abs_divergence(pred).sum())
            div_t += float(abs_divergence(y).sum())
            spec += float(spectrum_error(pred, y).sum())
    assert sq is not None and rel is not None
    mse_lead, rel_lead = (sq / n).tolist(), (rel / n).tolist()
    out: dict[str, Any] = {
        "mse": float(np.mean(mse_lead)),
        "rel_l2": float(np.mean(rel_lead)),
        "mse_lead": mse_lead,
        "rel_l2_lead": rel_lead,
    }
    if counts is not None:
        pooled = metrics.Contingency(*(f.sum(0) for f in counts))
        csi = metrics.csi(pooled).tolist()
        out["csi"] = dict(zip([f"{t:g}" for t in THRESHOLDS], csi))
        out["csi_m"] = float(metrics.csi_m(pooled))
        out["csi_m_lead"] = metrics.csi_m(counts).tolist()
    else:
        out["div"] = div_p / n
        out["div_truth"] = div_t / n
        out["spectrum_err"] = spec / n
    return out


# -- one training ------------------------------------------------------------------------------
@dataclass
class RunResult:
    backbone: str
    dataset: str
    arm: str
    seed: int
    protocol: dict
    train_seconds: float
    test: dict
    val: dict
    augment: list = field(default_factory=list)


def train_one(
    backbone: str, dataset: str, arm: str, seed: int, p: Protocol, data_dir: Path,
    module_hook: Callable[[ForecastModule], None] | None = None,
    callback_factory: Callable[[str, Protocol, int], pl.Callback] | None = None,
) -> RunResult:  # fmt: skip
    """Train one arm with one seed and evaluate it on validation and test."""
    dm = datamodule(data_dir, dataset, p)
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(seed, workers=True, verbose=False)
    module = make_module(build_backbone(backbone, p), arm, p)
    if module_hook is not None:
        module_hook(module)
    callbacks: list[pl.Callback] = []
    if arm == "beamvq":
        callbacks.append((callback_factory or make_callback)(dataset, p, seed))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=p.epochs,
        limit_train_batches=p.train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        precision="32-true",
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    augment = []
    for cb in callbacks:
        for rec in getattr(cb, "history", []):
            augment.append({k: (v if math.isfinite(v) else None) for k, v in rec._asdict().items()})
    return RunResult(
        backbone=backbone,
        dataset=dataset,
        arm=arm,
        seed=seed,
        protocol=asdict(p),
        train_seconds=seconds,
        test=evaluate(module, dm, "test", dataset),
        val=evaluate(module, dm, "val", dataset),
        augment=augment,
    )


# -- tables ------------------------------------------------------------------------------------
def load_results(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ± {fmt(statistics.stdev(values))}"


def fmt(v: float) -> str:
    if v == 0 or 1e-2 <= abs(v) < 1e4:
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def rel_change(b: Sequence[float], a: Sequence[float]) -> str:
    """Relative change of the means of b against a, in %."""
    if not a or not b:
        return "-"
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    return f"{100 * (mb - ma) / abs(ma):+.1f}%" if ma else "-"


def pick(row: dict, key: str, split: str = "test") -> float:
    value: Any = row[split]
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else value[int(part)]
    return float(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


REPORT_ARMS = ("base", "vq-paper", "beamvq-paper", "vq", "beamvq")
# the protocol fields a base-arm training depends on
BASE_FIELDS = (
    "resolution", "n_train", "n_val", "n_test", "n_frames", "in_steps", "out_steps",
    "rollout_steps", "epochs", "batch_size", "train_batches", "lr",
)  # fmt: skip


def arm_label(row: dict) -> str:
    """``vq``/``beamvq`` with the improved bottleneck; ``-paper`` with the papers' quantized one
    (rows written before the option existed have no ``vq_path``: they ran the papers')."""
    if row["arm"] != "base" and row["protocol"].get("vq_path", "quantized") == "quantized":
        return f"{row['arm']}-paper"
    return row["arm"]


def grouped(rows: list[dict], label: str | None = None) -> dict[tuple, list[dict]]:
    """Rows by (dataset, backbone, label, arm label); a training found in several files (same
    arm, seed and protocol: the base arm is shared by both bottlenecks) counts once."""
    out: dict[tuple, list[dict]] = {}
    seen: set[str] = set()
    for r in rows:
        lab = r.get("label", label or "default")
        proto = r["protocol"]
        if r["arm"] == "base":  # the bottleneck and search settings do not touch it
            proto = {k: v for k, v in proto.items() if k in BASE_FIELDS}
        ident = json.dumps([r["dataset"], r["backbone"], lab, r["arm"], r["seed"], proto])
        if ident in seen:
            continue
        seen.add(ident)
        out.setdefault((r["dataset"], r["backbone"], lab, arm_label(r)), []).append(r)
    return out


def metric_keys(dataset: str, horizon: int) -> list[tuple[str, str]]:
    keys = [("MSE", "mse"), ("rel L2", "rel_l2")]
    if dataset == "storm":
        keys += [("CSI-M", "csi_m"), ("CSI-74", "csi.74"), ("CSI-181", "csi.181")]
    else:
        keys += [("spectrum err", "spectrum_err"), ("mean abs div", "div")]
    keys += [(f"MSE lead {horizon}", f"mse_lead.{horizon - 1}")]
    return keys


def report(rows: list[dict], split: str = "test") -> str:
    """Markdown: per dataset, one row per backbone, base vs beamvq (and vq) with the change."""
    out = []
    groups = grouped(rows)
    datasets = [d for d in DATASETS if any(k[0] == d for k in groups)]
    for ds in datasets:
        horizon = len(next(r for r in rows if r["dataset"] == ds)[split]["mse_lead"])
        keys = metric_keys(ds, horizon)
        arms = [a for a in REPORT_ARMS if any(k[0] == ds and k[3] == a for k in groups)]
        backbones = [b for b in REGISTRY if any(k[0] == ds and k[1] == b for k in groups)]
        header = ["backbone", "seeds"]
        for title, _ in keys:
            for arm in arms:
                header.append(f"{title} {arm}")
            for arm in arms:
                if arm != "base" and "base" in arms:
                    header.append(f"Δ {arm}")
        table = []
        changes: dict[tuple[str, str], list[float]] = {}
        for bb in backbones:
            runs = {a: groups.get((ds, bb, "default", a), []) for a in arms}
            seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
            line = [bb, ",".join(map(str, seeds))]
            for _, key in keys:
                vals = {a: {r["seed"]: pick(r, key, split) for r in rs} for a, rs in runs.items()}
                for arm in arms:
                    line.append(mean_std(list(vals[arm].values())))
                for arm in arms:
                    if arm != "base" and "base" in arms:
                        # paired: against base on the seeds this arm ran
                        common = sorted(set(vals[arm]) & set(vals["base"]))
                        a_ = [vals[arm][s_] for s_ in common]
                        b_ = [vals["base"][s_] for s_ in common]
                        line.append(rel_change(a_, b_))
                        if common:
                            ma, mb = statistics.fmean(b_), statistics.fmean(a_)
                            if ma:
                                changes.setdefault((key, arm), []).append((mb - ma) / abs(ma))
            table.append(line)
        out.append(
            f"### {ds}: {split} set, mean ± std over seeds (changes: against base on the same "
            "seeds)\n"
        )
        out.append(markdown(header, table))
        if changes:
            avg = [
                f"{k} {arm}: {100 * statistics.fmean(v):+.1f}% (over {len(v)} backbones)"
                for (k, arm), v in changes.items()
            ]
            out.append("\nAverage relative change vs base: " + "; ".join(avg))
        lead_rows = []
        for bb in backbones:
            for arm in arms:
                rs = groups.get((ds, bb, "default", arm), [])
                if rs:
                    leads = np.mean([r[split]["mse_lead"] for r in rs], axis=0)
                    rels = np.mean([r[split]["rel_l2_lead"] for r in rs], axis=0)
                    lead_rows.append(
                        [
                            bb,
                            arm,
                            " / ".join(fmt(v) for v in leads),
                            " / ".join(f"{v:.3f}" for v in rels),
                        ]
                    )
        out.append(f"\n{ds}: per lead time (1..{horizon}), mean over seeds\n")
        out.append(markdown(["backbone", "arm", "MSE per lead", "rel L2 per lead"], lead_rows))
        secs = [r["train_seconds"] for k, rs in groups.items() if k[0] == ds for r in rs]
        out.append(f"\nTraining time per run: mean {statistics.fmean(secs):.1f} s, "
                   f"max {max(secs):.1f} s ({len(secs)} runs).\n")  # fmt: skip
    return "\n".join(out)


# the headline metrics of the summary: (dataset, key, title, higher is better)
SUMMARY_METRICS = (
    ("ns", "mse", "ns MSE", False),
    ("ns", "mse_lead.-1", "ns MSE last lead", False),
    ("storm", "csi_m", "storm CSI-M", True),
    ("storm", "mse", "storm MSE", False),
)


def summary(rows: list[dict], split: str = "test") -> str:
    """One line per backbone: the relative change of each arm against base on the headline
    metrics, with the number of seeds in which the arm did better than base (paired by seed)."""
    groups = grouped(rows)
    arms = [a for a in REPORT_ARMS[1:] if any(k[3] == a for k in groups)]
    metrics_ = [m for m in SUMMARY_METRICS if any(k[0] == m[0] for k in groups)]
    header = ["backbone"] + [f"{title} Δ {arm}" for _, _, title, _ in metrics_ for arm in arms]
    table = []
    means: dict[str, list[float]] = {}
    for bb in REGISTRY:
        line, any_value = [bb], False
        for ds, key, title, higher in metrics_:
            base = {
                r["seed"]: pick(r, key, split) for r in groups.get((ds, bb, "default", "base"), [])
            }
            for arm in arms:
                runs = {
                    r["seed"]: pick(r, key, split) for r in groups.get((ds, bb, "default", arm), [])
                }
                seeds = sorted(set(base) & set(runs))
                if not seeds:
                    line.append("-")
                    continue
                any_value = True
                b = statistics.fmean(base[s_] for s_ in seeds)
                a = statistics.fmean(runs[s_] for s_ in seeds)
                change = (a - b) / abs(b) if b else float("nan")
                wins = sum((runs[s_] > base[s_]) == higher and runs[s_] != base[s_] for s_ in seeds)
                line.append(f"{100 * change:+.1f}% ({wins}/{len(seeds)})")
                means.setdefault(f"{title} Δ {arm}", []).append(change)
        if any_value:
            table.append(line)
    avg = ["mean"] + [
        f"{100 * statistics.fmean(means[h]):+.1f}%" if means.get(h) else "-" for h in header[1:]
    ]
    med = ["median"] + [
        f"{100 * statistics.median(means[h]):+.1f}%" if means.get(h) else "-" for h in header[1:]
    ]
    note = (
        "Relative change of the arm's mean against base's over the seeds both ran; in brackets the"
        " seeds in which the arm beat base (lower MSE, higher CSI)."
    )
    return f"### Summary ({split} set)\n\n{note}\n\n" + markdown(header, [*table, avg, med])


def ablation_report(rows: list[dict]) -> str:
    """One row per ablation setting: val and test MSE (and CSI-M) vs the base arm."""
    out = []
    pairs = [(ds, bb) for ds in DATASETS for bb in REGISTRY]
    for ds, bb in pairs:
        rs = [r for r in rows if r["dataset"] == ds and r["backbone"] == bb]
        if not rs:
            continue
        default = next((r for r in rs if r.get("label") == "default" and r["arm"] != "base"), None)
        bottleneck = ""
        if default is not None:
            q = default["protocol"]
            bottleneck = (
                f", bottleneck: forecast path {q.get('vq_path', 'quantized')}, "
                f"commitment {q.get('commitment_weight', 0.25)}"
            )
        base = [r for r in rs if r["arm"] == "base"]
        labels = list(dict.fromkeys(r["label"] for r in rs if r["arm"] != "base"))
        header = ["setting", "arm", "val MSE", "Δ val", "test MSE", "Δ test"]
        if ds == "storm":
            header += ["test CSI-M", "Δ CSI-M"]
        header += ["accepted / searched", "s"]
        table = []
        bv = [r["val"]["mse"] for r in base]
        bt = [r["test"]["mse"] for r in base]
        if base:
            line = ["base (no VQ)", "base", mean_std(bv), "", mean_std(bt), ""]
            if ds == "storm":
                line += [mean_std([r["test"]["csi_m"] for r in base]), ""]
            table.append(line + ["", f"{statistics.fmean(r['train_seconds'] for r in base):.0f}"])
        for lab in labels:
            for arm in ("vq", "beamvq"):
                sel = [r for r in rs if r["label"] == lab and r["arm"] == arm]
                if not sel:
                    continue
                v = [r["val"]["mse"] for r in sel]
                t = [r["test"]["mse"] for r in sel]
                line = [lab, arm, mean_std(v), rel_change(v, bv), mean_std(t), rel_change(t, bt)]
                if ds == "storm":
                    c = [r["test"]["csi_m"] for r in sel]
                    line += [mean_std(c), rel_change(c, [r["test"]["csi_m"] for r in base])]
                acc = sum(a["accepted"] for r in sel for a in r["augment"])
                sea = sum(a["searched"] for r in sel for a in r["augment"])
                line += [f"{acc}/{sea}" if sea else "-",
                         f"{statistics.fmean(r['train_seconds'] for r in sel):.0f}"]  # fmt: skip
                table.append(line)
        seeds = sorted({r["seed"] for r in rs})
        out.append(f"### Ablation on {bb}, {ds} (seeds {seeds}{bottleneck})\n")
        out.append(markdown(header, table))
    return "\n\n".join(out)


# -- ablations -----------------------------------------------------------------------------------
# settings that change the model (so the vq arm, without search, changes too)
MODEL_SETTINGS = (
    "default", "candidate loss 0", "K=8", "continuous path (proposed)",
    "continuous + candidate loss 0", "continuous + commitment 0.02",
    "papers' bottleneck (quantized, commitment 0.25)", "quantized path", "commitment 0.25",
)  # fmt: skip


def ablation_settings(p: Protocol) -> list[tuple[str, Protocol]]:
    """Each knob the issue names, one at a time against the protocol ``p``; a setting that gives
    the same protocol as an earlier one (e.g. "continuous path" when ``p`` is continuous) is
    dropped."""
    settings = [
        ("default", p),
        (
            "papers' bottleneck (quantized, commitment 0.25)",
            replace(p, vq_path="quantized", commitment_weight=0.25),
        ),
        ("quantized path", replace(p, vq_path="quantized")),
        ("commitment 0.25", replace(p, commitment_weight=0.25)),
        ("continuous path (proposed)", replace(p, vq_path="continuous")),
        ("candidate loss 0", replace(p, candidate_loss_weight=0.0)),
        ("only_improving=False", replace(p, only_improving=False)),
        ("start_epoch=6", replace(p, start_epoch=6)),
        ("pool weight 1.0", replace(p, pool_weight=1.0)),
        ("top_k=1 (best only)", replace(p, top_k=1)),
        ("beam_width=1 (greedy)", replace(p, beam_width=1, top_k=1)),
        ("K=8", replace(p, candidate_k=8)),
        ("ensemble=weighted T=0.01", replace(p, ensemble="weighted", temperature=0.01)),
        ("ensemble=standardized T=1", replace(p, ensemble="standardized", temperature=1.0)),
        ("start_epoch=2", replace(p, start_epoch=2)),
        ("beam_width=8", replace(p, beam_width=8)),
        ("K=2", replace(p, candidate_k=2, beam_width=2, top_k=2)),
        ("pool cap 32", replace(p, pool_capacity=32)),
        ("scorer=ssim", replace(p, scorer="ssim")),
        ("scorer=negmse+spectrum", replace(p, scorer="negmse+spectrum")),
        ("32 future-free inputs", replace(p, unlabelled_windows=32)),
        (
            "continuous + candidate loss 0",
            replace(p, vq_path="continuous", candidate_loss_weight=0.0),
        ),
        ("continuous + commitment 0.02", replace(p, vq_path="continuous", commitment_weight=0.02)),
        (
            "continuous + commitment 0.02 + 32 future-free inputs",
            replace(p, vq_path="continuous", commitment_weight=0.02, unlabelled_windows=32),
        ),
    ]
    seen: list[Protocol] = []
    out = []
    for label, q in settings:
        if q not in seen:
            seen.append(q)
            out.append((label, q))
    return out


# -- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default=",".join(REGISTRY))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--arms", default="base,beamvq", help=f"from {ARMS}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="simvp, ns, seed 0, 6 epochs")
    parser.add_argument("--ablation", action="store_true", help="ablation grid (one backbone)")
    parser.add_argument("--settings", default=None, help="ablation settings to run (comma list)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--start-epoch", type=int, default=None)
    parser.add_argument("--train-batches", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--vq-path", default=None, choices=("quantized", "continuous"),
                        help="the bottleneck's forecast path (default: continuous; quantized: "
                        "the papers')")  # fmt: skip
    parser.add_argument("--commitment", type=float, default=None,
                        help="commitment weight (default 0.02; the papers' 0.25)")  # fmt: skip
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "bench"))
    parser.add_argument("--results", default=None, help="JSON lines file to append results to")
    parser.add_argument("--report", nargs="*", default=None, help="print tables from these files")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.report is not None:
        rows = load_results(Path(p) for p in args.report)
        main_rows = [
            r for r in rows if r.get("label", "default") == "default" and not r.get("ablation")
        ]
        if main_rows:
            print(summary(main_rows, args.split) + "\n")
            print(report(main_rows, args.split))
        abl = [r for r in rows if r.get("ablation")]
        if abl:
            print(ablation_report(abl))
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    p = Protocol()
    if args.quick:
        p = replace(p, epochs=6, start_epoch=3)
        args.backbones, args.datasets, args.seeds = "simvp", "ns", "0"
        args.arms = "base,beamvq"
    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("start_epoch", args.start_epoch),
            ("train_batches", args.train_batches),
            ("resolution", args.resolution),
            ("vq_path", args.vq_path),
            ("commitment_weight", args.commitment),
        )
        if v is not None
    }
    p = replace(p, **overrides)
    names = [n for n in args.backbones.split(",") if n]
    datasets = [d for d in args.datasets.split(",") if d]
    arms = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    bad = [n for n in names if n not in REGISTRY] + [d for d in datasets if d not in DATASETS]
    bad += [a for a in arms if a not in ARMS]
    if bad:
        parser.error(f"unknown names {bad}")
    data_dir = Path(args.data_dir)
    results_path = Path(args.results) if args.results else None
    rows: list[dict] = []

    def record(res: RunResult, **extra: Any) -> None:
        row = {**asdict(res), **extra}
        rows.append(row)
        if results_path is not None:
            results_path.parent.mkdir(parents=True, exist_ok=True)
            with results_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        t = res.test
        extra_s = f" csi_m {t['csi_m']:.4f}" if "csi_m" in t else f" spec {t['spectrum_err']:.3f}"
        acc = sum(a["accepted"] for a in res.augment)
        print(
            f"  {res.dataset} {res.backbone} {res.arm} {extra.get('label', '')} seed {res.seed}: "
            f"test mse {t['mse']:.4g} rel {t['rel_l2']:.4f}{extra_s} val mse {res.val['mse']:.4g}"
            f" | accepted {acc} | {res.train_seconds:.1f}s",
            file=sys.stderr,
            flush=True,
        )

    start = time.perf_counter()
    if args.ablation:
        settings = ablation_settings(p)
        if args.settings:
            wanted = set(args.settings.split(","))
            settings = [s for s in settings if s[0] in wanted]
        for ds in datasets:
            for bb in names:
                for seed in seeds:
                    if "base" in arms:
                        record(
                            train_one(bb, ds, "base", seed, p, data_dir),
                            label="base",
                            ablation=True,
                        )
                    for lab, q in settings:
                        # the vq arm (no search) only changes with the model's own settings
                        model_only = lab in MODEL_SETTINGS
                        for arm in [a for a in arms if a == "beamvq" or (a == "vq" and model_only)]:
                            record(
                                train_one(bb, ds, arm, seed, q, data_dir), label=lab, ablation=True
                            )
        print(ablation_report(rows))
    else:
        for ds in datasets:
            for bb in names:
                for seed in seeds:
                    for arm in arms:
                        record(train_one(bb, ds, arm, seed, p, data_dir))
        print(report(rows, args.split))
    print(
        f"\nProtocol: {json.dumps(asdict(p))}\nWall time {time.perf_counter() - start:.0f} s, "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
